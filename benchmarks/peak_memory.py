"""Peak tensor memory of a call, on a CPU or a CUDA device (benchmarks only; torch, nothing of hf_ispasp, so any
source tree's engine can be measured with it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def peak_allocated(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """``fn()`` and the most bytes it held allocated at once beyond what was allocated before (its workspace).

    CUDA: the caching allocator's peak counter. CPU: the allocation and free events of ``torch.profiler``
    (``profile_memory``), replayed in time order; a temporary allocated and freed inside one operator (a LAPACK
    workspace) is not seen, every tensor that outlives an operator is.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # operators carry the bytes they allocated (net of what they freed) at their start; frees outside any
    # operator (a tensor dropped by Python) are "[memory]" events
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return out, peak
