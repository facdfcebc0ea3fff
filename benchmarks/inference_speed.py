"""Section 6: CPU latency and throughput of compacted MiniLM-L6 against the dense model, next to FLOPs.

Latency depends only on the compacted widths, not on which groups were kept, so the compacted model of
each budget is built by slicing the dense model to the widths ``ISpaSPPruner`` produces (the adapter's
``apply_widths``); the prune itself is timed in ``pruning_speed.py``. Dense and compacted run interleaved
in the same process, call by call (``hf_ispasp.metrics.latency_ratio``: the speedup is the median of the
per-pair ratios, with its inter-quartile range). When the speedup at FFN 0.5 / heads 0.75 is
below 85% of the FLOPs reduction, a torch profile of both models says where the time goes.

    python benchmarks/inference_speed.py [--threads 1] [--tiny] [--output-dir DIR]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from hf_ispasp import adapter_for  # noqa: E402
from hf_ispasp.config import kept_count  # noqa: E402
from hf_ispasp.metrics import count_flops, latency_ratio  # noqa: E402

NAME = "inference_speed"
MAIN = (0.5, 0.75)
SEQ = 128


def compacted(model: Any, ffn: float, heads: float) -> Any:
    """A copy of ``model`` with the widths a prune at (ffn, heads) gives (group identity is irrelevant here)."""
    out = copy.deepcopy(model).eval()
    adapter = adapter_for(out)
    record = adapter.widths()
    record["ffn"] = [kept_count(w, ffn) for w in record["ffn"]]
    record["heads"] = [kept_count(h, heads) for h in record["heads"]]
    adapter.apply_widths(record)
    return out


def profile_ops(model: Any, inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Self CPU time (ms per forward) by operator group."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(**inputs)
    groups: dict[str, float] = {}
    for evt in prof.key_averages():
        name = evt.key
        if name in ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm"):
            key = "matmul (linear layers)"
        elif "attention" in name or "sdpa" in name or "softmax" in name:
            key = "attention kernel (sdpa)"
        elif name in ("aten::layer_norm", "aten::native_layer_norm"):
            key = "layer norm"
        elif name in ("aten::gelu",):
            key = "gelu"
        elif name in ("aten::embedding", "aten::index_select"):
            key = "embeddings"
        elif name.startswith("aten::add") or name.startswith("aten::mul") or name.startswith("aten::div"):
            key = "elementwise add/mul"
        elif name in ("aten::view", "aten::transpose", "aten::permute", "aten::reshape", "aten::contiguous",
                      "aten::copy_", "aten::clone", "aten::t", "aten::expand", "aten::to", "aten::_to_copy",
                      "aten::slice", "aten::select", "aten::unsqueeze", "aten::empty", "aten::as_strided"):
            key = "layout/copies"
        else:
            key = "other"
        groups[key] = groups.get(key, 0.0) + evt.self_cpu_time_total / 1000 / repeats
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def run(task_model: Any, tiny: bool, results: common.Results, repeats: int) -> None:
    dense = task_model.eval()
    budgets = [MAIN] if tiny else [MAIN] + [b for b in common.BUDGETS if b != MAIN]
    inputs = {b: common.example_inputs(tiny, b, SEQ if not tiny else 16) for b in (1, 32)}
    dense_flops = count_flops(dense, inputs[1])
    for ffn, heads in budgets:
        model = compacted(dense, ffn, heads)
        flops = count_flops(model, inputs[1])
        record: dict[str, Any] = {"ffn_keep": ffn, "head_keep": heads, "flops_ratio": flops / dense_flops}
        for batch in (1, 32):
            reps = repeats if batch == 1 else max(2, repeats // 4)
            lat = latency_ratio(dense, model, inputs[batch], repeats=reps, rounds=3)
            record[f"b{batch}_dense_ms"] = 1000 * lat.baseline_s
            record[f"b{batch}_pruned_ms"] = 1000 * lat.candidate_s
            record[f"b{batch}_speedup"] = lat.speedup
            for key in ("speedup_q25", "speedup_q75", "speedup_min", "speedup_max", "pairs"):
                record[f"b{batch}_{key}"] = getattr(lat, key)
        record["throughput_dense_seq_s"] = 32 / (record["b32_dense_ms"] / 1000)
        record["throughput_pruned_seq_s"] = 32 / (record["b32_pruned_ms"] / 1000)
        record["flops_speedup"] = dense_flops / flops
        record["b32_speedup_over_flops_speedup"] = record["b32_speedup"] / record["flops_speedup"]
        results.add(record)
        print(f"{ffn}/{heads}: flops x{record['flops_speedup']:.2f}, b1 x{record['b1_speedup']:.2f}, "
              f"b32 x{record['b32_speedup']:.2f}", flush=True)
        if (ffn, heads) == MAIN:
            low = min(record["b1_speedup"], record["b32_speedup"]) < 0.85 * record["flops_speedup"]
            if low or tiny:
                prof = {"dense": profile_ops(dense, inputs[32], 2), "pruned": profile_ops(model, inputs[32], 2)}
                results.set("profile_main_budget_batch32_ms", prof)
                b1 = {"dense": profile_ops(dense, inputs[1], 10), "pruned": profile_ops(model, inputs[1], 10)}
                results.set("profile_main_budget_batch1_ms", b1)


def _speedup(record: dict[str, Any], batch: int) -> str:
    """Median per-pair speedup and its inter-quartile range (records from before the IQR show the median only)."""
    text = f"{record[f'b{batch}_speedup']:.2f}"
    if f"b{batch}_speedup_q25" in record:
        text += f" ({record[f'b{batch}_speedup_q25']:.2f}-{record[f'b{batch}_speedup_q75']:.2f})"
    return text


def report(results: common.Results) -> str:
    rows = [{
        "budget": f"{r['ffn_keep']}/{r['head_keep']}", "flops": f"{r['flops_ratio']:.3f}",
        "flops_speedup": f"{r['flops_speedup']:.2f}",
        "b1": f"{r['b1_dense_ms']:.1f} → {r['b1_pruned_ms']:.1f}", "b1s": _speedup(r, 1),
        "b32": f"{r['b32_dense_ms']:.0f} → {r['b32_pruned_ms']:.0f}", "b32s": _speedup(r, 32),
        "tput": f"{r['throughput_dense_seq_s']:.0f} → {r['throughput_pruned_seq_s']:.0f}",
        "frac": f"{100 * r['b32_speedup_over_flops_speedup']:.0f}%",
    } for r in results.records]
    meta = results.data["meta"]
    lines = [
        "## Inference speed of the compacted model (CPU)",
        "",
        f"MiniLM-L6 sequence classifier, sequence length {SEQ}, {meta.get('threads')} torch thread(s), dense and "
        "compacted timed interleaved call by call in the same process (which model goes first alternates); "
        "speedup = median of the per-pair ratios (inter-quartile range in brackets); the machine is "
        "shared with other jobs, so only the ratios mean something. FLOPs per sequence from torch's "
        "FlopCounterMode. 'of FLOPs' = measured batch-32 speedup / FLOPs speedup (target: >= 85% at 0.5/0.75).",
        "",
        common.markdown_table(rows, [
            ("FFN/heads keep", "budget"), ("FLOPs ratio", "flops"), ("FLOPs speedup", "flops_speedup"),
            ("batch 1 ms", "b1"), ("batch 1 speedup", "b1s"), ("batch 32 ms", "b32"), ("batch 32 speedup", "b32s"),
            ("throughput seq/s", "tput"), ("of FLOPs", "frac")]),
        "",
    ]
    for key, label in (("profile_main_budget_batch32_ms", "batch 32"), ("profile_main_budget_batch1_ms", "batch 1")):
        prof = results.data.get(key)
        if not prof:
            continue
        names = list(prof["dense"])
        rows = [{"op": n, "dense": prof["dense"].get(n, 0.0), "pruned": prof["pruned"].get(n, 0.0),
                 "ratio": f"{prof['dense'].get(n, 0.0) / max(prof['pruned'].get(n, 1e-9), 1e-9):.2f}"} for n in names]
        lines += [f"### Where the time goes at FFN 0.5 / heads 0.75, {label} (self CPU ms per forward)", "",
                  common.markdown_table(rows, [("operator group", "op"), ("dense ms", "dense"),
                                               ("compacted ms", "pruned"), ("speedup", "ratio")]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tiny:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            common.tiny_model_folder(Path(args.output_dir) / "tiny-bert"))
        repeats = 2
    else:
        from transformers import AutoModelForSequenceClassification

        from demo import recipes

        model = AutoModelForSequenceClassification.from_pretrained(recipes.finetuned_minilm_polarity())
        repeats = args.repeats
    results = common.Results(args.output_dir, NAME, {"tiny": args.tiny, "seq": SEQ})
    run(model, args.tiny, results, repeats)
    text = report(results)
    common.write_fragment(args.output_dir, NAME, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
