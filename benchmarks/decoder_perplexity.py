"""Decoder LLMs: held-out perplexity of i-SpaSP against the selection rules of the LLM pruning methods, at the same
widths, one-shot and after a short distillation fine-tune; pruning time and peak memory on the CPU.

The models are the LLaMA-style (grouped-query attention) and GPT-2 decoders trained from scratch on the Wikipedia
excerpt (``benchmarks/train_decoders.py``, cached). Every rule gets the same 128 calibration chunks of 128 tokens
from the training split; perplexity is measured on the first 200 chunks (25,600 tokens) of the held-out test
split. Budgets are fractions of the layer parameters removed (about 20%, 35%, 50%): whole KV groups (LLaMA; GPT-2:
heads) at the ratio nearest to the budget, and the FFN keep ratio that brings the layer parameters to the target.

The peers' rules run without our least-squares re-fit, as in their papers (FLAP keeps its own bias compensation);
i-SpaSP is shown with and without it.

    python benchmarks/decoder_perplexity.py [--models llama gpt2] [--no-finetune] [--no-timing] [--tiny]
    python benchmarks/decoder_perplexity.py --timing-only   # time and memory again, on a quiet machine
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from demo import lm  # noqa: E402
from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for  # noqa: E402
from hf_ispasp.budget import uniform_compaction  # noqa: E402
from hf_ispasp.metrics import count_parameters  # noqa: E402

NAME = "decoder_perplexity"
TARGETS = (0.2, 0.35, 0.5)
DEFAULT = "i-SpaSP (default)"
RULES: dict[str, dict[str, Any]] = {
    DEFAULT: {},
    "i-SpaSP, no re-fit": {"refit": False},
    "weight magnitude": {"selection": "weight_magnitude", "refit": False},
    "Wanda-sp": {"selection": "wanda_sp", "refit": False},
    "FLAP (fluctuation + bias compensation)": {"selection": "flap", "refit": False},
    "LLM-Pruner (first-order Taylor, LM loss)": {"selection": "llm_pruner", "refit": False},
}
CALIBRATION = 128
BATCH = 16
TEST_CHUNKS = 200  # 25,600 held-out tokens
FINETUNE_STEPS = 80


def layer_params_after(model: Any, ffn_keep: float, head_keep: float) -> int:
    """Layer parameters once every block keeps the budgeted count (a weight-free compaction of a copy)."""
    return count_parameters(list(adapter_for(uniform_compaction(model, ffn_keep, head_keep)).layers()))


def widths_for(model: Any, target: float) -> tuple[float, float]:
    """(ffn_keep, head_keep) removing about ``target`` of the layer parameters."""
    adapter = adapter_for(model)
    heads = adapter.blocks(0)[0].num_groups
    head_keep = max(1, round((1 - target) * heads)) / heads
    dense = count_parameters(list(adapter.layers()))
    low, high = 0.0, 1.0
    for _ in range(14):  # bisection on the FFN ratio; the count is monotone in it
        mid = (low + high) / 2
        if layer_params_after(model, mid, head_keep) > (1 - target) * dense:
            high = mid
        else:
            low = mid
    return round(high, 4), head_keep


def targets(tiny: bool) -> tuple[float, ...]:
    return (TARGETS[0], TARGETS[-1]) if tiny else TARGETS


def _train_chunks(tokenizer: Any, tiny: bool) -> tuple[Any, Any]:
    """Calibration chunks, and the fine-tuning chunks after them (the training split is tokenized once)."""
    train = lm.lm_dataset("train", tokenizer, 32 if tiny else 128)
    calibration = train.select(range(16 if tiny else CALIBRATION))
    rest = train.select(range(len(calibration), min(len(train), len(calibration) + (64 if tiny else
                                                                                   FINETUNE_STEPS * BATCH))))
    return calibration, rest


def _batches(data: Any) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.as_tensor(v) for k, v in data[i : i + BATCH].items()} for i in range(0, len(data), BATCH)]


def _load(kind: str, tiny: bool) -> tuple[Any, Any, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = lm.trained_decoder(kind, tiny=tiny)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    # transformers 5.24 does not infer the causal-LM loss from "GPT2LMHeadModel" (its Trainer loss would count the
    # unshifted labels); demo/lm.py trains with the same setting.
    model.loss_type = "ForCausalLM"
    return model, AutoTokenizer.from_pretrained(folder), folder


def _finetune(student: Any, teacher: Any, train: Any, tiny: bool, work: Path) -> Any:
    """A short fine-tune with logit distillation from the dense model (same schedule for every rule)."""
    from transformers import TrainingArguments, default_data_collator

    from hf_ispasp.training import DistillationArguments, DistillationTrainer

    args = TrainingArguments(
        output_dir=str(work), max_steps=4 if tiny else FINETUNE_STEPS, per_device_train_batch_size=BATCH,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0 if tiny else FINETUNE_STEPS // 10,
        weight_decay=0.0, logging_steps=50,
        save_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=True, disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student, args=args, teacher_model=teacher, train_dataset=train,
        distillation=DistillationArguments(distill_weight=0.5, temperature=2.0), data_collator=default_data_collator,
    )
    trainer.train()
    return student.eval()


def measure_model(kind: str, tiny: bool, finetune: bool, results: common.Results) -> None:
    model, tokenizer, folder = _load(kind, tiny)
    seq = 32 if tiny else 128
    calibration, train = _train_chunks(tokenizer, tiny)
    test = lm.lm_dataset("test", tokenizer, seq, max_chunks=16 if tiny else TEST_CHUNKS)
    batches = _batches(calibration)
    dense_ppl = lm.perplexity(model, test)
    dense_layers = count_parameters(list(adapter_for(model).layers()))
    results.add({"model": kind, "rule": "dense", "target": 0.0, "ppl": dense_ppl, "params": count_parameters(model),
                 "layer_params_removed": 0.0, "folder": str(folder), "test_tokens": len(test) * seq})
    print(f"{kind}: dense perplexity {dense_ppl:.2f}", flush=True)
    for target in targets(tiny):
        ffn_keep, head_keep = widths_for(model, target)
        one_shot: dict[str, tuple[float, Any]] = {}
        for rule, extra in RULES.items():
            config = PrunerConfig(ffn_keep_ratio=ffn_keep, head_keep_ratio=head_keep, show_progress=False, **extra)
            start = time.perf_counter()
            pruned = ISpaSPPruner(model, config).prune(batches)
            seconds = time.perf_counter() - start
            ppl = lm.perplexity(pruned, test)
            removed = 1 - count_parameters(list(adapter_for(pruned).layers())) / dense_layers
            one_shot[rule] = (ppl, pruned)
            results.add({"model": kind, "rule": rule, "target": target, "ffn_keep": ffn_keep, "head_keep": head_keep,
                         "layer_params_removed": removed, "ppl": ppl, "stage": "one-shot", "prune_s": seconds,
                         "params": count_parameters(pruned), "widths": adapter_for(pruned).widths()})
            print(f"{kind} {target:.2f} {rule}: {ppl:.2f} ({seconds:.1f}s)", flush=True)
        if not finetune:
            continue
        best = min((r for r in one_shot if r != DEFAULT and not r.startswith("i-SpaSP")), default=None,
                   key=lambda r: one_shot[r][0])
        for rule in [DEFAULT] + ([best] if best else []):
            work = Path(results.path.parent) / f".{NAME}-work"
            tuned = _finetune(one_shot[rule][1], model, train, tiny, work)
            ppl = lm.perplexity(tuned, test)
            results.add({"model": kind, "rule": rule, "target": target, "ffn_keep": ffn_keep, "head_keep": head_keep,
                         "ppl": ppl, "stage": "fine-tuned"})
            print(f"{kind} {target:.2f} {rule} fine-tuned: {ppl:.2f}", flush=True)


# Time and memory --------------------------------------------------------------------------------------------
def timing_worker(kind: str, tiny: bool, repeats: int) -> dict[str, Any]:
    """Prune time over one dense forward of the calibration set, interleaved; peak extra RSS of the prune."""
    from engine_shapes import rss_mb

    model, tokenizer, _ = _load(kind, tiny)
    calibration, _ = _train_chunks(tokenizer, tiny)
    batches = _batches(calibration)
    ffn_keep, head_keep = widths_for(model, 0.35)
    config = PrunerConfig(ffn_keep_ratio=ffn_keep, head_keep_ratio=head_keep, show_progress=False)

    def forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return time.perf_counter() - start

    forward()  # warm-up
    rss_before = rss_mb()
    ratios, prunes, forwards = [], [], []
    for _ in range(repeats):
        before = forward()
        start = time.perf_counter()
        ISpaSPPruner(model, config).prune(batches)
        prunes.append(time.perf_counter() - start)
        after = forward()
        forwards += [before, after]
        ratios.append(prunes[-1] / ((before + after) / 2))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return {"model": kind, "threads": torch.get_num_threads(), "forward_s": statistics.median(forwards),
            "prune_s": statistics.median(prunes), "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "peak_extra_host_mb": max(peak, 0.0),
            "model_mb": count_parameters(model) * 4 / 2**20,
            "tokens": len(calibration) * len(calibration[0]["input_ids"])}


def _timing(kind: str, tiny: bool) -> dict[str, Any]:
    """In a fresh process, so the peak resident memory is this prune's."""
    import json

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import json, decoder_perplexity as d; "
            f"print('RESULT', json.dumps(d.timing_worker({kind!r}, {tiny}, {2 if tiny else 5})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


# Report -----------------------------------------------------------------------------------------------------
def report(data: dict[str, Any]) -> str:
    records, meta = data["records"], data["meta"]
    lines = [f"## Decoder LLMs: perplexity at equal widths ({meta.get('date', '')})", "",
             "Held-out test perplexity of the decoders trained here from scratch on the Wikipedia excerpt "
             "(`benchmarks/train_decoders.py`), pruned with 128 calibration chunks of 128 training tokens. Budget = "
             "fraction of the layer parameters removed (KV groups for the LLaMA model, heads for GPT-2, and FFN "
             "neurons). Peers' rules without our re-fit, as published (FLAP with its bias compensation). Fine-tune: "
             f"{FINETUNE_STEPS} steps x {BATCH} chunks of logit distillation from the dense model, for the default "
             "rule and the best baseline of each budget. Test perplexity on the first "
             f"{TEST_CHUNKS} x 128 tokens of the held-out test split. Lower is better; **bold** = best one-shot "
             "rule of the column.", "",
             "`python benchmarks/decoder_perplexity.py`", ""]
    for kind in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == kind]
        dense = next(r for r in rows if r["rule"] == "dense")
        targets = sorted({r["target"] for r in rows if r["rule"] != "dense"})
        head = "| rule | " + " | ".join(
            f"{100 * t:.0f}% (removed {100 * _removed(rows, t):.1f}%)" for t in targets) + " |"
        lines += [f"### {kind} (dense perplexity {dense['ppl']:.2f})", "", head,
                  "|---|" + "---|" * len(targets)]
        best = {t: min((r["ppl"] for r in rows if r.get("stage") == "one-shot" and r["target"] == t), default=None)
                for t in targets}
        for rule in dict.fromkeys(r["rule"] for r in rows if r.get("stage") == "one-shot"):
            cells = []
            for t in targets:
                hit = next((r for r in rows if r["rule"] == rule and r["target"] == t and r["stage"] == "one-shot"),
                           None)
                cell = f"{hit['ppl']:.2f}" if hit else ""
                cells.append(f"**{cell}**" if hit and hit["ppl"] == best[t] else cell)
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        for rule in dict.fromkeys(r["rule"] for r in rows if r.get("stage") == "fine-tuned"):
            cells = [next((f"{r['ppl']:.2f}" for r in rows if r["rule"] == rule and r["target"] == t
                           and r.get("stage") == "fine-tuned"), "") for t in targets]
            lines.append(f"| {rule} + fine-tune | " + " | ".join(cells) + " |")
        lines.append("")
    timing = data.get("timing") or []
    if timing:
        lines += ["Pruning time on the CPU at the 35% budget (default rule), as a ratio of one dense forward over the "
                  "same calibration set, interleaved (median of the repeats, range in brackets); peak extra resident "
                  "memory of the prune over the loaded model.", "",
                  "| model | threads | calibration tokens | dense forward s | prune s | ratio | peak extra MB | "
                  "model MB |", "|---|---|---|---|---|---|---|---|"]
        for t in timing:
            lines.append(f"| {t['model']} | {t['threads']} | {t['tokens']} | {t['forward_s']:.3f} | "
                         f"{t['prune_s']:.2f} | {t['ratio']:.1f}x [{t['ratio_min']:.1f}-{t['ratio_max']:.1f}] | "
                         f"{t['peak_extra_host_mb']:.0f} | {t['model_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def _removed(rows: list[dict[str, Any]], target: float) -> float:
    return next((r["layer_params_removed"] for r in rows if r["target"] == target and r.get("stage") == "one-shot"),
                target)


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(lm.KINDS), choices=list(lm.KINDS))
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true",
                        help="keep the perplexity records of the last run, measure time and memory again")
    parser.add_argument("--keep-others", action="store_true",
                        help="keep the last run's records of the models not in --models (measure one model at a time)")
    args = parser.parse_args(argv)
    results = common.Results(args.output_dir, NAME, {"tiny": args.tiny}, resume=args.timing_only or args.keep_others)
    if args.keep_others and not args.timing_only:
        results.data["records"] = [r for r in results.records if r["model"] not in args.models]
        results.flush()
    for kind in [] if args.timing_only else args.models:
        measure_model(kind, args.tiny, not args.no_finetune, results)
    if not args.no_timing:
        results.set("timing", [_timing(kind, args.tiny) for kind in args.models])
    text = report(results.data)
    common.write_fragment(args.output_dir, NAME, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
