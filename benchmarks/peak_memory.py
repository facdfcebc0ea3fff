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
    peaks = PhasePeaks(device)  # no phases: everything is "other"
    out = peaks.run(fn)
    return out, max(peaks.peaks.values(), default=0)


class PhasePeaks:
    """Where a call's peak memory falls: the most bytes held at once beyond what was allocated before the call,
    per labelled phase (``"other"``: outside every phase). Phases are marked by wrapping functions
    (:meth:`wrap`) or by ``with peaks.phase(name)``; they must not nest.

    CUDA: the allocator's peak counter, read and reset at every phase boundary. CPU: the allocation events of
    ``torch.profiler``, replayed in time order and attributed to the phase between whose marks they fall.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, int] = {}
        self._base = 0

    def _note(self, name: str) -> None:  # CUDA: the peak since the last boundary belongs to ``name``
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self._base
        self.peaks[name] = max(self.peaks.get(name, 0), peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    def phase(self, name: str) -> Any:
        import contextlib

        @contextlib.contextmanager
        def marked() -> Any:
            if self.device.type != "cuda":
                # instants on the profiler's own clock, not a range around the phase: inside a range, frees by
                # Python would be booked to the range instead of their own '[memory]' events
                with torch.profiler.record_function(_LABEL + name):
                    pass
                try:
                    yield
                finally:
                    with torch.profiler.record_function(_LABEL):
                        pass
                return
            self._note("other")
            try:
                yield
            finally:
                self._note(name)

        return marked()

    def wrap(self, owner: Any, attribute: str, name: str | None = None) -> Callable[[], None]:
        """Mark every call of ``owner.attribute`` as phase ``name`` (default: the attribute); returns the undo.
        A missing attribute (another engine's source tree) is left alone."""
        original = getattr(owner, attribute, None)
        if original is None:
            return lambda: None

        def marked(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name or attribute):
                return original(*args, **kwargs)

        setattr(owner, attribute, marked)
        return lambda: setattr(owner, attribute, original)

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, measured; :attr:`peaks` then holds the bytes per phase (their maximum is the call's peak)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            out = fn()
            self._note("other")
            return out
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        import bisect

        marks = sorted((e.time_range.start, e.name[len(_LABEL):]) for e in prof.events() if e.name.startswith(_LABEL))
        # (start, end, phase): a phase's mark, then the end mark after it (phases do not nest)
        ranges = [(at, end, name) for (at, name), (end, _) in zip(marks, marks[1:], strict=False) if name]
        starts = [start for start, _, _ in ranges]
        # operators carry the bytes they allocated (net of what they freed) at their start; frees outside any
        # operator (a tensor dropped by Python) are "[memory]" events
        events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                        for e in prof.events() if not e.name.startswith(_LABEL))
        live = 0
        for at, delta in events:
            live += delta
            index = bisect.bisect_right(starts, at) - 1
            name = ranges[index][2] if index >= 0 and at <= ranges[index][1] else "other"
            self.peaks[name] = max(self.peaks.get(name, 0), live)
        return out


_LABEL = "phase::"
