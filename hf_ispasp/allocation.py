"""Allocating a cost budget across blocks: how many groups each block keeps so the model meets a target.

Pure arithmetic (no torch module, no transformers). Each block has ``num_groups`` groups, a floor and a step (a
kept count must be a multiple of the step: one per run of grouped-query heads, ``round_to`` neurons) and, for
the global allocation, an error curve: the block's output error against the groups it keeps
(:func:`hf_ispasp.algorithm.residual_curve`, weighted so that blocks are comparable). What widths cost comes from
a :class:`Pricing` (:class:`hf_ispasp.budget.BlockCosts` prices real models; :class:`LinearPricing` is the
simple case of a fixed price per group).

- ``uniform``: the largest single keep ratio that meets the target, applied to every block.
- ``global``: greedy water-filling from the dense widths: repeatedly remove one step from the block whose error
  grows least per unit of cost saved, until the target is met, then give back the steps that still fit. On
  convex curves (diminishing returns, which the residual of a least-squares re-fit has in practice) and a
  linear price this is the optimal allocation of the continuous relaxation.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .config import ALLOCATIONS

__all__ = [
    "ALLOCATIONS",
    "BudgetBlock",
    "InfeasibleBudgetError",
    "LinearPricing",
    "Pricing",
    "allocate",
    "allocate_global",
    "allocate_uniform",
]


class InfeasibleBudgetError(ValueError):
    """The target is below what the model costs with every block at its smallest width."""


class Pricing(Protocol):
    """What widths cost: the whole model, and which blocks' prices depend on each other."""

    def total(self, widths: Mapping[str, int]) -> float:
        """Cost of the model with these kept groups per block."""

    def change(self, widths: Mapping[str, int], name: str, new: int) -> float:
        """``total`` with block ``name`` at ``new`` groups minus ``total(widths)`` (computed locally)."""

    def partners(self, name: str) -> Sequence[str]:
        """Blocks whose price per group changes when ``name`` changes width (e.g. two convs in a row)."""


@dataclass
class LinearPricing:
    """A fixed price per kept group of every block, plus the cost of everything else."""

    fixed: float
    per_group: dict[str, float]

    def total(self, widths: Mapping[str, int]) -> float:
        return self.fixed + sum(cost * widths[name] for name, cost in self.per_group.items())

    def change(self, widths: Mapping[str, int], name: str, new: int) -> float:
        return self.per_group[name] * (new - widths[name])

    def partners(self, name: str) -> Sequence[str]:
        return ()


@dataclass
class BudgetBlock:
    """One prunable block as the allocation sees it."""

    name: str
    num_groups: int
    floor: int = 1  # fewest groups it may keep
    step: int = 1  # kept counts are multiples of this (at least ``floor``)
    counts: list[int] = field(default_factory=list)  # error curve: groups kept ...
    errors: list[float] = field(default_factory=list)  # ... and the (weighted) output error at that count

    def __post_init__(self) -> None:
        order = np.argsort(self.counts)  # sorted once: error() runs for every step of the water-filling
        self._curve = (np.asarray(self.counts, dtype=float)[order], np.asarray(self.errors, dtype=float)[order])

    def error(self, kept: int) -> float:
        """The error curve at ``kept`` groups (linear between the measured points)."""
        return float(np.interp(kept, *self._curve))

    def down(self, kept: int) -> int:
        """The next allowed count below ``kept`` (``kept`` itself at the floor)."""
        aligned = max(self.floor, kept // self.step * self.step)
        return aligned if aligned < kept else max(self.floor, kept - self.step)

    def up(self, kept: int) -> int:
        """The next allowed count above ``kept`` (at most all groups)."""
        return min(self.num_groups, (kept // self.step + 1) * self.step)


def _check(blocks: Sequence[BudgetBlock], pricing: Pricing, target: float) -> float:
    """The dense cost; raises when even the floors cost more than ``target``."""
    dense = pricing.total({b.name: b.num_groups for b in blocks})
    smallest = pricing.total({b.name: b.floor for b in blocks})
    if smallest > target * (1 + 1e-12):
        reachable = math.ceil(smallest / dense * 1e4) / 1e4
        raise InfeasibleBudgetError(
            f"the target keeps {target / dense:.4f} of the dense cost, but even with every prunable block at its "
            f"smallest width the model keeps {smallest / dense:.4f} (the parts that are not pruned, such as "
            f"embeddings and the task head, cost the rest): ask for {reachable} or more"
        )
    return dense


def allocate_uniform(blocks: Sequence[BudgetBlock], pricing: Pricing, target: float,
                     kept_count: Callable[[BudgetBlock, float], int]) -> tuple[dict[str, int], float]:
    """The largest keep ratio (one for every block) whose cost is <= ``target``; returns widths and the ratio.

    ``kept_count(block, ratio)``: the library's rounding of a ratio to a count (so a uniform budget prunes exactly
    as ``ffn_keep_ratio`` / ``head_keep_ratio`` would).
    """
    _check(blocks, pricing, target)

    def widths(ratio: float) -> dict[str, int]:
        return {b.name: kept_count(b, ratio) for b in blocks}

    low, high = 0.0, 1.0
    if pricing.total(widths(high)) <= target:
        low = high
    for _ in range(60):  # the counts change at finitely many ratios; 60 halvings find the last step exactly
        mid = (low + high) / 2
        if pricing.total(widths(mid)) <= target:
            low = mid
        else:
            high = mid
    return widths(low), low


def allocate_global(blocks: Sequence[BudgetBlock], pricing: Pricing, target: float) -> dict[str, int]:
    """Greedy water-filling on the error curves: the widths with the least summed error that meet ``target``."""
    _check(blocks, pricing, target)
    kept = {b.name: b.num_groups for b in blocks}
    index_of = {b.name: i for i, b in enumerate(blocks)}
    total = pricing.total(kept)
    version = [0] * len(blocks)
    heap: list[tuple[float, int, int, int]] = []

    def push(index: int) -> None:
        version[index] += 1  # earlier entries of this block are stale
        block = blocks[index]
        now = kept[block.name]
        after = block.down(now)
        if after >= now:
            return
        saved = -pricing.change(kept, block.name, after)
        increase = max(block.error(after) - block.error(now), 0.0)
        heapq.heappush(heap, (increase / saved if saved > 0 else math.inf, index, after, version[index]))

    for index in range(len(blocks)):
        push(index)
    while total > target and heap:
        _, index, after, seen = heapq.heappop(heap)
        if seen != version[index]:
            continue
        block = blocks[index]
        total += pricing.change(kept, block.name, after)
        kept[block.name] = after
        push(index)
        for name in pricing.partners(block.name):  # their price per group changed
            push(index_of[name])
    # The last removal may overshoot by up to one step of one block: give back, best error per cost first, the
    # steps that still fit under the target.
    while True:
        best: tuple[float, BudgetBlock, int, float] | None = None
        for block in blocks:
            now = kept[block.name]
            up = block.up(now)
            if up <= now:
                continue
            extra = pricing.change(kept, block.name, up)
            grown = total + extra
            if grown <= target:
                gain = (block.error(now) - block.error(up)) / extra if extra > 0 else math.inf
                if best is None or gain > best[0]:
                    best = (gain, block, up, grown)
        if best is None:
            return kept
        _, block, up, total = best
        kept[block.name] = up


def allocate(blocks: Sequence[BudgetBlock], pricing: Pricing, target: float, allocation: str,
             kept_count: Callable[[BudgetBlock, float], int]) -> dict[str, int]:
    """Widths per block under ``allocation`` (``uniform`` or ``global``)."""
    if allocation == "uniform":
        return allocate_uniform(blocks, pricing, target, kept_count)[0]
    if allocation == "global":
        return allocate_global(blocks, pricing, target)
    raise ValueError(f"allocation={allocation!r}: choose one of {ALLOCATIONS}")
