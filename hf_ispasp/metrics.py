"""Size, FLOPs and latency of a model: the numbers a pruning report is made of."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_parameters", "latency_ratio", "measure_latency"]


def count_parameters(module: nn.Module | list[nn.Module]) -> int:
    """Parameters of a module (or modules), shared tensors counted once."""
    modules = module if isinstance(module, (list, tuple, nn.ModuleList)) else [module]
    seen: set[int] = set()
    total = 0
    for mod in modules:
        for param in mod.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass (matmuls, convolutions and attention, as counted by torch's FlopCounterMode)."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            _call(model, inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(model: nn.Module, inputs: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per forward pass."""
    model.eval()
    for _ in range(warmup):
        _call(model, inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _call(model, inputs)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def latency_ratio(
    baseline: nn.Module, candidate: nn.Module, inputs: Any, repeats: int = 20, rounds: int = 3,
    timer: Callable[[nn.Module, Any, int], float] = measure_latency,
) -> tuple[float, float, float]:
    """(baseline seconds, candidate seconds, speedup) measured interleaved in the same run.

    Interleaving rounds of both models, and taking the median of each, keeps machine noise from
    landing on one side only.
    """
    base_times, cand_times = [], []
    for _ in range(rounds):
        base_times.append(timer(baseline, inputs, repeats))
        cand_times.append(timer(candidate, inputs, repeats))
    base = sorted(base_times)[len(base_times) // 2]
    cand = sorted(cand_times)[len(cand_times) // 2]
    return base, cand, base / cand
