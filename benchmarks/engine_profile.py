"""Where one whole prune spends its time on a device: torch.profiler over a warm prune of a BERT or LLaMA shape.

``engine_shapes`` says how long a prune takes against a dense forward; this says why. It reports the wall time,
how much of it the device was busy (sum of kernel times: a prune far above its busy time waits on the host:
launches, Python, host reads of device values), the synchronisation counts (``cudaStreamSynchronize`` and
``cudaMemcpyAsync`` are the waits on the device; ``aten::item`` also counts reads of CPU tensors, which cost no
wait), and the busiest operators by device time and by host time.

Self-contained (torch, transformers, hf_ispasp; no ``datasets``), so it runs from a source tree on a GPU machine:

    PYTHONPATH=. python benchmarks/engine_profile.py --device cuda --shape bert-base --dtype float32 bfloat16
    python benchmarks/engine_profile.py --device cpu --shape tiny --sequences 16 --length 16   # a smoke run

Profiling adds host overhead per operator, so the profiled wall time is above the unprofiled one (both reported);
compare operators with each other, not with ``engine_shapes``' figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

NAME = "engine_profile"
# host reads of device values and explicit waits: each one drains the launch queue
SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
         "cudaMemcpyAsync", "cudaEventSynchronize")


def _device_time(event: Any) -> float:
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


# Tensor calls that return values to Python: on an accelerator each one waits for the device
READS = frozenset({"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "equal", "numpy", "cpu", "to"})
# Calls that wait for a CUDA device without returning a value: a result whose shape depends on the data, or a
# factorisation that checks its status (the ``_ex`` variants do not). Counted on any device, so a CPU run names
# these sites as well (as ``wait <name>``).
WAITS = frozenset({"nonzero", "masked_select", "unique", "bincount", "repeat_interleave", "linalg_eigh",
                   "linalg_solve", "linalg_inv", "linalg_cholesky"})


def read_sites(run: Any, device: Any, top: int) -> list[dict[str, Any]]:
    """Run ``run()`` and count where it reads values of tensors on ``device`` back to the host, per innermost
    hf_ispasp frame (``file:line function``): the synchronisations of a prune, by call site. ``to`` counts only
    copies to the CPU; ``wait`` sites (:data:`WAITS`, boolean-mask indexing) are calls that synchronise on a
    CUDA device though they return no value; ``h2d`` sites copy host tensors (or build tensors from Python data)
    onto a non-CPU ``device``: from pageable memory each such copy waits for the stream too."""
    import collections
    import traceback

    import torch
    from torch.overrides import TorchFunctionMode

    counts: collections.Counter[str] = collections.Counter()

    def same(other: Any) -> bool:
        # "cuda" names the current CUDA device, which tensors report as "cuda:0": equal unless both name an index
        other = torch.device(other)
        return other.type == device.type and (other.index is None or device.index is None
                                              or other.index == device.index)

    def to_host(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if name != "to":
            return True
        targets = [*args[1:], kwargs.get("device")]
        return any(str(t) == "cpu" for t in targets if isinstance(t, (str, torch.device)))

    def waits(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if name == "repeat_interleave":  # only with per-element repeats (a tensor)
            return len(args) > 1 and isinstance(args[1], torch.Tensor) or isinstance(kwargs.get("repeats"),
                                                                                   torch.Tensor)
        if name == "__getitem__":  # a boolean mask index has a data-dependent shape
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, tuple) else (index,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts)
        return name in WAITS

    def to_device(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if device.type == "cpu":
            return False
        if name in ("tensor", "as_tensor"):  # Python data (or a host tensor) made on the device
            target = kwargs.get("device")
            return target is not None and same(target)
        if not (args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"):
            return False
        if name == "cuda":
            return device.type == "cuda"
        targets = [*args[1:], kwargs.get("device")]
        return name == "to" and any(isinstance(t, (str, torch.device)) and same(t)
                                    for t in targets)

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            on_device = bool(args) and isinstance(args[0], torch.Tensor) and same(args[0].device)
            kind = ("" if name in READS and to_host(name, args, kwargs) else
                    "wait " if waits(name, args, kwargs) else None) if on_device else None
            if kind is None and to_device(name, args, kwargs):
                kind = "h2d "
            if kind is not None:
                frame = next((f for f in reversed(traceback.extract_stack()[:-1]) if "hf_ispasp" in f.filename), None)
                where = f" {Path(frame.filename).name}:{frame.lineno} {frame.name}" if frame else ""
                counts[f"{kind}{name}{where}"] += 1
            return func(*args, **kwargs)

    with Reads():
        run()
    return [{"site": site, "count": count} for site, count in counts.most_common(top)]


def profile_prune(shape: str, dtype_name: str, device_name: str, sequences: int, length: int, batch_size: int,
                  top: int, sites_sequences: int = 0) -> dict[str, Any]:
    """One warm-up prune, one timed prune, one profiled prune and one with its reads counted (:func:`read_sites`)
    of ``shape``; the profile's summary. ``sites_sequences`` (> 0): the counted prune calibrates on the first
    that many sequences only (intercepting every torch call of a whole BERT-base prune outlasted a 150 s budget on
    an H200): per-batch counts scale with the batches, and a sparser calibration set can take other selection paths
    (a second validation below 4 tokens per column)."""
    import torch
    from engine_shapes import _batches, _config, _model, _sync, _vocab
    from torch.profiler import ProfilerActivity, profile

    from hf_ispasp import ISpaSPPruner

    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    model = _model(shape, dtype, device)
    batches = _batches(sequences, length, batch_size, vocab=_vocab(shape))
    ISpaSPPruner(model, _config()).prune(batches)  # warm-up: kernels, solver handles, allocator
    _sync(device)
    start = time.perf_counter()
    pruner = ISpaSPPruner(model, _config())
    pruner.prune(batches)
    _sync(device)
    wall = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled = ISpaSPPruner(model, _config())
        profiled.prune(batches)
        _sync(device)
    counted = batches[: max(1, -(-sites_sequences // batch_size))] if sites_sequences > 0 else batches
    sites = read_sites(lambda: ISpaSPPruner(model, _config()).prune(counted), device, top)
    events = prof.key_averages()
    busy = sum(_device_time(e) for e in events if e.device_type.name == "CUDA") / 1e6
    syncs = {e.key: int(e.count) for e in events if e.key in SYNCS}
    ops = [e for e in events if e.key.startswith("aten::") or e.device_type.name == "CUDA"]

    def rows(key: Any) -> list[dict[str, Any]]:
        return [{"op": e.key[:80], "count": int(e.count), "device_s": _device_time(e) / 1e6,
                 "host_s": float(e.self_cpu_time_total) / 1e6}
                for e in sorted(ops, key=key, reverse=True)[:top]]

    return {
        "shape": shape, "dtype": dtype_name, "device": str(device), "sequences": sequences, "length": length,
        "prune_s": wall, "calibration_s": pruner.report.seconds_calibration,
        "selection_s": pruner.report.seconds_selection, "profiled_prune_s": profiled.report.seconds,
        "device_busy_s": busy,
        "host_syncs": syncs, "kernels": sum(int(e.count) for e in events if e.device_type.name == "CUDA"),
        "by_device_time": rows(_device_time) if device.type == "cuda" else [],
        "by_host_time": rows(lambda e: e.self_cpu_time_total), "read_sites": sites,
        "read_sites_sequences": min(sequences, len(counted) * batch_size),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }


def report(records: list[dict[str, Any]]) -> str:
    lines = [f"## Where a prune spends its time: {', '.join(sorted({r['shape'] for r in records}))} on "
             f"{records[0]['card']}", "",
             "torch.profiler over one warm prune (FFN 0.5 / heads 0.75, default config, random weights and tokens). "
             "busy = sum of kernel times; syncs: cudaStreamSynchronize / cudaMemcpyAsync are waits on the device "
             "(each drains the launch queue), aten::item also counts reads of CPU tensors (no wait). Profiled times "
             "include the profiler's own overhead per operator.", "",
             "| shape | dtype | prune s | calibration s | selection s | profiled prune s | device busy s | kernels | "
             "host syncs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        syncs = ", ".join(f"{k} {v}" for k, v in sorted(r["host_syncs"].items())) or "-"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['prune_s']:.2f} | {r['calibration_s']:.2f} | "
                     f"{r['selection_s']:.2f} | {r['profiled_prune_s']:.2f} | {r['device_busy_s']:.2f} | "
                     f"{r['kernels']} | {syncs} |")
    for r in records:
        if r.get("read_sites"):
            lines += ["", f"Reads of {r['device']} values back to the host by call site, in a prune on "
                      f"{r.get('read_sites_sequences', r['sequences'])} sequences (a wait on an accelerator; "
                      "'wait': a call that waits on a CUDA device without returning a value; 'h2d': a copy onto the "
                      "device, which waits for the stream from pageable host memory), "
                      f"{r['shape']} {r['dtype']}:", "", "| call site | count |", "|---|---|"]
            lines += [f"| `{row['site']}` | {row['count']} |" for row in r["read_sites"]]
        for title, key in (("device", "by_device_time"), ("host", "by_host_time")):
            if not r[key]:
                continue
            lines += ["", f"Busiest operators by {title} time, {r['shape']} {r['dtype']}:", "",
                      "| operator | count | device s | host s |", "|---|---|---|---|"]
            lines += [f"| `{row['op']}` | {row['count']} | {row['device_s']:.3f} | {row['host_s']:.3f} |"
                      for row in r[key]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="bert-base")
    parser.add_argument("--dtype", nargs="*", default=["float32"])
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--sites-sequences", type=int, default=0,
                        help="sequences of the prune whose host reads are counted (0: all of --sequences); fewer "
                             "can change the selection's path (below 4 tokens per column a second validation runs)")
    args = parser.parse_args(argv)
    records = []
    for dtype in args.dtype:
        records.append(profile_prune(args.shape, dtype, args.device, args.sequences, args.length, args.batch_size,
                                     args.top, args.sites_sequences))
        args.output_dir.mkdir(parents=True, exist_ok=True)
        suffix = ("_gpu" if args.device.startswith("cuda") else "") + args.suffix
        (args.output_dir / f"{NAME}{suffix}.json").write_text(json.dumps({"records": records}, indent=2))
        text = report(records)
        (args.output_dir / f"{NAME}{suffix}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
