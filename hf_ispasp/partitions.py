"""Selection under a partition constraint: the groups fall into ``P`` equal contiguous runs, each keeping ``k / P``.

Grouped-query attention pruned by query heads (``gqa_groups="query"``) needs it: every key/value head must keep
as many query heads as the others, or the attention cannot be reshaped into KV groups. For a rule that ranks
groups by a score, the best supports under the constraint are the top ``k / P`` of every run; for i-SpaSP the
candidate step takes the top ``2 k / P`` of every run, which is the model-based CoSaMP projection onto the
structured sparsity model (Baraniuk, Cevher, Duarte, Hegde, "Model-Based Compressive Sensing", IEEE Trans. Inf.
Theory 2010). With ``P = 1`` every helper reduces to the plain rule.

This module knows nothing of transformers.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["check_partitions", "drops_above_floor", "first_per_run", "random_per_run", "run_of", "topk_per_run"]


def check_partitions(num_groups: int, keep: int, partitions: int) -> int:
    """Groups kept in every run; a clear error when the runs or the budget do not split evenly."""
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions={partitions!r} must be an integer >= 1 (1: no constraint)")
    if num_groups % partitions:
        raise ValueError(
            f"partitions={partitions} does not divide the {num_groups} groups into equal runs; a block with "
            "partitions has num_groups a multiple of it (e.g. query heads = KV heads x query heads per KV head)"
        )
    if keep % partitions:
        raise ValueError(
            f"cannot keep {keep} groups in {partitions} runs: every run must keep the same number of groups, so the "
            f"budget must be a multiple of {partitions} (see hf_ispasp.config.kept_count(..., partitions=...))"
        )
    return keep // partitions


def run_of(num_groups: int, partitions: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The run index of every group."""
    return torch.arange(num_groups, device=device) // (num_groups // partitions)


def topk_per_run(
    scores: torch.Tensor, k: int, partitions: int, candidates: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of the ``k`` largest scores of every run (ties: the lower index), sorted by run.

    ``candidates`` (a boolean mask) restricts the choice; every run must hold at least ``k`` candidates.
    """
    if candidates is not None:
        scores = torch.where(candidates, scores, torch.full_like(scores, -torch.inf))
    runs = scores.reshape(partitions, -1)
    order = torch.argsort(-runs, dim=1, stable=True)[:, :k]
    offsets = torch.arange(partitions, device=scores.device)[:, None] * runs.shape[1]
    return (order + offsets).reshape(-1)


def first_per_run(num_groups: int, k: int, partitions: int) -> torch.Tensor:
    """The first ``k`` groups of every run: any ``k`` per run cost the same, so widths are applied this way."""
    size = num_groups // partitions
    return (torch.arange(partitions)[:, None] * size + torch.arange(k)).reshape(-1)


def random_per_run(num_groups: int, k: int, partitions: int, generator: torch.Generator | None) -> torch.Tensor:
    """``k`` groups drawn uniformly without replacement inside every run."""
    size = num_groups // partitions
    return torch.cat([torch.randperm(size, generator=generator)[:k] + run * size for run in range(partitions)])


def drops_above_floor(runs: np.ndarray, counts: np.ndarray, floor: int, limit: int) -> np.ndarray:
    """Positions of at most ``limit`` candidates, taken in order, that can leave without a run going below
    ``floor`` kept groups; ``runs[i]`` is the run of candidate ``i`` (cheapest first), ``counts`` the kept per run."""
    left = counts.copy()
    chosen = []
    for position, run in enumerate(runs.tolist()):
        if len(chosen) == limit:
            break
        if left[run] > floor:
            left[run] -= 1
            chosen.append(position)
    return np.asarray(chosen, dtype=np.int64)
