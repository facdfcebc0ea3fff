"""Size, FLOPs and latency of a model: the numbers a pruning report is made of."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["LatencyComparison", "count_flops", "count_parameters", "flop_counter", "latency_ratio", "measure_latency"]


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


def _call(model: nn.Module | Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def flop_counter(depth: int | None = 2) -> FlopCounterMode:
    """torch's FlopCounterMode, also counting the CPU kernel of scaled-dot-product attention.

    torch counts the CUDA attention kernels but not ``_scaled_dot_product_flash_attention_for_cpu``, so the same
    model would cost less on the CPU than on a GPU (its attention scores missing); the CUDA formula applies.
    """
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_attention(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        extra[op] = cpu_attention
    return FlopCounterMode(display=False, depth=depth, custom_mapping=extra)


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass (matmuls, convolutions and attention, as counted by :func:`flop_counter`)."""
    was_training = model.training
    model.eval()
    try:
        with flop_counter() as counter:
            _call(model, inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(
    model: nn.Module | Callable[..., Any], inputs: Any, repeats: int = 20, warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median seconds per forward pass (``clock`` is injectable so tests need not time anything).

    ``model`` may be any callable taking ``inputs`` as a model does; a module is put in eval mode.
    """
    if isinstance(model, nn.Module):
        model.eval()
    for _ in range(warmup):
        _call(model, inputs)
    times = []
    for _ in range(repeats):
        times.append(_timed_call(model, inputs, clock))
    return _quantile(sorted(times), 0.5)


@dataclass(frozen=True)
class LatencyComparison:
    """Dense-vs-pruned latency from interleaved pairs of calls.

    ``speedup`` is the median of the per-pair ratios ``baseline / candidate``: a burst of load that hits a few
    calls changes a few pairs, not the median. ``speedup_q25``/``speedup_q75`` (inter-quartile range) and
    ``speedup_min``/``speedup_max`` say how much the pairs disagree. ``baseline_s``/``candidate_s`` are the
    medians of each side's calls; their ratio lies in ``[speedup_min, speedup_max]`` but need not equal
    ``speedup``. Unpacks as ``(baseline_s, candidate_s, speedup)``, the tuple ``latency_ratio`` used to return.
    """

    baseline_s: float
    candidate_s: float
    speedup: float
    speedup_q25: float
    speedup_q75: float
    speedup_min: float
    speedup_max: float
    pairs: int

    def __iter__(self) -> Iterator[float]:
        return iter((self.baseline_s, self.candidate_s, self.speedup))

    def __getitem__(self, index: int) -> float:
        return (self.baseline_s, self.candidate_s, self.speedup)[index]

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def latency_ratio(
    baseline: nn.Module | Callable[..., Any], candidate: nn.Module | Callable[..., Any], inputs: Any,
    repeats: int = 20, rounds: int = 3, warmup: int = 3, clock: Callable[[], float] = time.perf_counter,
) -> LatencyComparison:
    """Time ``baseline`` and ``candidate`` call by call, interleaved, and compare them pair by pair.

    ``repeats * rounds`` pairs are timed; within a pair the two calls run back to back, and which model goes
    first alternates from pair to pair, so that load on a shared machine (which comes and goes on a scale of
    seconds) falls on both sides alike and neither model always runs in the other's cache wake. Timing whole
    rounds of one model and then of the other let a burst land on one side only (a 6.55x "speedup" measured
    on a busy machine where 1.44x was true). The models' training flags are restored afterwards.

    ``baseline`` and ``candidate`` may be any callables taking ``inputs`` as a model does (e.g.
    ``hf_ispasp.export.OnnxRunner`` sessions), so exported graphs are timed by the same protocol.
    """
    pairs = max(1, int(repeats) * max(1, int(rounds)))
    modules = [m for m in (baseline, candidate) if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        for _ in range(warmup):
            _call(baseline, inputs)
            _call(candidate, inputs)
        base_times, cand_times = [], []
        for index in range(pairs):
            if index % 2 == 0:
                base_times.append(_timed_call(baseline, inputs, clock))
                cand_times.append(_timed_call(candidate, inputs, clock))
            else:
                cand_times.append(_timed_call(candidate, inputs, clock))
                base_times.append(_timed_call(baseline, inputs, clock))
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
    ratios = sorted(b / max(c, 1e-12) for b, c in zip(base_times, cand_times, strict=True))
    return LatencyComparison(
        baseline_s=_quantile(sorted(base_times), 0.5),
        candidate_s=_quantile(sorted(cand_times), 0.5),
        speedup=_quantile(ratios, 0.5),
        speedup_q25=_quantile(ratios, 0.25),
        speedup_q75=_quantile(ratios, 0.75),
        speedup_min=ratios[0],
        speedup_max=ratios[-1],
        pairs=pairs,
    )


def _timed_call(model: nn.Module | Callable[..., Any], inputs: Any, clock: Callable[[], float]) -> float:
    _synchronize()
    start = clock()
    _call(model, inputs)
    _synchronize()
    return clock() - start


def _synchronize() -> None:
    """Wait for the work queued on an accelerator: a call on a GPU returns once its kernels are queued, so a clock
    read without this measures the launches, not the forward pass. No-op on CPU-only runs (a CUDA context that was
    never created is not created here)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        torch.mps.synchronize()


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of sorted ``values`` (numpy's default), so the median of 2k values is the
    mean of the middle two."""
    position = q * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)
