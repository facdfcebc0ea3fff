"""Decoder LMs trained from scratch on a Wikipedia excerpt: the LLaMA-style and GPT-2 models of the pruning evidence.

No pretrained decoder can be downloaded here, so ``demo/lm.py`` trains them: 106 Wikipedia articles from gensim's
test data, split by article into train / validation / test, a 4096-token byte-level BPE trained on the train
split, then ``LlamaForCausalLM`` (hidden 256, 4 layers, 8 query / 4 KV heads, gated MLP 704) and
``GPT2LMHeadModel`` (n_embd 256, 4 layers, 8 heads, MLP 1024) with ``Trainer`` (AdamW, warm-up + cosine decay,
validation every few hundred steps). This script trains whatever is not cached yet (one model after the other),
reloads each folder with ``from_pretrained`` and measures validation / test perplexity on the reloaded model.

    python benchmarks/train_decoders.py                  # ~15 min a model on 2 cores the first time, then cached
    python benchmarks/train_decoders.py --report-only    # rewrite the markdown from the JSON
    python benchmarks/train_decoders.py --tiny --output-dir /tmp/x
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from demo import lm  # noqa: E402

NAME = "train_decoders"
FLAT = 0.02  # "flattened": the last evaluation improved the validation perplexity by less than this


def measure(kind: str, tiny: bool) -> dict[str, Any]:
    """Train (or load) one decoder, reload it with ``from_pretrained`` and check its perplexities."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = lm.recipe_for(kind, tiny=tiny)
    cached = (recipe.folder() / lm.TRAINING_RECORD).exists()
    start = time.perf_counter()
    folder = lm.trained_decoder(kind, recipe)
    seconds = time.perf_counter() - start
    record = lm.training_record(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    test = lm.lm_dataset("test", tokenizer, recipe.seq_len, recipe.max_eval_chunks)
    curve = record["curve"]
    last_gain = 1 - curve[-1]["perplexity"] / curve[-2]["perplexity"] if len(curve) > 1 else None
    return {
        "model": kind,
        "architecture": type(model).__name__,
        "folder": str(folder),
        "digest": record["digest"],
        "cached": cached,
        "call_seconds": seconds,
        "parameters": record["parameters"],
        "shape": _shape(recipe),
        "steps": record["steps"],
        "batch_tokens": recipe.batch_size * recipe.seq_len,
        "train_tokens_seen": record["train_tokens_seen"],
        "train_tokens_available": record["train_tokens_available"],
        "epochs": record["epochs"],
        "train_seconds": record["train_seconds"],
        "train_cpu_seconds": record.get("train_cpu_seconds"),
        "threads": record["threads"],
        "learning_rate": recipe.learning_rate,
        "validation_tokens": record["validation_tokens"],
        "test_tokens": record["test_tokens"],
        "validation_perplexity": record["validation_perplexity"],
        "test_perplexity": record["test_perplexity"],
        "reloaded_test_perplexity": lm.perplexity(model, test),
        "last_eval_gain": last_gain,
        "curve": curve,
    }


def _shape(r: lm.DecoderRecipe) -> str:
    heads = f"{r.num_heads}q/{r.num_kv_heads}kv heads" if r.kind == "llama" else f"{r.num_heads} heads"
    return f"hidden {r.hidden_size}, {r.num_layers} layers, {heads}, MLP {r.intermediate_size}, vocab {r.vocab_size}"


def report(data: dict[str, Any]) -> str:
    records = data["records"]
    rows = [{
        "model": f"{r['model']} ({r['architecture']})", "shape": r["shape"], "params": f"{r['parameters'] / 1e6:.2f}M",
        "tokens": f"{r['train_tokens_seen'] / 1e6:.2f}M ({r['epochs']:.2f} epochs)", "steps": r["steps"],
        "wall": f"{r['train_seconds'] / 60:.1f} min ({r['threads']} thread{'s' if r['threads'] > 1 else ''})",
        "cpu": f"{r['train_cpu_seconds'] / 60:.1f} min" if r.get("train_cpu_seconds") else "",
        "val": r["validation_perplexity"], "test": r["test_perplexity"],
    } for r in records]
    steps = sorted({p["step"] for r in records for p in r["curve"]})
    by_model = {r["model"]: {p["step"]: p["perplexity"] for p in r["curve"]} for r in records}
    curve_rows = [{"step": s, **{m: by_model[m].get(s, "") for m in by_model}} for s in steps]
    lines = [
        "## Decoder LMs trained from scratch (Wikipedia excerpt)",
        "",
        "The 106 Wikipedia articles of gensim's test data (`filter_wiki`, about 3M characters), split by article "
        "(~5% of the characters each for validation and test), a 4096-token byte-level BPE trained on the train "
        "split, fixed 128-token chunks. `Trainer`, AdamW (beta2 0.95, weight decay 0.1), linear warm-up then cosine "
        "decay, batch of 16 chunks. Perplexity = exp(token-weighted mean NLL) over all chunks of the split; the "
        "test column is measured again on the folder reloaded with `from_pretrained`.",
        "",
        common.markdown_table(rows, [
            ("model", "model"), ("shape", "shape"), ("params", "params"), ("train tokens", "tokens"),
            ("steps", "steps"), ("wall time", "wall"), ("CPU time", "cpu"), ("val ppl", "val"), ("test ppl", "test")]),
        "",
        "Validation perplexity during training (`Trainer` evaluation):",
        "",
        common.markdown_table(curve_rows, [("step", "step")] + [(m, m) for m in by_model]),
        "",
    ]
    for r in records:
        gain = r["last_eval_gain"]
        if gain is not None:
            verdict = "flattened" if gain < FLAT else "still improving"
            lines.append(f"- {r['model']}: the last evaluation improved validation perplexity by {100 * gain:.1f}% "
                         f"({verdict}; threshold {100 * FLAT:.0f}%); reloaded test perplexity "
                         f"{r['reloaded_test_perplexity']:.2f}; cached in `{r['folder']}`.")
    lines += ["", "`python benchmarks/train_decoders.py` (`--report-only` rebuilds this fragment from the JSON)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="*", default=list(lm.KINDS), choices=lm.KINDS)
    # One thread by default: on a shared 2-core machine two OpenMP threads wait for each other whenever a neighbour
    # holds a core (5-6 s a step against 1.2 s on one thread, measured side by side).
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args(argv)
    if args.report_only:
        return common.rebuild(args.output_dir, NAME, report)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    results = common.Results(args.output_dir, NAME, {"tiny": args.tiny, "kinds": args.kinds})
    for kind in args.kinds:
        record = measure(kind, args.tiny)
        results.add(record)
        print(f"{kind}: {record['parameters'] / 1e6:.2f}M params, {record['steps']} steps in "
              f"{record['train_seconds'] / 60:.1f} min, validation ppl {record['validation_perplexity']:.2f}, "
              f"test ppl {record['test_perplexity']:.2f}", flush=True)
    return common.publish(args.output_dir, NAME, report(results.data))


if __name__ == "__main__":
    raise SystemExit(main())
