"""Assemble BENCHMARKS.md from the markdown fragments in ``benchmarks/results/`` (no benchmark is re-run).

    python benchmarks/make_report.py                      # writes BENCHMARKS.md at the repository root
    python benchmarks/make_report.py --results-dir DIR --output FILE

Fragments appear in a fixed order (known sections first, then any other ``*.md`` alphabetically, e.g. the
``vision_*.md`` fragments); a missing fragment is listed as not run. Image links inside a fragment are
rewritten relative to the output file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ("random", "weight_magnitude", "activation", "taylor", "output_energy")
ORDER = [
    ("summary", "Summary and chosen defaults"),
    ("synthetic", "1. The paper's synthetic experiment"),
    ("selection_rules", "3. Selection rules on a real model"),
    ("calibration_size", "Calibration-set size and the validated re-fit"),
    ("selection_precision", "Selection precision: float64, auto and float32"),
    ("finetune_recovery", "Fine-tuning recovery"),
    ("peer_torch_pruning", "4. Torch-Pruning side by side"),
    ("pruning_speed", "5. Pruning speed and scaling"),
    ("inference_speed", "6. Inference speed"),
    ("onnx_latency", "6b. ONNX export and onnxruntime latency"),
    ("load_memory", "6c. Memory of loading a pruned checkpoint"),
    ("train_decoders", "7. Decoders trained here from scratch"),
    ("decoder_perplexity", "8. Decoder LLMs: perplexity against the LLM pruning methods"),
    ("peer_torch_pruning_llm", "9. Torch-Pruning on the decoders"),
    ("budget_allocation", "10. Budgets: FLOPs targets, uniform vs global allocation"),
    ("gradual_pruning", "11. Gradual pruning with PruningCallback"),
]
COMMANDS = """\
Reproduce everything (about 1-2 hours on 2 CPU cores; each script also runs alone and writes
`benchmarks/results/<name>.json` and `<name>.md`):

```bash
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python benchmarks/run_all.py            # every benchmark, one after the other, then this report
python benchmarks/make_report.py        # only re-assemble BENCHMARKS.md from the fragments
```
"""


def _json(results_dir: Path, name: str) -> dict | None:
    path = results_dir / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def summary(results_dir: Path) -> str:
    """The targets of the benchmark issue, checked against the JSON results (computed, never typed in)."""
    lines = ["## Summary: targets and defaults", ""]
    rules = _json(results_dir, "selection_rules")
    if rules and rules.get("records"):
        recs = rules["records"]
        dense = rules["meta"]["dense"]
        default = ("ispasp l2/refit", True)
        budgets = sorted({(r["ffn_keep"], r["head_keep"]) for r in recs}, key=lambda b: (-b[0], -b[1]))
        wins, total = 0, 0
        for b in budgets:
            rows = [r for r in recs if (r["ffn_keep"], r["head_keep"]) == b]
            ours = next((r for r in rows if (r["rule"], r["refit"]) == default), None)
            base = [r for r in rows if r["rule"] in BASELINES]
            if ours and base:
                total += 1
                wins += int(ours["kl"] < min(r["kl"] for r in base))
        lines.append(f"- Current default (i-SpaSP, l2 proxy, re-fit threshold, re-fit) has a lower KL than every "
                     f"baseline rule of the engine at {wins} of {total} budgets measured.")
        main = [r for r in recs if (r["ffn_keep"], r["head_keep"]) == (0.5, 0.75)]
        if main:
            best = min(main, key=lambda r: r["kl"])
            label = best["rule"] + (" + re-fit" if best["refit"] else "")
            lines.append(f"- Lowest KL at FFN 0.5 / heads 0.75: {label} "
                         f"(KL {best['kl']:.4f}, accuracy {100 * best['accuracy']:.1f} vs dense "
                         f"{100 * dense['accuracy']:.1f}).")
            ours = next((r for r in main if (r["rule"], r["refit"]) == default), None)
            if ours:
                gap = 100 * (dense["accuracy"] - ours["accuracy"])
                lines.append(f"- Target 'one-shot within 3 points of dense at 0.5/0.75': default is {gap:+.1f} points "
                             f"below dense -> {'met' if gap <= 3 else 'not met'}.")
        ft = {r["rule"]: r for r in rules.get("finetune", [])}
        if "dense" in ft and default[0] in ft:
            gap = 100 * (ft["dense"]["accuracy"] - ft[default[0]]["accuracy"])
            gap0 = 100 * (dense["accuracy"] - ft[default[0]]["accuracy"])
            lines.append(f"- Target 'within 1 point after a 1-epoch fine-tune': {gap0:+.1f} points below the original "
                         f"dense model -> {'met' if gap0 <= 1 else 'not met'}; {gap:+.1f} points below the dense "
                         f"model fine-tuned for the same extra epoch -> {'met' if gap <= 1 else 'not met'}.")
    sizes = _json(results_dir, "calibration_size")
    if sizes and sizes.get("records"):
        by = {(r["sequences"], r["variant"]): r for r in sizes["records"]}
        default, plain = "validated re-fit (default)", "same selection, no re-fit"
        small, ref = by.get((32, default)), by.get((512, default))
        if small and ref:
            gap, ratio = 100 * (ref["accuracy"] - small["accuracy"]), small["kl"] / max(ref["kl"], 1e-12)
            met = abs(gap) <= 1 and ratio <= 1.5
            lines.append(f"- Target 'from 32 calibration sequences within 1 point and 1.5x the KL of 512': "
                         f"32 is {gap:.1f} points below, {ratio:.2f}x the KL -> {'met' if met else 'not met'}.")
        worse = [n for (n, v), r in by.items() if v == default and (n, plain) in by
                 and (r["kl"] > by[(n, plain)]["kl"] or r["accuracy"] < by[(n, plain)]["accuracy"])]
        lines.append("- Target 'the validated re-fit never worse than the same selection without re-fit': "
                     + ("met at every calibration size." if not worse else f"not met at {sorted(worse)} sequences."))
    peer = _json(results_dir, "peer_torch_pruning")
    if peer and peer.get("records"):
        for b in sorted({(r["ffn_keep"], r["head_keep"]) for r in peer["records"]}):
            rows = [r for r in peer["records"] if (r["ffn_keep"], r["head_keep"]) == b]
            ours = next((r for r in rows if r["method"].startswith("hf_ispasp default")), None)
            tps = [r for r in rows if r["method"].startswith("Torch-Pruning")]
            if ours and tps:
                best = min(tps, key=lambda r: r["kl"])
                lines.append(f"- Torch-Pruning at {b[0]}/{b[1]}: best is {best['method']} (KL {best['kl']:.4f}, "
                             f"{100 * best['accuracy']:.1f}%, {best['seconds']:.1f}s) vs hf_ispasp default "
                             f"(KL {ours['kl']:.4f}, {100 * ours['accuracy']:.1f}%, {ours['seconds']:.1f}s).")
    speed = _json(results_dir, "pruning_speed")
    if speed and speed.get("records"):
        ratios = ", ".join(f"{r['calibration_sequences']}: {r['ratio']:.1f}x" for r in speed["records"])
        worst = max(r["ratio"] for r in speed["records"])
        lines.append(f"- Target 'pruning time at most 3x one calibration forward pass': {ratios} -> "
                     f"{'met' if worst <= 3 else 'not met'}.")
    inf = _json(results_dir, "inference_speed")
    if inf and inf.get("records"):
        main = next((r for r in inf["records"] if (r["ffn_keep"], r["head_keep"]) == (0.5, 0.75)), None)
        if main:
            frac = min(main["b1_speedup"], main["b32_speedup"]) / main["flops_speedup"]
            lines.append("- Target 'speedup >= 85% of the FLOPs reduction at 0.5/0.75': "
                         f"FLOPs x{main['flops_speedup']:.2f}, "
                         f"batch 1 x{main['b1_speedup']:.2f}, batch 32 x{main['b32_speedup']:.2f} ({100 * frac:.0f}% "
                         f"for the worse of the two) -> {'met' if frac >= 0.85 else 'not met'}.")
    gradual = {r["method"].split(" (")[0]: r for r in (_json(results_dir, "gradual_pruning") or {}).get("records", [])}
    if "gradual" in gradual and "one-shot + fine-tune" in gradual:
        a, b = gradual["one-shot + fine-tune"], gradual["gradual"]
        lines.append(f"- Gradual pruning (PruningCallback, 3 prunes in the 1-epoch fine-tune) vs one-shot + the same "
                     f"fine-tune at 0.5/0.75: accuracy {100 * b['accuracy']:.1f}% vs {100 * a['accuracy']:.1f}%, KL "
                     f"{b['kl']:.4f} vs {a['kl']:.4f}, wall time {b['seconds']:.0f} s vs {a['seconds']:.0f} s.")
    lines += _onnx_summary(results_dir)
    lines += _load_summary(results_dir)
    lines += _decoder_summary(results_dir)
    lines += _budget_summary(results_dir)
    lines += _cpu_engine_summary(results_dir)
    lines += _gpu_summary(results_dir)
    return "\n".join(lines) if len(lines) > 2 else ""


def _cpu_engine_summary(results_dir: Path) -> list[str]:
    """The engine's CPU targets (MiniLM-L6, 2 threads): prune / one dense forward at 512 and 128 sentences."""
    limits = {512: 2.0, 128: 3.0}
    rows, others = [], []
    for sequences in limits:
        data = _json(results_dir, f"engine_shapes_cpu_minilm{sequences}")
        current = [r for r in (data or {}).get("records", []) if r.get("engine") == "current"]
        rows += [r for r in current if r.get("config", "default") == "default"]
        others += [r for r in current if r.get("config", "default") != "default"]
    if not rows:
        return []
    cells = [f"{r['sequences']} sentences {r['ratio']:.1f}x (target <= {limits[r['sequences']]}x)" for r in rows]
    met = all(r["ratio"] <= limits[r["sequences"]] for r in rows)
    lines = [f"- Engine on the CPU (MiniLM-L6, 2 threads), prune / one dense forward: {', '.join(cells)} -> "
             f"{'met' if met else 'not met'}."]
    if others:
        lines.append("  Other configs in the same runs: " + ", ".join(
            f"{r['config']} {r['ratio']:.1f}x at {r['sequences']} sentences" for r in others) + ".")
    memory = [r for r in rows if "bound_mb" in r and "peak_extra_allocated_mb" in r]
    if memory:
        cells = [f"{r['peak_extra_allocated_mb']:.0f} MB at {r['sequences']} sentences (bound {r['bound_mb']:.0f} MB)"
                 for r in memory]
        met = all(r["peak_extra_allocated_mb"] <= r["bound_mb"] for r in memory)
        lines.append(f"- Engine memory on the CPU (MiniLM-L6, model {memory[0]['model_mb']:.0f} MB), peak extra "
                     "tensor memory of a prune vs one layer + statistics + activation cache + the returned model: "
                     f"{', '.join(cells)} -> {'met' if met else 'not met'}.")
    return lines


def _gpu_summary(results_dir: Path) -> list[str]:
    """The engine's GPU targets: prune / dense forward at BERT-base width, the 7B-shaped decoder's wall time."""
    lines = []
    limits = {"float32": 3, "bfloat16": 10}
    for name, shape, label in (("engine_shapes_gpu", "bert-base", "BERT-base"),
                               ("engine_shapes_gpu_large", "bert-large", "BERT-large")):
        rows = [r for r in (_json(results_dir, name) or {}).get("records", [])
                if r.get("engine") == "current" and r["shape"] == shape and r["dtype"] in limits]
        if rows:
            cells = [f"{r['dtype']} {r['ratio']:.1f}x (target <= {limits[r['dtype']]}x)" for r in rows]
            met = all(r["ratio"] <= limits[r["dtype"]] for r in rows)
            lines.append(f"- Engine on a GPU ({rows[0].get('card', 'GPU')}), {label} shape, prune / one dense "
                         f"forward: {', '.join(cells)} -> {'met' if met else 'not met'}.")
    big = _json(results_dir, "engine_shapes_gpu_llama7b")
    for r in (big or {}).get("records", []):
        verdict = "met" if r["prune_s"] < 120 else "not met"
        shape = f"{r['dtype']}, {r['sequences']} x {r['length']} tokens"
        lines.append(f"- Decoder goal 'GPU prune of the LLaMA-7B shape ({shape}) under 2 minutes': "
                     f"{r['prune_s']:.1f} s ({r['ratio']:.1f}x one dense forward) on one "
                     f"{r.get('card', 'GPU')} -> {verdict}.")
    return lines


def _onnx_summary(results_dir: Path) -> list[str]:
    """Issue 10's serving point: onnxruntime equals PyTorch, and the dense/compacted latency ratio (from the JSON)."""
    data = _json(results_dir, "onnx_latency")
    if not data or not data.get("records"):
        return []
    recs = data["records"]
    cells = "; ".join(f"{r['model']} batch {r['batch']} x{r['speedup']:.2f} (IQR {r['speedup_q25']:.2f}-"
                      f"{r['speedup_q75']:.2f})" for r in recs)
    worst = max(max(r["dense_max_abs_diff"], r["pruned_max_abs_diff"]) for r in recs)
    matches = all(r["checks_ok"] for r in recs)
    return [f"- ONNX export at 0.5/0.75, onnxruntime CPU speedup compacted vs dense: {cells}. onnxruntime outputs "
            f"{'match' if matches else 'do NOT match'} PyTorch on every timed batch (max abs difference "
            f"{worst:.1e})."]


def _load_summary(results_dir: Path) -> list[str]:
    """Issue 10's loading point: peak memory of ``load_pruned`` <= 1.2x the pruned model (from the JSON)."""
    data = _json(results_dir, "load_memory")
    recs = [r for r in (data or {}).get("records", []) if r["method"] == "load_pruned"]
    if not recs:
        return []
    worst = max(r["ratio"] for r in recs)
    cells = "; ".join(f"{r['model']} {r['ratio']:.2f}x" for r in recs)
    return [f"- Peak memory of `load_pruned` against the pruned model's size: {cells} -> target '<= 1.2x' "
            f"{'met' if worst <= 1.2 else 'not met'}."]


def _decoder_summary(results_dir: Path) -> list[str]:
    """Issue 9's goal: the default rule has the lowest one-shot perplexity at every budget (from the JSON)."""
    data = _json(results_dir, "decoder_perplexity")
    if not data or not data.get("records"):
        return []
    lines = []
    one_shot = [r for r in data["records"] if r.get("stage") == "one-shot"]
    for kind in dict.fromkeys(r["model"] for r in one_shot):
        rows = [r for r in one_shot if r["model"] == kind]
        cells = []
        for target in sorted({r["target"] for r in rows}):
            at = [r for r in rows if r["target"] == target]
            ours = next((r for r in at if r["rule"] == "i-SpaSP (default)"), None)
            peers = [r for r in at if not r["rule"].startswith("i-SpaSP")]
            if ours and peers:
                best = min(peers, key=lambda r: r["ppl"])
                cells.append(f"{100 * target:.0f}%: {ours['ppl']:.1f} vs {best['rule']} {best['ppl']:.1f}"
                             f" ({'lowest' if ours['ppl'] < best['ppl'] else 'not lowest'})")
        if cells:
            lines.append(f"- Decoder goal 'default rule lowest one-shot perplexity at every budget' ({kind}): "
                         + "; ".join(cells) + ".")
    return lines


def _budget_summary(results_dir: Path) -> list[str]:
    """Issue 11's goals: global beats uniform at every budget on every model (the script's per-point comparisons,
    computed from its records), and MiniLM at FLOPs keep 0.5 one-shot within 1 accuracy point of dense."""
    data = _json(results_dir, "budget_allocation")
    comparisons = (data or {}).get("comparisons") or []
    if not comparisons:
        return []
    lines = []
    for stage in ("one-shot", "fine-tuned"):
        at = [c for c in comparisons if c["stage"] == stage]
        if not at:
            continue
        lost = [f"{c['model']} {c['target']:g}" + (" (tie)" if c["winner"] == "tie" else "")
                for c in at if c["winner"] != "global"]
        missing = [m for m in ("minilm", "efficientnet", "llama") if m not in {c["model"] for c in at}]
        verdict = "not met" if lost else "met so far" if missing else "met"
        lines.append(f"- Budgets, goal 'global allocation beats uniform at every FLOPs target on every model' "
                     f"({stage}): global better at {len(at) - len(lost)} of {len(at)} points"
                     + (f", not at {', '.join(lost)}" if lost else "")
                     + (f"; not measured yet: {', '.join(missing)}" if missing else "") + f" -> {verdict}.")
    goal = data.get("minilm_goal")  # computed by the benchmark script (budget_allocation.minilm_goal)
    if goal:
        lines.append(f"- Budgets, goal 'MiniLM at FLOPs keep {goal['target']:g} (global) within "
                     f"{goal['limit_points']:g} accuracy point of dense, one-shot': {100 * goal['accuracy']:.1f}% vs "
                     f"{100 * goal['dense_accuracy']:.1f}% ({goal['gap_points']:+.1f} points, achieved FLOPs "
                     f"{goal['flops']:.3f}) -> {'met' if goal['met'] else 'not met'}.")
    return lines


def assemble(results_dir: Path, output: Path) -> str:
    fragments = {p.stem: p for p in sorted(results_dir.glob("*.md"))}
    known = [name for name, _ in ORDER]
    names = known + sorted(n for n in fragments if n not in known)
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/make_report.py` from the fragments in `benchmarks/results/` "
        f"({time.strftime('%Y-%m-%d')}). Every number below comes from a script in `benchmarks/` that writes "
        "the JSON next to its fragment.",
        "",
        COMMANDS,
        summary(results_dir),
        "",
    ]
    missing = []
    for name in names:
        path = fragments.get(name)
        if path is None:
            if name != "summary":
                missing.append(name)
            continue
        text = path.read_text().strip()
        parts += [_relink(text, results_dir, output.parent), ""]
    if missing:
        parts += ["## Not run yet", "", "No fragment for: " + ", ".join(f"`{m}`" for m in missing) + ".", ""]
    body = "\n".join(parts).rstrip() + "\n"
    output.write_text(body)
    return body


def _relink(text: str, results_dir: Path, out_dir: Path) -> str:
    """Point relative image / link targets of a fragment at the same files from the output's folder."""

    def fix(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z]+://", target) or target.startswith(("/", "#")):
            return match.group(0)
        rel = os.path.relpath(results_dir / target, out_dir)
        return f"{match.group(1)}({rel})"

    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", fix, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    assemble(args.results_dir, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
