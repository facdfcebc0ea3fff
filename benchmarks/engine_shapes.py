"""Prune cost at BERT-base, BERT-large and LLaMA width on any device: the prune against one dense forward pass
over the same calibration set, calibration and selection seconds, peak extra memory, and whether the selection
equals the float64 CPU reference.

Random weights and random token ids (cost does not depend on them), 512 sequences x 128 tokens by default, FFN
keep 0.5 / heads keep 0.75, default config. Each (shape, dtype, engine) runs in a fresh subprocess, prunes are
interleaved with dense forwards (ratio i = prune i / mean of the forwards around it; median and range
reported). Self-contained (torch, transformers, hf_ispasp; no ``datasets``), so it runs from a source tree on a
GPU machine:

    PYTHONPATH=. python benchmarks/engine_shapes.py --device cuda --dtype float32 bfloat16 \\
        --shape bert-base bert-large llama-width [--baseline-path OLD_SOURCE_TREE] [--output-dir DIR]
    PYTHONPATH=. python benchmarks/engine_shapes.py --device cuda --dtype bfloat16 --shape llama-7b \\
        --sequences 128 --length 2048 --batch-size 4 --reference 0 --repeats 1 --suffix _llama7b

``--baseline-path`` runs the same measurement with another hf_ispasp source tree (e.g. the previous release,
``git archive <rev> hf_ispasp | tar -x -C DIR``) for a before/after table from one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NAME = "engine_shapes"
ROOT = Path(__file__).resolve().parent.parent

# BERT layers at the width of each model; "llama-width" is two BERT layers at LLaMA-7B width (hidden 4096, FFN
# 11008, 32 heads): the size of one block's statistics and selection for a 7B decoder.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "llama-width": dict(hidden_size=4096, num_hidden_layers=2, num_attention_heads=32, intermediate_size=11008),
}
# Whole decoders (LlamaForCausalLM, random weights): LLaMA-2-7B (multi-head) and Llama-3-8B (grouped-query, 8 KV
# heads) shapes, and a tiny one for smoke runs. Run them with e.g. --sequences 128 --length 2048 --batch-size 4.
DECODERS: dict[str, dict[str, int]] = {
    "tiny-llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=112, vocab_size=1000),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256),
}
VOCAB = 30522
MINILM = "minilm"  # real weights (all-MiniLM-L6-v2) on real sentences (sentence polarity), as the CPU target


def _minilm(sequences: int, batch_size: int, device: Any, dtype: Any) -> tuple[Any, list[dict[str, Any]]]:
    """MiniLM-L6 and the first polarity sentences, tokenized (max 64 tokens) and padded per batch of 32."""
    import csv

    from transformers import AutoModel, AutoTokenizer

    from demo.assets import minilm_path, polarity_csv

    with open(polarity_csv(), encoding="utf-8-sig") as f:
        sentences = [row[1].strip() for row in csv.reader(f)][:sequences]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batches = []
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[start : start + batch_size], truncation=True, max_length=64, padding=True,
                        return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    model = AutoModel.from_pretrained(minilm_path()).eval().to(device=device, dtype=dtype)
    return model, batches


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def in_turn(runs: list[Any], round_: int) -> list[Any]:
    """``runs`` in the order of round ``round_``: as given in even rounds, reversed in odd ones (ABBA across
    rounds), so that what is compared is measured side by side and neither side always goes first."""
    return runs if round_ % 2 == 0 else runs[::-1]


def tree_env(tree: str | Path) -> dict[str, str]:
    """The environment of a worker that measures the hf_ispasp of source tree ``tree``: that tree first on
    ``PYTHONPATH``, the repository root after it (the demo assets, e.g. MiniLM)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def rss_mb() -> float:
    """Resident memory of this process now (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _batches(sequences: int, length: int, batch_size: int, seed: int = 0, vocab: int = 0) -> list[dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, sequences, batch_size):
        n = min(batch_size, sequences - start)
        top = vocab or VOCAB
        ids = torch.randint(min(1000, top // 2), top, (n, length), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _vocab(shape: str) -> int:
    return DECODERS.get(shape, {}).get("vocab_size", VOCAB)


def _model(shape: str, dtype: Any, device: Any, layers: int = 0) -> Any:
    """``shape`` with random weights (``layers``: that many layers instead of the shape's own, when > 0)."""
    import torch
    from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig

    torch.manual_seed(0)
    depth = {"num_hidden_layers": layers} if layers > 0 else {}
    if shape in DECODERS:  # built on the device in its dtype: a 7B model never exists in float32 on the host
        config = LlamaConfig(max_position_embeddings=4096, **{**DECODERS[shape], **depth})
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=512, **{**SHAPES[shape], **depth})
    return BertModel(config).eval().to(device=device, dtype=dtype)


def _forward_seconds(model: Any, batches: list[dict[str, Any]], device: Any) -> float:
    import torch

    on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in on_device:
            model(**batch)
    _sync(device)
    return time.perf_counter() - start


def _config(**extra: Any) -> Any:
    from hf_ispasp import PrunerConfig

    return PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.75, show_progress=False, **extra)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import hf_ispasp
    from hf_ispasp import ISpaSPPruner

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    overrides = parse_config(args.config[0]) if args.config else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    switched = _take_accelerator_paths() if args.accelerator_paths else None
    if args.shape == MINILM:
        model, batches = _minilm(args.sequences, args.batch_size, device, dtype)
    else:
        model = _model(args.shape, dtype, device, args.layers)
        batches = _batches(args.sequences, args.length, args.batch_size, vocab=_vocab(args.shape))
    _forward_seconds(model, batches[:2], device)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        # The prune's warm-up, as the forward's: solver and BLAS handles, CUDA-graph pools and kernels load on
        # first use (0.3-1 s on an H200, which the first timed prune paid alone before).
        ISpaSPPruner(model, _config(**overrides)).prune(batches[:2])
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    forwards = [_forward_seconds(model, batches, device)]
    prunes, calibration, selection, peaks_device, pruned_bytes = [], [], [], [], 0
    rss_before = rss_mb()
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        pruner = ISpaSPPruner(model, _config(**overrides))
        _sync(device)
        start = time.perf_counter()
        pruned = pruner.prune(batches)
        _sync(device)
        prunes.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks_device.append(torch.cuda.max_memory_allocated(device) - base)
        calibration.append(pruner.report.seconds_calibration)
        selection.append(pruner.report.seconds_selection)
        pruned_bytes = sum(p.numel() * p.element_size() for p in pruned.parameters())
        kept = json.dumps([b.kept for b in pruner.report.blocks])
        del pruned
        forwards.append(_forward_seconds(model, batches, device))
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    ratios = [p / ((forwards[i] + forwards[i + 1]) / 2) for i, p in enumerate(prunes)]
    record: dict[str, Any] = {
        "shape": args.shape, "dtype": args.dtype, "device": str(device), "engine": args.engine,
        "engine_version": getattr(hf_ispasp, "__version__", "?"), "sequences": args.sequences, "length": args.length,
        "model_mb": model_bytes / 2**20, "pruned_mb": pruned_bytes / 2**20,
        "peak_extra_device_mb": max(peaks_device) / 2**20 if peaks_device else None,
        "peak_extra_host_mb": peak_host,
        # which groups were kept, as a digest: engines that select alike have equal digests (and equal quality)
        "kept_digest": hashlib.sha1(kept.encode()).hexdigest()[:12],
        "config": args.config[0] if args.config else "default",
        # every repeat, so that rounds of a run can be merged (see _merge)
        "prunes": prunes, "forwards": forwards, "ratios": ratios, "calibrations": calibration, "selections": selection,
    }
    if switched is not None:  # which of the accelerator's paths this engine has (and took)
        record["accelerator_paths"] = switched
    _summarise(record)
    record.update(_memory_bound(model, pruner.report, pruned_bytes))
    if not args.no_memory:  # one more (untimed) prune: where its memory peaks, phase by phase
        peaks = _phase_peaks(lambda: ISpaSPPruner(model, _config(**overrides)).prune(batches), device)
        record["peak_by_phase_mb"] = {name: value / 2**20 for name, value in peaks.items()}
        if device.type == "cpu":  # tensors held at once (a GPU's peak is the timed prunes' counter above)
            record["peak_extra_allocated_mb"] = max(peaks.values()) / 2**20
    if device.type == "cuda":
        record["card"] = torch.cuda.get_device_name(device)
    first_round = not args.no_memory
    if (args.reference and first_round and dtype == torch.float32 and args.engine == "current" and args.shape != MINILM
            and not args.accelerator_paths):  # a CPU reference would take the accelerator's paths too
        record.update(_reference(model, args, device, overrides))
    return record


def _take_accelerator_paths() -> list[str]:
    """On a CPU, make this process's engine take the code paths it takes on an accelerator (its memory then is the
    GPU's, its time is not): Gram sums as 512-column lower panels from 2048 columns without deferred rows, whole
    products elsewhere, the elimination loop of the device, and the accelerators' W^T W and factored energy. Any
    engine's tree: what it lacks is left alone. Returns what was switched."""
    import hf_ispasp.algorithm as alg

    switched = []

    def switch(name: str, value: Any, owner: Any = alg) -> None:
        if hasattr(owner, name):
            setattr(owner, name, value)
            switched.append(name)

    panel_width, panel_block = getattr(alg, "_DEVICE_PANEL_WIDTH", None), getattr(alg, "_DEVICE_GRAM_BLOCK", None)
    if panel_width is not None and panel_block is not None:
        switch("_panel_block", lambda rows: panel_block if rows.shape[1] >= panel_width else None)
    switch("_defers_rows", lambda rows: False)
    switch("_by_blocks", lambda rows: False)
    switch("_mirrors_weight_gram", lambda device: True)
    switch("_factors_energy", lambda device: True)
    problem = getattr(alg, "_Problem", None)
    if problem is not None and hasattr(problem, "_eliminate_on_device"):
        switch("residual_threshold", lambda self, merged, keep, partitions=1, path=None:
               self._eliminate_on_device(merged, keep, partitions, path), problem)
    return switched


def _phase_peaks(run: Any, device: Any) -> dict[str, int]:
    """Bytes held at once beyond what was allocated before ``run()``, per phase of the prune: ``statistics``
    (collect_block_statistics), ``propagate``, the validated selection's own phases (``weight_gram``,
    ``select_residual``, ``validate_1``, ``select_refit``, ``validate_2``) and ``other`` (the rest: the final
    re-fit, compaction, the activation cache's capture). Any engine's tree: names it lacks are not marked."""
    import inspect

    from peak_memory import PhasePeaks

    import hf_ispasp.pruner as module

    peaks = PhasePeaks(device)
    undo = [peaks.wrap(module, "collect_block_statistics", "statistics"), peaks.wrap(module, "propagate")]
    original = getattr(module, "validated_selection", None)
    if original is not None and "phase" in inspect.signature(original).parameters:
        def marked(*args: Any, **kwargs: Any) -> Any:
            def phase(name: str, step: Any) -> Any:
                with peaks.phase(name):
                    return step()

            return original(*args, **{**kwargs, "phase": phase})

        module.validated_selection = marked
        undo.append(lambda: setattr(module, "validated_selection", original))
    try:
        peaks.run(run)
    finally:
        for restore in undo:
            restore()
    return peaks.peaks


def parse_config(variant: str) -> dict[str, Any]:
    """``default`` or ``key=value,key=value`` (values parsed as JSON where they parse) -> PrunerConfig overrides."""
    if variant == "default":
        return {}
    overrides: dict[str, Any] = {}
    for item in variant.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--config: expected key=value, got {item!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def _memory_bound(model: Any, report: Any, returned: int) -> dict[str, float]:
    """Issue 8's memory bound, in MB: the largest layer, the statistics of one layer's blocks (float64: Gram
    matrix, column sums, and their fold-0 parts) and the activation cache (as the prune reported it), plus the
    pruned model the prune returns (``returned`` bytes: new memory unless it prunes in place)."""
    from hf_ispasp.adapters import adapter_for

    adapter = adapter_for(model)
    layers = list(adapter.layers())
    layer = max(sum(p.numel() * p.element_size() for p in module.parameters()) for module in layers)
    widths = [[b.num_groups * b.group_size for b in adapter.blocks(i)] for i in range(len(layers))]
    statistics_bytes = max(sum(2 * (w * w + w) * 8 for w in layer_widths) for layer_widths in widths)
    cache = sum(report.activation_cache_bytes.values())
    return {"bound_layer_mb": layer / 2**20, "bound_statistics_mb": statistics_bytes / 2**20,
            "bound_cache_mb": cache / 2**20, "bound_returned_mb": returned / 2**20,
            "bound_mb": (layer + statistics_bytes + cache + returned) / 2**20}


def _reference(model: Any, args: argparse.Namespace, device: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """The same prune on ``args.reference`` sequences on the device and on the CPU (float64): same groups?"""
    import copy

    import torch

    from hf_ispasp import ISpaSPPruner

    data = _batches(args.reference, args.length, args.batch_size, seed=1, vocab=_vocab(args.shape))
    on_device = ISpaSPPruner(model, _config(**overrides))
    on_device.prune(data)
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32)
    on_cpu = ISpaSPPruner(cpu_model, _config(**{**overrides, "selection_dtype": "float64"}))
    on_cpu.prune(data)
    same = sum(a.kept == b.kept for a, b in zip(on_device.report.blocks, on_cpu.report.blocks, strict=True))
    single = ISpaSPPruner(model, _config(**{**overrides, "selection_dtype": "float32"}))
    single.prune(data)
    same32 = sum(a.kept == b.kept for a, b in zip(single.report.blocks, on_cpu.report.blocks, strict=True))
    return {"reference_sequences": args.reference, "blocks": len(on_cpu.report.blocks), "same_as_cpu": same,
            "same_as_cpu_float32_selection": same32}


def report(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    title = f": {meta['title']}" if meta.get("title") else ""
    lines = [
        "## Engine cost at BERT-base, BERT-large and LLaMA width" + title,
        "",
        f"Random weights, {meta.get('sequences')} x {meta.get('length')} random tokens (minilm: all-MiniLM-L6-v2 on "
        "the first polarity sentences, at most 64 tokens, padded per batch), FFN 0.5 / heads 0.75, "
        f"default config; {meta.get('where')}. ratio = prune / one dense forward over the same calibration set "
        "(median of the interleaved repeats, pooled over the rounds of engines run in alternation, range in "
        "brackets; on a GPU after one warm-up prune of 2 batches, as the forward has one). Peak extra device "
        "memory = peak allocated during "
        "the prune minus allocated before it (the returned model included); on a CPU, peak extra allocated = the "
        "most tensor memory held at once during one more prune (torch.profiler allocation events; the resident "
        "set, peak extra host, also counts memory the C allocator kept after it was freed). bound = issue 8's "
        "budget for the extra memory: the largest layer + one layer's float64 statistics + the activation cache, "
        "plus the pruned model it returns (layer / statistics / cache / returned MB in brackets). 'same as CPU' = "
        "blocks whose kept groups equal a CPU float64 prune on the same (smaller) calibration set: default "
        "(selection_dtype=auto: float64 selection, validated in float32 from 2 calibration tokens per column) / "
        "selection_dtype=float32. 'kept' = digest of every block's kept groups (equal digests: the same pruned "
        "model, hence the same quality).",
        "",
        "| shape | dtype | engine | forward s | prune s | ratio | calibration s | selection s | model MB | "
        "pruned MB | peak extra device MB | peak extra host MB | peak extra allocated MB | bound MB | same as CPU | "
        "kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        same = (f"{r['same_as_cpu']}/{r['blocks']} / {r['same_as_cpu_float32_selection']}/{r['blocks']}"
                if "same_as_cpu" in r else "-")
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {_engine(r)} | {r['forward_s']:.3f} | {r['prune_s']:.2f} | "
            f"{r['ratio']:.1f} [{r['ratio_min']:.1f}-{r['ratio_max']:.1f}] | {r['calibration_s']:.2f} | "
            f"{r['selection_s']:.2f} | {r['model_mb']:.0f} | {r['pruned_mb']:.0f} | "
            f"{fmt(r['peak_extra_device_mb'], '.0f')} | {r['peak_extra_host_mb']:.0f} | "
            f"{fmt(r.get('peak_extra_allocated_mb'), '.0f')} | {_bound(r)} | {same} | "
            f"{r.get('kept_digest', '-')} |"
        )
    phases = [r for r in records if r.get("peak_by_phase_mb")]
    if phases:
        lines.append("\nPeak extra memory by phase of one more prune (MB; the largest first): " + "; ".join(
            f"{r['shape']} {r['dtype']} {_engine(r)}: " + ", ".join(
                f"{name} {value:.0f}" for name, value in sorted(r["peak_by_phase_mb"].items(), key=lambda kv: -kv[1]))
            for r in phases) + ".")
    if any(r["engine"] == "before" for r in records):
        baseline = meta.get("baseline") or "the --baseline-path source tree"
        lines.append(f"\n'before' = {baseline}, measured in the same run; equal 'kept' digests mean both engines "
                     "prune to the same model.")
    targets = {512: 2.0, 128: 3.0}  # issue 8's CPU targets for MiniLM (prune / one dense forward)
    for r in records:
        if (r["shape"] == MINILM and r["device"] == "cpu" and r["engine"] == "current" and r["sequences"] in targets
                and r.get("config", "default") == "default"):
            goal = targets[r["sequences"]]
            lines.append(f"\nTarget prune <= {goal}x one dense forward at {r['sequences']} sentences: "
                         f"{r['ratio']:.1f}x -> {'met' if r['ratio'] <= goal else 'not met'} (calibration "
                         f"{r['calibration_s'] / r['forward_s']:.1f}x a forward, selection {r['selection_s']:.1f} s).")
    return "\n".join(lines) + "\n"


def _engine(record: dict[str, Any]) -> str:
    config = record.get("config", "default")
    return record["engine"] if config == "default" else f"{record['engine']}, {config}"


def _bound(record: dict[str, Any]) -> str:
    if "bound_mb" not in record:  # measured before the bound was recorded
        return "-"
    return (f"{record['bound_mb']:.0f} ({record['bound_layer_mb']:.0f} / {record['bound_statistics_mb']:.0f} / "
            f"{record['bound_cache_mb']:.0f} / {record['bound_returned_mb']:.0f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", nargs="*", default=["float32"])
    parser.add_argument("--shape", nargs="*", choices=[*sorted(SHAPES), *sorted(DECODERS), MINILM],
                        help="default: minilm on the CPU, bert-base bert-large llama-width on a GPU")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tiny shape, 16 sequences)")
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference", type=int, default=64, help="sequences of the CPU reference (0: skip)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--baseline-path", type=Path, help="another hf_ispasp source tree to measure as 'before'")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    parser.add_argument("--config", nargs="*", default=[],
                        help="PrunerConfig variants to measure, each 'default' or 'key=value,key=value' (values as "
                             "JSON, e.g. refit_validation=false); default: the default config only")
    parser.add_argument("--title", default="", help="the table's heading (default: shapes and machine)")
    parser.add_argument("--baseline-label", default="", help="what --baseline-path is, e.g. 'commit abc1234 (...)'")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the engines this many times (ABBA...), pooling their repeats: drift of the "
                             "machine between engines then averages out")
    parser.add_argument("--layers", type=int, default=0, help="layers of a random-weight shape (0: the shape's)")
    parser.add_argument("--accelerator-paths", action="store_true",
                        help="on a CPU, take the code paths of an accelerator: the GPU's memory figures without a "
                             "GPU (not its times)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="current", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.shape, args.sequences, args.length, args.repeats, args.reference = ["tiny"], 16, 16, 1, 8
    if not args.shape:
        args.shape = [MINILM] if args.device == "cpu" else ["bert-base", "bert-large", "llama-width"]
    if args.worker:
        args.shape, args.dtype = args.shape[0], args.dtype[0]
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    records = []
    engines = [("current", str(ROOT))] + ([("before", str(args.baseline_path))] if args.baseline_path else [])
    for shape in args.shape:
        # configs and engines alternate within every round (ABBA across rounds), so that a config is compared with
        # another measured minutes, not a whole run, apart
        variants = args.config or ["default"]
        for dtype, round_ in itertools.product(args.dtype, range(args.rounds)):
            runs = list(itertools.product(variants, engines))
            for variant, (engine, path) in in_turn(runs, round_):
                cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--dtype", dtype, "--engine", engine,
                       "--config", variant, *(["--no-memory"] if round_ else []),
                       "--device", args.device, "--sequences", str(args.sequences), "--length", str(args.length),
                       "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
                       "--reference", str(args.reference), "--threads", str(args.threads),
                       "--layers", str(args.layers), *(["--accelerator-paths"] if args.accelerator_paths else [])]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=tree_env(path), cwd=path)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{shape} {dtype} {engine} {variant} failed:\n{proc.stderr[-3000:]}", flush=True)
                    continue
                record = json.loads(line[len("RESULT "):])
                records = _merge(records, record)
                print(json.dumps(record), flush=True)
                _write(args, records)  # a cut-off run keeps what it measured
    print(_write(args, records))
    return 0 if records else 1


def _summarise(record: dict[str, Any]) -> None:
    """Medians (and the ratio's range) of a record's repeats."""
    record.update({
        "forward_s": statistics.median(record["forwards"]), "prune_s": statistics.median(record["prunes"]),
        "ratio": statistics.median(record["ratios"]), "ratio_min": min(record["ratios"]),
        "ratio_max": max(record["ratios"]), "calibration_s": statistics.median(record["calibrations"]),
        "selection_s": statistics.median(record["selections"]),
    })


def _merge(records: list[dict[str, Any]], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Add ``new`` to ``records``, pooling its repeats with an earlier round of the same shape, dtype, engine and
    config (timings: medians and ranges over all repeats; memory and agreement: from the first round)."""
    key = ("shape", "dtype", "engine", "config")
    for record in records:
        if all(record.get(k) == new.get(k) for k in key) and "prunes" in record:
            for name in ("prunes", "forwards", "ratios", "calibrations", "selections"):
                record[name] = record[name] + new[name]
            record["rounds"] = record.get("rounds", 1) + 1
            record["peak_extra_host_mb"] = max(record["peak_extra_host_mb"], new["peak_extra_host_mb"])
            _summarise(record)
            if record.get("peak_extra_device_mb") is not None and new.get("peak_extra_device_mb") is not None:
                record["peak_extra_device_mb"] = max(record["peak_extra_device_mb"], new["peak_extra_device_mb"])
            return records
    return [*records, new]


def _write(args: argparse.Namespace, records: list[dict[str, Any]]) -> str:
    card = next((r["card"] for r in records if "card" in r), None)
    where = f"one {card}" if card else f"{args.device}, {args.threads or 'default'} threads, {platform.node()}"
    if args.accelerator_paths:
        where += ", taking an accelerator's code paths (memory as on a GPU; times are not)"
    if args.layers:
        where += f", num_hidden_layers={args.layers}"
    meta = {"sequences": args.sequences, "length": args.length, "where": where, "device": args.device,
            "tiny": args.tiny, "title": args.title or f"{', '.join(args.shape)} on {where}",
            "baseline": (args.baseline_label or str(args.baseline_path)) if args.baseline_path else None}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("_gpu" if args.device.startswith("cuda") else "") + args.suffix
    (args.output_dir / f"{NAME}{suffix}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    text = report(records, meta)
    (args.output_dir / f"{NAME}{suffix}.md").write_text(text)
    return text


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
