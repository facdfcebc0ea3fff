"""Budgets: FLOPs targets, uniform against global allocation, on MiniLM, EfficientNet-Lite0 and the small LLaMA.

Per model, per FLOPs keep target, per allocation: ``PrunerConfig(flops_keep_ratio=t, allocation=a)`` (otherwise
the library defaults), the achieved FLOPs / parameter ratios and the widths chosen, the model's metrics one-shot
and after a short fine-tune, and the CPU latency against the dense model (batch 1, interleaved pairs,
``hf_ispasp.metrics.latency_ratio``). The data, the evaluation and the fine-tune of each model are the ones of its
own benchmark, imported from it:

- MiniLM-L6 on sentence polarity (``common.load_task``; 512 calibration sentences): accuracy, agreement and
  KL to the dense model on the 800 test sentences; fine-tune = ``finetune_recovery.finetune`` with logit
  distillation, for ``--minilm-epochs`` of an epoch (the recovery benchmark trains a whole epoch).
- EfficientNet-Lite0 on Fashion-MNIST at 64 px (``vision_efficientnet``; 512 calibration images, FLOPs counted
  at 64 px): top-1 on 5000 test images; fine-tune = ``demo.vision.train_classifier`` as there.
- The LLaMA-GQA decoder trained here (``decoder_perplexity``; 128 calibration chunks of 128 tokens): held-out
  perplexity; fine-tune = its distillation ``_finetune``.

Global "beats" uniform by the primary metric: accuracy for MiniLM (KL breaks ties), top-1 for EfficientNet,
perplexity for LLaMA. Writes ``budget_allocation.json`` (a record per measured point, flushed as it comes),
``budget_allocation.md`` and ``budget_allocation_widths.png`` (kept fraction per block).

    python benchmarks/budget_allocation.py [--models minilm,efficientnet,llama] [--targets 0.7,0.5,0.35]
                                           [--no-finetune] [--resume] [--tiny] [--output-dir DIR]
    python benchmarks/budget_allocation.py --latency-only    # time every point again from its recorded widths
    python benchmarks/budget_allocation.py --report-only     # markdown and PNG again from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for  # noqa: E402
from hf_ispasp.allocation import InfeasibleBudgetError  # noqa: E402
from hf_ispasp.budget import cut_copy  # noqa: E402
from hf_ispasp.metrics import count_flops, count_parameters, latency_ratio  # noqa: E402

NAME = "budget_allocation"
MODELS = ("minilm", "efficientnet", "llama")
TARGETS = (0.7, 0.5, 0.35)
ALLOCATIONS = ("uniform", "global")
# model -> (primary metric, +1 higher is better / -1 lower is better, tie-break metric (lower is better) or None)
PRIMARY: dict[str, tuple[str, int, str | None]] = {
    "minilm": ("accuracy", 1, "kl"),
    "efficientnet": ("top1", 1, None),
    "llama": ("ppl", -1, None),
}
LABELS = {"minilm": "MiniLM-L6 (polarity)", "efficientnet": "EfficientNet-Lite0 (Fashion-MNIST, 64 px)",
          "llama": "LLaMA-GQA (Wikipedia)"}
MINILM_GOAL = (0.5, 1.0)  # at FLOPs keep 0.5, one-shot accuracy at most 1 point below dense


@dataclass
class Bench:
    """One model under test: its dense model, calibration data, evaluation, fine-tune and settings."""

    name: str
    dense: Any
    calibration: Any
    evaluate: Callable[[Any], dict[str, float]]
    finetune: Callable[[Any], Any]
    latency_inputs: Any
    config: dict[str, Any] = field(default_factory=dict)  # PrunerConfig fields beyond the target
    after_prune: Callable[[Any], Any] = lambda model: model
    meta: dict[str, Any] = field(default_factory=dict)  # what the markdown says about the setting


# Models -----------------------------------------------------------------------------------------------------
def minilm(args: argparse.Namespace) -> Bench:
    """MiniLM-L6 on sentence polarity, with the recovery benchmark's distillation fine-tune."""
    import finetune_recovery

    from hf_ispasp.training import DistillationArguments

    task = common.load_task(tiny=args.tiny, work_dir=args.output_dir)
    distill = DistillationArguments(distill_weight=0.5, temperature=2.0)
    recipe = SimpleNamespace(epochs=args.minilm_epochs, lr=5e-5)

    def finetune(model: Any) -> Any:
        torch.manual_seed(0)
        return finetune_recovery.finetune(copy.deepcopy(model), task, distill, recipe)[0]

    def evaluate(model: Any) -> dict[str, float]:
        metrics = task.evaluate(model)
        return {k: metrics[k] for k in ("accuracy", "accuracy_stderr", "agreement", "kl")}

    steps = 4 if args.tiny else int(-(-len(task.train) * args.minilm_epochs // 32))
    return Bench(
        "minilm", task.model, task.calibration_loader(labels=False), evaluate, finetune,
        adapter_for(task.model).example_inputs(),
        meta={"calibration": f"{len(task.calibration)} training sentences (shuffle seed 0)",
              "finetune": f"{steps} steps of 32 sentences ({args.minilm_epochs:g} epoch of {len(task.train)}), lr "
                          "5e-5, `DistillationTrainer` with w = 0.5, T = 2 (`finetune_recovery.finetune`)",
              "test": f"{len(task.test)} test sentences"},
    )


def efficientnet(args: argparse.Namespace) -> Bench:
    """EfficientNet-Lite0 fine-tuned on Fashion-MNIST (the vision benchmark's cached dense model and data)."""
    import vision_efficientnet as ve

    from demo.vision import evaluate_accuracy, train_classifier

    setting = SimpleNamespace(tiny=args.tiny, size=32 if args.tiny else 64, train_images=64 if args.tiny else 10_000,
                              test_images=64 if args.tiny else 5_000, calibration_images=32 if args.tiny else 512)
    steps = 2 if args.tiny else args.efficientnet_steps
    torch.manual_seed(0)
    train, calib, test = ve.data(setting)
    dense = ve.channels_last(ve.dense_model(setting, train))
    # FLOPs (the target and the adapter's example input) at the resolution the model runs at, not timm's 224 px.
    dense.pretrained_cfg = {**(getattr(dense, "pretrained_cfg", None) or {}),
                            "input_size": (3, setting.size, setting.size)}

    def finetune(model: Any) -> Any:
        torch.manual_seed(0)
        tuned = copy.deepcopy(model)
        train_classifier(tuned, train, steps=steps, lr=5e-4, warmup=min(10, steps // 3), log_every=50)
        return tuned.eval()

    example = adapter_for(dense).example_inputs().contiguous(memory_format=torch.channels_last)
    return Bench(
        "efficientnet", dense, calib, lambda model: {"top1": evaluate_accuracy(model, test)}, finetune, example,
        config={"activation_cache": "memory"}, after_prune=ve.channels_last,
        meta={"calibration": f"{setting.calibration_images} unlabelled training images",
              "finetune": f"{steps} steps of 64 images, AdamW lr 5e-4, cosine (`demo.vision.train_classifier`, the "
                          "vision benchmark's recipe)",
              "test": f"{setting.test_images} test images at {setting.size} px, channels-last"},
    )


def llama(args: argparse.Namespace) -> Bench:
    """The LLaMA-GQA decoder trained from scratch, with the decoder benchmark's data and distillation fine-tune."""
    import decoder_perplexity as dp

    from demo import lm

    model, tokenizer, _ = dp._load("llama", args.tiny)
    calibration, train = dp._train_chunks(tokenizer, args.tiny)
    seq = 32 if args.tiny else 128
    test = lm.lm_dataset("test", tokenizer, seq, max_chunks=16 if args.tiny else dp.TEST_CHUNKS)
    work = Path(args.output_dir) / f".{NAME}-work"

    def finetune(student: Any) -> Any:
        torch.manual_seed(0)
        return dp._finetune(copy.deepcopy(student), model, train, args.tiny, work)

    return Bench(
        "llama", model, dp._batches(calibration), lambda m: {"ppl": lm.perplexity(m, test)}, finetune,
        adapter_for(model).example_inputs(),
        meta={"calibration": f"{len(calibration)} training chunks of {seq} tokens",
              "finetune": f"{4 if args.tiny else dp.FINETUNE_STEPS} steps of {dp.BATCH} chunks, logit distillation "
                          "(w = 0.5, T = 2) from the dense model, lr 2e-4 cosine (`decoder_perplexity._finetune`)",
              "test": f"{len(test)} x {seq} held-out test tokens"},
    )


SETUPS: dict[str, Callable[[argparse.Namespace], Bench]] = {
    "minilm": minilm, "efficientnet": efficientnet, "llama": llama,
}


# Measuring --------------------------------------------------------------------------------------------------
def blocks_of(model: Any) -> dict[str, dict[str, Any]]:
    """Every prunable block: its kind, layer and number of groups (what the widths are fractions of)."""
    adapter = adapter_for(model)
    return {b.name: {"kind": b.kind, "layer": b.layer, "groups": b.num_groups} for b in adapter.iter_blocks()}


def latency(bench: Bench, pruned: Any, args: argparse.Namespace) -> dict[str, float]:
    """Batch-1 CPU latency of dense and pruned, timed in interleaved pairs (median speedup and its IQR).

    With ``--latency-threads`` torch threads (default 1: on a shared machine a thread pool waits for threads that
    another job has descheduled, which made 2-thread forwards of MiniLM 10-100x slower at random).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(args.latency_threads)
    try:
        repeats = 2 if args.tiny else args.latency_repeats
        lat = latency_ratio(bench.dense, pruned, bench.latency_inputs, repeats=repeats, rounds=3)
    finally:
        torch.set_num_threads(threads)
    return {"dense_ms": 1e3 * lat.baseline_s, "pruned_ms": 1e3 * lat.candidate_s, "speedup": lat.speedup,
            "speedup_q25": lat.speedup_q25, "speedup_q75": lat.speedup_q75, "pairs": lat.pairs,
            "threads": args.latency_threads}


def retime(bench: Bench, args: argparse.Namespace, results: common.Results) -> None:
    """Latency of every one-shot point of ``bench`` again, on the dense model cut to the recorded widths."""
    dense_flops = count_flops(bench.dense, bench.latency_inputs)
    for row in results.records:
        if row["model"] != bench.name or row["stage"] != "one-shot":
            continue
        model = bench.after_prune(cut_copy(bench.dense, row["widths"]).eval())
        row["latency"] = {**latency(bench, model, args),
                          "flops_ratio": count_flops(model, bench.latency_inputs) / dense_flops}
        results.flush()
        print(f"{bench.name} {row['target']} {row['allocation']}: x{row['latency']['speedup']:.2f} "
              f"({row['latency']['speedup_q25']:.2f}-{row['latency']['speedup_q75']:.2f})", flush=True)


def done(results: common.Results, model: str, target: float, allocation: str, finetune: bool) -> bool:
    stages = {r["stage"] for r in results.records
              if (r["model"], r.get("target"), r.get("allocation")) == (model, target, allocation)}
    return "infeasible" in stages or {"one-shot", "fine-tuned"} <= stages or (not finetune and "one-shot" in stages)


def measure(bench: Bench, targets: Sequence[float], args: argparse.Namespace, results: common.Results,
            stamp: Callable[[], None] = lambda: None) -> None:
    """Dense row (once), then every (target, allocation): prune, evaluate, time, fine-tune, evaluate.

    ``stamp`` runs before every record is written (it keeps the run's wall time in the JSON up to date)."""
    finetune = not args.no_finetune
    todo = [(t, a) for t in targets for a in ALLOCATIONS if not done(results, bench.name, t, a, finetune)]
    dense_row = next((r for r in results.records if r["model"] == bench.name and r["stage"] == "dense"), None)
    if dense_row is None:
        dense_row = {"model": bench.name, "stage": "dense", **bench.evaluate(bench.dense),
                     "flops": count_flops(bench.dense, bench.latency_inputs),
                     "params": count_parameters(bench.dense), "blocks": blocks_of(bench.dense), **bench.meta}
        stamp()
        results.add(dense_row)
        print(f"{bench.name} dense: {_metrics_text(dense_row)}", flush=True)
    for target, allocation in todo:
        # a partial point (one-shot without its fine-tune) is measured again from the start
        results.data["records"] = [r for r in results.records if (r["model"], r.get("target"), r.get("allocation"))
                                   != (bench.name, target, allocation)]
        key = {"model": bench.name, "target": target, "allocation": allocation}
        config = PrunerConfig(flops_keep_ratio=target, allocation=allocation, show_progress=False, **bench.config)
        torch.manual_seed(0)
        pruner = ISpaSPPruner(bench.dense, config)
        try:
            pruned, seconds = common.timed(pruner.prune, bench.calibration)
        except InfeasibleBudgetError as error:
            stamp()
            results.add({**key, "stage": "infeasible", "error": str(error)})
            print(f"{bench.name} {target} {allocation}: {error}", flush=True)
            continue
        pruned = bench.after_prune(pruned.eval())
        budget = pruner.report.budget
        row = {**key, "stage": "one-shot", **bench.evaluate(pruned), "flops_ratio": budget["achieved"]["flops"],
               "params_ratio": budget["achieved"]["params"], "predicted": budget["predicted"],
               "widths": budget["widths"], "prune_s": seconds,
               "latency": latency(bench, pruned, args)}
        stamp()
        results.add(row)
        print(f"{bench.name} {target} {allocation}: {_metrics_text(row)}, FLOPs {row['flops_ratio']:.3f}, "
              f"x{row['latency']['speedup']:.2f} ({seconds:.0f}s)", flush=True)
        if finetune:
            tuned, seconds = common.timed(bench.finetune, pruned)
            row = {**key, "stage": "fine-tuned", **bench.evaluate(tuned), "finetune_s": seconds}
            stamp()
            results.add(row)
            print(f"{bench.name} {target} {allocation} fine-tuned: {_metrics_text(row)} ({seconds:.0f}s)", flush=True)


def _metrics_text(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {row[k]:.4f}" for k in ("accuracy", "agreement", "kl", "top1", "ppl") if k in row)


# Verdicts ---------------------------------------------------------------------------------------------------
def compare(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Global against uniform at every (model, target, stage) measured for both, by the model's primary metric."""
    out = []
    points = dict.fromkeys((r["model"], r["target"], r["stage"]) for r in records
                           if r["stage"] in ("one-shot", "fine-tuned"))
    for model, target, stage in points:
        rows = {r["allocation"]: r for r in records
                if (r["model"], r.get("target"), r["stage"]) == (model, target, stage)}
        if set(ALLOCATIONS) - set(rows):
            continue
        metric, sign, tie_break = PRIMARY[model]
        glob, uni = rows["global"], rows["uniform"]
        diff = sign * (glob[metric] - uni[metric])
        point = {"model": model, "target": target, "stage": stage, "metric": metric, "global": glob[metric],
                 "uniform": uni[metric]}
        if diff == 0 and tie_break is not None:
            diff = uni[tie_break] - glob[tie_break]
            point.update(tie_break=tie_break, global_tie_break=glob[tie_break], uniform_tie_break=uni[tie_break])
        point["winner"] = "global" if diff > 0 else "uniform" if diff < 0 else "tie"
        one_shot = {r["allocation"]: r for r in records if (r["model"], r.get("target"), r["stage"])
                    == (model, target, "one-shot")}
        point["flops"] = {a: one_shot[a]["flops_ratio"] for a in ALLOCATIONS if a in one_shot}
        out.append(point)
    order = {m: i for i, m in enumerate(MODELS)}
    return sorted(out, key=lambda c: (order.get(c["model"], len(order)), -c["target"], c["stage"] != "one-shot"))


def minilm_goal(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """MiniLM one-shot at FLOPs keep 0.5 (global, the default allocation): accuracy points below dense."""
    target, points = MINILM_GOAL
    dense = next((r for r in records if r["model"] == "minilm" and r["stage"] == "dense"), None)
    ours = next((r for r in records if (r["model"], r.get("target"), r.get("allocation"), r["stage"])
                 == ("minilm", target, "global", "one-shot")), None)
    if dense is None or ours is None:
        return None
    gap = 100 * (dense["accuracy"] - ours["accuracy"])
    return {"target": target, "gap_points": gap, "limit_points": points, "met": gap <= points,
            "accuracy": ours["accuracy"], "dense_accuracy": dense["accuracy"], "flops": ours["flops_ratio"]}


# Report -----------------------------------------------------------------------------------------------------
def _cell(row: dict[str, Any] | None, key: str, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    if row is None or key not in row:
        return "-"
    return fmt.format(scale * row[key])


def _latency_cell(row: dict[str, Any] | None) -> str:
    lat = (row or {}).get("latency")
    if not lat:
        return "-"
    return f"{lat['speedup']:.2f} ({lat['speedup_q25']:.2f}-{lat['speedup_q75']:.2f})"


def model_table(model: str, records: Sequence[dict[str, Any]]) -> str:
    """One row per dense / (target, allocation): achieved ratios, metrics one-shot and fine-tuned, speedup."""
    mine = [r for r in records if r["model"] == model]
    if model == "minilm":
        metrics = [("accuracy %", "accuracy", 100, "{:.1f}"), ("agreement %", "agreement", 100, "{:.1f}"),
                   ("KL", "kl", 1, "{:.4f}")]
    elif model == "efficientnet":
        metrics = [("top-1 %", "top1", 100, "{:.1f}")]
    else:
        metrics = [("perplexity", "ppl", 1, "{:.2f}")]
    rows = []
    dense = next((r for r in mine if r["stage"] == "dense"), None)
    if dense:
        row = {"target": "dense", "allocation": "-", "flops": "1.000", "params": "1.000", "speedup": "1"}
        for header, key, scale, fmt in metrics:
            row[f"{header} one-shot"] = _cell(dense, key, scale, fmt)
            row[f"{header} fine-tuned"] = "-"
        rows.append(row)
    for target in sorted({r["target"] for r in mine if "target" in r}, reverse=True):
        for allocation in ALLOCATIONS:
            at = {r["stage"]: r for r in mine if (r.get("target"), r.get("allocation")) == (target, allocation)}
            if "infeasible" in at:
                rows.append({"target": f"{target:g}", "allocation": allocation, "flops": "infeasible"})
                continue
            one, tuned = at.get("one-shot"), at.get("fine-tuned")
            if one is None:
                continue
            row = {"target": f"{target:g}", "allocation": allocation, "flops": _cell(one, "flops_ratio"),
                   "params": _cell(one, "params_ratio"), "speedup": _latency_cell(one)}
            for header, key, scale, fmt in metrics:
                row[f"{header} one-shot"] = _cell(one, key, scale, fmt)
                row[f"{header} fine-tuned"] = _cell(tuned, key, scale, fmt)
            rows.append(row)
    columns = [("FLOPs target", "target"), ("allocation", "allocation"), ("achieved FLOPs", "flops"),
               ("params", "params")]
    columns += [(f"{h} {s}", f"{h} {s}") for s in ("one-shot", "fine-tuned") for h, *_ in metrics]
    columns += [("CPU speedup b1 (IQR)", "speedup")]
    return common.markdown_table(rows, columns)


def verdict_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    comparisons = compare(records)
    for c in comparisons:
        metric = c["metric"]
        scale, fmt = (1, "{:.2f}") if metric == "ppl" else (100, "{:.1f}")
        text = (f"- {c['model']}, FLOPs {c['target']:g}, {c['stage']}: {metric} global "
                f"{fmt.format(scale * c['global'])} vs uniform {fmt.format(scale * c['uniform'])}")
        if "tie_break" in c:
            text += (f" (equal; {c['tie_break']} {c['global_tie_break']:.4f} vs {c['uniform_tie_break']:.4f} decides)")
        flops = c.get("flops", {})
        if len(flops) == 2 and abs(flops["global"] - flops["uniform"]) > 0.005:
            text += f" at achieved FLOPs {flops['global']:.3f} vs {flops['uniform']:.3f}"
        verdict = {"global": "global better", "uniform": "**uniform better**"}.get(c["winner"], "tie")
        lines.append(f"{text} -> {verdict}")
    if comparisons:
        wins = sum(c["winner"] == "global" for c in comparisons)
        lines.append(f"- Goal 'global beats uniform at every budget on every model': global better at {wins} of "
                     f"{len(comparisons)} points -> {'met' if wins == len(comparisons) else 'not met'}.")
    dense = next((r for r in records if r["model"] == "minilm" and r["stage"] == "dense"), None)
    if dense and dense.get("accuracy_stderr"):
        n = round(dense["accuracy"] * (1 - dense["accuracy"]) / dense["accuracy_stderr"] ** 2)
        lines.append(f"- MiniLM's accuracy is counted on {n} sentences: one sentence is {100 / n:.3f} points and the "
                     f"standard error of one accuracy is {100 * dense['accuracy_stderr']:.1f} points, so verdicts by "
                     "a few sentences are not significant; KL and agreement with the dense model are the finer "
                     "measure.")
    goal = minilm_goal(records)
    if goal:
        lines.append(f"- Goal 'MiniLM at 2x FLOPs reduction within {goal['limit_points']:g} accuracy point of dense, "
                     f"one-shot': global allocation at FLOPs {goal['target']:g} is {goal['gap_points']:+.1f} points "
                     f"below dense -> {'met' if goal['met'] else 'not met'}.")
    return lines


def _models(records: Sequence[dict[str, Any]]) -> list[str]:
    """The models of the records, in the order of ``MODELS``."""
    present = {r["model"] for r in records}
    return [m for m in MODELS if m in present] + sorted(present - set(MODELS))


def report(data: dict[str, Any], png: Path | None) -> str:
    records, meta = data["records"], data["meta"]
    threads = meta.get("latency_threads", meta.get("threads"))
    lines = ["## Budgets: FLOPs targets, uniform vs global allocation", "",
             "`PrunerConfig(flops_keep_ratio=t, allocation=a)` with the library defaults otherwise (i-SpaSP, "
             "l2 proxy, validated re-fit). `uniform` keeps the same fraction of every block (the largest meeting "
             "the target); `global` spreads the target over the blocks by water-filling on each block's "
             "residual-vs-width curve (`hf_ispasp.allocation`). FLOPs are torch's FlopCounterMode at the adapter's "
             "reference input (one sequence of 128 tokens; one image at the model's resolution), achieved = after "
             f"compaction. CPU speedup: batch 1 at the same reference input, {threads} torch thread(s), dense and "
             f"pruned timed in {meta.get('latency_pairs')} interleaved pairs "
             "(`hf_ispasp.metrics.latency_ratio`), median of the per-pair ratios with the inter-quartile range; the "
             "machine was shared with other jobs, so only the ratios mean anything. Metrics one-shot and after the "
             "short fine-tune named below (same recipe, seed and steps for both allocations)."
             + (" Latency was timed after the runs on the dense model cut to each point's recorded widths "
                "(`--latency-only`: speed depends on the widths only; the FLOPs of the cut model equal the pruned "
                "model's)." if any("flops_ratio" in (r.get("latency") or {}) for r in records) else ""), ""]
    for model in _models(records):
        dense = next((r for r in records if r["model"] == model and r["stage"] == "dense"), {})
        lines += [f"### {LABELS.get(model, model)}", "",
                  f"Calibration: {dense.get('calibration', '?')}. Fine-tune: {dense.get('finetune', '?')}. "
                  f"Test: {dense.get('test', '?')}.", "", model_table(model, records), ""]
    lines += ["### Global against uniform", "", *verdict_lines(records), ""]
    targets = sorted({r["target"] for r in records if "target" in r}, reverse=True)
    for model in _models(records):
        missing = [t for t in targets if not any(r["model"] == model and r.get("target") == t for r in records)]
        if missing:
            lines += [f"Not measured: {model} at FLOPs {', '.join(f'{t:g}' for t in missing)}.", ""]
    if meta.get("notes"):
        lines += [meta["notes"], ""]
    if png is not None and png.exists():
        lines += [f"![kept fraction per block, uniform vs global]({png.name})", "",
                  "Kept fraction of every block (FFN neurons / expansion channels, and attention heads or KV groups) "
                  "per layer, uniform (dashed) against global (solid), per target.", ""]
    commands = "; then ".join(f"`{c}`" for c in meta.get("commands", []))
    lines += [f"Commands: {commands} ({meta.get('wall_s', 0) / 60:.0f} min in all on 2 shared CPU cores); "
              "`--report-only` rebuilds this fragment and the picture from the JSON.", ""]
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Kept fraction per block and layer: a panel per (model, target), uniform dashed, global solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    models = [m for m in _models(records) if any(r["model"] == m and r["stage"] == "one-shot" for r in records)]
    targets = sorted({r["target"] for r in records if r["stage"] == "one-shot"}, reverse=True)
    if not models or not targets:
        return None
    fig, axes = plt.subplots(len(models), len(targets), figsize=(4.2 * len(targets), 3.0 * len(models)),
                             squeeze=False)
    colors = {"ffn": "tab:blue", "heads": "tab:orange"}
    for i, model in enumerate(models):
        dense = next((r for r in records if r["model"] == model and r["stage"] == "dense"), None)
        blocks = (dense or {}).get("blocks", {})
        for j, target in enumerate(targets):
            ax = axes[i][j]
            for allocation, style in (("uniform", "--"), ("global", "-")):
                row = next((r for r in records if (r["model"], r.get("target"), r.get("allocation"), r["stage"])
                            == (model, target, allocation, "one-shot")), None)
                if row is None:
                    continue
                for kind in ("ffn", "heads"):
                    names = sorted((n for n, b in blocks.items() if b["kind"] == kind),
                                   key=lambda n: blocks[n]["layer"])
                    if not names:
                        continue
                    xs = [blocks[n]["layer"] for n in names]
                    ys = [row["widths"].get(n, blocks[n]["groups"]) / blocks[n]["groups"] for n in names]
                    label = f"{allocation} {'FFN' if kind == 'ffn' else 'attention'}"
                    ax.plot(xs, ys, style, marker="o", ms=3, color=colors[kind], label=label)
            ax.set_ylim(0, 1.05)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{model}, FLOPs keep {target:g}", fontsize=9)
            ax.set_xlabel("layer" if model != "efficientnet" else "block", fontsize=8)
            ax.set_ylabel("kept fraction", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish(data: dict[str, Any], output_dir: Path) -> str:
    """Comparisons into ``data``, the picture and the markdown fragment next to the JSON; returns the markdown."""
    data["comparisons"] = compare(data["records"])
    data["minilm_goal"] = minilm_goal(data["records"])
    png = plot(data["records"], Path(output_dir) / f"{NAME}_widths.png")
    text = report(data, png)
    common.write_fragment(output_dir, NAME, text)
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS), help="FLOPs keep ratios")
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep the JSON's records, measure only what is missing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the markdown and the PNG from the JSON")
    parser.add_argument("--minilm-epochs", type=float, default=0.25, help="MiniLM fine-tune, in epochs")
    parser.add_argument("--efficientnet-steps", type=int, default=60,
                        help="EfficientNet fine-tune steps (batch 64; the vision benchmark's recipe)")
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed pairs per round (3 rounds)")
    parser.add_argument("--latency-threads", type=int, default=1, help="torch threads while timing")
    parser.add_argument("--latency-only", action="store_true",
                        help="keep the JSON's records, time every point again from its recorded widths")
    parser.add_argument("--notes", default="", help="a paragraph for the markdown (e.g. what was left out)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    args.targets = [float(t) for t in args.targets.split(",") if t.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.output_dir) / f"{NAME}.json"
    if args.report_only:
        data = json.loads(path.read_text())
        text = finish(data, args.output_dir)
        path.write_text(json.dumps(data, indent=1))
        print(text)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    resume = args.resume or args.latency_only
    before = json.loads(path.read_text())["meta"] if resume and path.exists() else {}
    command = "python benchmarks/budget_allocation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"tiny": args.tiny, "finetune": not args.no_finetune,
            "latency_pairs": 3 * (2 if args.tiny else args.latency_repeats), "latency_threads": args.latency_threads,
            "notes": " ".join(n for n in (before.get("notes", ""), args.notes) if n),
            "commands": [*before.get("commands", []), command.strip()]}
    results = common.Results(args.output_dir, NAME, meta=meta, resume=resume)

    def stamp() -> None:
        results.data["meta"]["wall_s"] = before.get("wall_s", 0.0) + time.perf_counter() - start

    for model in args.models:
        if not args.latency_only:
            measure(SETUPS[model](args), args.targets, args, results, stamp)
        elif any(r["model"] == model for r in results.records):
            retime(SETUPS[model](args), args, results)
        stamp()
        finish(results.data, args.output_dir)  # the fragment and the picture so far, as the JSON
        results.flush()
    text = finish(results.data, args.output_dir)
    results.flush()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
