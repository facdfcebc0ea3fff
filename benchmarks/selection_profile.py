"""Where one block's selection spends its time, phase by phase, on any device: the default selection path of
``ISpaSPPruner`` (exact-residual i-SpaSP, held-out validation of the re-fit ridge, re-fit-aware i-SpaSP with that
ridge, a second validation, the final re-fit) on synthetic statistics of a block at BERT or LLaMA width, plus the
dense linear-algebra primitives it is built from, and the busiest operators of one whole block (torch.profiler).

Self-contained (torch and hf_ispasp; no ``datasets``), so it runs from a source tree on a GPU machine:

    PYTHONPATH=. python benchmarks/selection_profile.py --device cuda --dtype float64 float32
    python benchmarks/selection_profile.py --device cpu --shapes bert-base-ffn bert-base-attn
    python benchmarks/selection_profile.py --device cpu --shapes minilm-ffn --baseline-path /tmp/old --rounds 2

With ``--baseline-path`` (another hf_ispasp source tree) both engines run in worker processes, alternating (ABBA
over ``--rounds``), and each row pools an engine's repeats over the rounds: a before/after from one run.

Statistics: ``H = gelu(X A)`` for Gaussian ``X`` (``--tokens`` rows) and ``A``, folds by alternating batches;
the output projection ``W`` is Gaussian. Timing does not depend on the values; the selections are what the
default config would choose for such data. Each phase: median of ``--repeats`` runs (range in the JSON).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine_shapes import in_turn, tree_env  # noqa: E402
from peak_memory import peak_allocated  # noqa: E402

from hf_ispasp.algorithm import (  # noqa: E402
    BlockStatistics,
    refit_with_residual,
    select_groups,
    validated_selection,
)

NAME = "selection_profile"
# (output features d, width, group size, kept groups): a block's output projection is d x width.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "tiny-ffn": (32, 96, 1, 48),
    "minilm-ffn": (384, 1536, 1, 768),
    "minilm-attn": (384, 384, 32, 9),
    "bert-base-ffn": (768, 3072, 1, 1536),
    "bert-base-attn": (768, 768, 64, 9),
    "bert-large-ffn": (1024, 4096, 1, 2048),
    "llama-7b-ffn": (4096, 11008, 1, 5504),
    "llama-7b-attn": (4096, 4096, 128, 24),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _statistics(d: int, width: int, tokens: int, device: torch.device, seed: int = 0
                ) -> tuple[BlockStatistics, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mixing = (torch.randn(d, width, generator=gen) / math.sqrt(d)).to(device)
    stats = BlockStatistics(width, device=device)
    batch = 1024
    for start in range(0, tokens, batch):
        rows = min(batch, tokens - start)
        x = torch.randn(rows, d, generator=gen).to(device)
        stats.update(torch.nn.functional.gelu(x @ mixing), fold=(start // batch) % 2)
    weight = (torch.randn(d, width, generator=gen) / math.sqrt(width)).to(device)
    bias = (torch.randn(d, generator=gen) * 0.01).to(device)
    return stats, weight, bias


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def block_phases(stats: BlockStatistics, weight: torch.Tensor, bias: torch.Tensor, group: int, keep: int,
                 dtype: torch.dtype, device: torch.device, solved: bool = False
                 ) -> tuple[dict[str, float], dict[str, Any]]:
    """One default selection of the block, phase by phase (seconds), and what it chose: the library's own path
    (:func:`hf_ispasp.algorithm.validated_selection`, timed through its phase hook), then the final re-fit.

    ``solved``: also time the final re-fit without the threshold's coefficients (``refit_solved``, not in the
    total), as the pruner solves it where it has none to take: after a float32 selection, on the accumulated
    float64 statistics, or where the second validation keeps the exact-residual support."""
    seconds: dict[str, float] = {}

    def timed(name: str, step: Callable[[], Any]) -> Any:
        out, seconds[name] = _timed(step, device)
        return out

    s = timed("to_dtype", lambda: stats.to(dtype=dtype))

    def select(threshold: str, damping: float | None, anchored: bool, gram_w: torch.Tensor | None,
               energy: float | None) -> Any:
        return select_groups(s, weight, group, keep, threshold=threshold, centered=True,
                             damping=1e-4 if damping is None else damping, anchored=anchored, weight_gram=gram_w,
                             output_energy=energy)

    result, final = validated_selection(s, weight, bias, group, select, threshold="refit", refit_threshold=True,
                                        refit=True, phase=timed)
    if final.ridge is not None:  # as the pruner re-fits: from the threshold's coefficients where it carried them
        timed("refit", lambda: refit_with_residual(s, weight, bias, result.groups, group, final.ridge, anchored=True,
                                                   carried=result.refit))
    seconds["total"] = sum(seconds.values())
    if solved and final.ridge is not None:
        _, seconds["refit_solved"] = _timed(lambda: refit_with_residual(stats, weight, bias, result.groups, group,
                                                                        final.ridge, anchored=True), device)
    chosen = {"ridge": final.ridge, "iterations": result.iterations,
              "kept_digest": hash(tuple(result.groups.tolist())) & 0xFFFFFFFF}
    return seconds, chosen


def primitives(k: int, d: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds of the dense kernels the selection is made of, at its sizes (median of ``repeats``)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(k, k, generator=gen, dtype=torch.float64)
    spd = (a @ a.T / k + torch.eye(k, dtype=torch.float64)).to(device=device, dtype=dtype)
    rhs = torch.randn(k, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    ops: dict[str, Callable[[], Any]] = {
        "eigh": lambda: torch.linalg.eigh(spd),
        "inv": lambda: torch.linalg.inv(spd),
        "cholesky": lambda: torch.linalg.cholesky(spd),
        "solve": lambda: torch.linalg.solve(spd, rhs),
        "matmul_kkk": lambda: spd @ spd,
    }
    out = {}
    for name, op in ops.items():
        op()  # warm-up (handles, workspaces)
        out[name] = statistics.median(_timed(op, device)[1] for _ in range(repeats))
    if device.type == "cuda":  # the other GPU linear-algebra backend torch can use for eigh
        previous = torch.backends.cuda.preferred_linalg_library()
        try:
            torch.backends.cuda.preferred_linalg_library("magma")
            ops["eigh"]()
            out["eigh_magma"] = statistics.median(_timed(ops["eigh"], device)[1] for _ in range(repeats))
        except RuntimeError as error:  # a build without MAGMA
            print(f"eigh with MAGMA unavailable: {error}", flush=True)
        finally:
            torch.backends.cuda.preferred_linalg_library(previous)
    return out


def profile_table(stats: BlockStatistics, weight: torch.Tensor, bias: torch.Tensor, group: int, keep: int,
                  dtype: torch.dtype, device: torch.device, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        block_phases(stats, weight, bias, group, keep, dtype, device)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    if device.type == "cuda":
        table += "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", nargs="*", default=["float64"], help="selection precision(s)")
    parser.add_argument("--shapes", nargs="*", choices=sorted(SHAPES),
                        default=["bert-base-ffn", "bert-base-attn", "llama-7b-ffn", "llama-7b-attn"])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", nargs="*", default=["bert-base-ffn"], help="shapes to run torch.profiler on")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--slow", type=float, default=10.0, help="seconds above which a shape is measured once")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--title", default="", help="appended to the heading, e.g. which engine this is")
    parser.add_argument("--baseline-path", type=Path, help="another hf_ispasp source tree to measure as 'before'")
    parser.add_argument("--baseline-label", default="", help="what --baseline-path is, e.g. 'commit abc1234'")
    parser.add_argument("--rounds", type=int, default=1, help="with --baseline-path: engine alternations (ABBA)")
    parser.add_argument("--engine", default="", help=argparse.SUPPRESS)  # a worker's engine label
    args = parser.parse_args(argv)
    if args.baseline_path is not None:
        return _compare(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    records = []
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        d, width, group, keep = SHAPES[shape]
        stats, weight, bias = _statistics(d, width, args.tokens, device)
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            first = block_phases(stats, weight, bias, group, keep, dtype, device)  # warm-up
            # a slow shape (LLaMA width in float64) is measured once: its warm-up costs are negligible
            repeats = 0 if first[0]["total"] > args.slow else args.repeats
            runs = [block_phases(stats, weight, bias, group, keep, dtype, device, solved=True)
                    for _ in range(repeats)] or [first]
            phases, spread = _summary([r[0] for r in runs])
            kept = runs[0][1]["kept_digest"] if width <= 4096 else None
            if device.type != "cpu" and width <= 4096:  # the device's elimination against the host's, same data
                on_host = select_groups(stats.to(device="cpu", dtype=dtype), weight.cpu(), group, keep,
                                        threshold="residual", centered=True)
                here = select_groups(stats.to(dtype=dtype), weight, group, keep, threshold="residual", centered=True)
                runs[0][1]["residual_selection_equals_host"] = torch.equal(here.groups, on_host.groups)
            prims = primitives(keep * group, d, dtype, device, max(len(runs), 1))
            _, workspace = peak_allocated(
                functools.partial(block_phases, stats, weight, bias, group, keep, dtype, device), device)
            matrix = width * width * torch.empty((), dtype=dtype).element_size()
            record = {"shape": shape, "dtype": dtype_name, "where": where, "d": d, "width": width, "group": group,
                      "keep": keep, "phases": phases, "spread": spread, "runs": [r[0] for r in runs],
                      "engine": args.engine or "current", "chosen": runs[0][1], "kept": kept,
                      "primitives_at_kept_width": prims, "workspace_mb": workspace / 2**20,
                      "workspace_width2": workspace / matrix}
            if shape in args.profile:
                record["profile"] = profile_table(stats, weight, bias, group, keep, dtype, device, 25)
                print(record["profile"], flush=True)
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "profile"}), flush=True)
            _write(args, records, where)
        del stats, weight, bias
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(_write(args, records, where))
    return 0


def _summary(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median and range of every phase over ``runs`` (a phase a run lacks counts 0)."""
    names = list(dict.fromkeys(name for run in runs for name in run))
    phases = {n: statistics.median(run.get(n, 0.0) for run in runs) for n in names}
    return phases, {n: [min(run.get(n, 0.0) for run in runs), max(run.get(n, 0.0) for run in runs)] for n in names}


def _stem(device: str, suffix: str) -> str:
    """The result files' name, less the extension."""
    return NAME + ("_gpu" if device.startswith("cuda") else "") + suffix


def _compare(args: argparse.Namespace) -> int:
    """This script's measurement in worker processes for this tree ('current') and ``--baseline-path`` ('before'),
    in alternation (ABBA over the rounds), each engine's repeats pooled over the rounds into one row per shape and
    dtype. A worker imports the hf_ispasp of its tree (first on ``PYTHONPATH``) and runs this file's code."""
    passed = ["--device", args.device, "--dtype", *args.dtype, "--shapes", *args.shapes, "--tokens", str(args.tokens),
              "--repeats", str(args.repeats), "--threads", str(args.threads), "--slow", str(args.slow)]
    engines = [("current", ROOT), ("before", args.baseline_path.resolve())]
    pooled: dict[tuple[str, str, str], dict[str, Any]] = {}
    where = ""
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for engine, tree in in_turn(engines, round_):
                out = Path(scratch) / f"{engine}{round_}"
                # the profile is the first round's (it does not depend on the timing)
                extra = ["--profile", *(args.profile if round_ == 0 else [])]
                cmd = [sys.executable, str(Path(__file__).resolve()), *passed, *extra, "--engine", engine,
                       "--output-dir", str(out)]
                proc = subprocess.run(cmd, env=tree_env(tree), cwd=tree, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{engine} failed:\n{proc.stderr[-3000:]}", flush=True)
                    return 1
                data = json.loads((out / f"{_stem(args.device, '')}.json").read_text())
                where = data["meta"]["where"]
                for record in data["records"]:
                    key = (record["shape"], record["dtype"], engine)
                    if key in pooled:
                        pooled[key]["runs"] += record["runs"]
                    else:
                        pooled[key] = record
                print(f"round {round_ + 1} {engine}: done", flush=True)
    records = []
    for record in pooled.values():
        record["phases"], record["spread"] = _summary(record["runs"])
        record["rounds"] = args.rounds
        records.append(record)
    records.sort(key=lambda r: (args.shapes.index(r["shape"]) if args.shapes else 0, r["dtype"],
                                r["engine"] != "current"))
    label = args.baseline_label or str(args.baseline_path)
    args.title = (args.title + "; " if args.title else "") + f"before = {label}, alternating over {args.rounds} " \
        "round(s), repeats pooled"
    print(_write(args, records, where))
    return 0


def _write(args: argparse.Namespace, records: list[dict[str, Any]], where: str) -> str:
    meta = {"where": where, "tokens": args.tokens, "repeats": args.repeats, "torch": torch.__version__,
            "host": platform.node()}
    stem = _stem(args.device, args.suffix)
    (args.output_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    phases = ["to_dtype", "weight_gram", "select_residual", "validate_1", "select_refit", "validate_2", "refit",
              "total", "refit_solved"]
    title = f": {args.title}" if args.title else ""
    lines = [f"## Selection phases of one block on {where}{title}", "",
             f"Synthetic statistics ({args.tokens} tokens), default selection path, median of {args.repeats} "
             "(seconds; refit_solved: the final re-fit solved afresh on the float64 statistics, as after a float32 "
             "selection, not in the total); primitives at the kept width k (k x k matrices, k x d right-hand "
             "sides). Workspace: the most "
             "memory the whole selection holds at once beyond the block's statistics (CUDA: peak allocated; CPU: "
             "torch.profiler allocation events), in MB and in width x width matrices of the selection dtype.", "",
             "| shape | dtype | engine | " + " | ".join(phases) + " | eigh k | eigh k (MAGMA) | inv k | cholesky k "
             "| solve k | workspace MB | workspace (width^2 matrices) |",
             "|" + "---|" * (len(phases) + 10)]
    for r in records:
        p, q = r["phases"], r["primitives_at_kept_width"]
        cells = [f"{p[name]:.4f}" if name in p else "-" if name == "refit_solved" else "0.0000"
                 for name in phases] + [
            f"{q[n]:.4f}" if n in q else "-" for n in ("eigh", "eigh_magma", "inv", "cholesky", "solve")] + [
            f"{r['workspace_mb']:.1f}" if "workspace_mb" in r else "-",
            f"{r['workspace_width2']:.2f}" if "workspace_width2" in r else "-"]
        lines.append(f"| {r['shape']} | {r['dtype']} | {r.get('engine', 'current')} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (args.output_dir / f"{stem}.md").write_text(text)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
