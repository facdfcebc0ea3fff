"""Console entry point: ``hf-ispasp demo`` (the main job) and ``hf-ispasp prune`` (any supported checkpoint)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Any

import torch

from .config import ALLOCATIONS, GQA_GROUPS, PrunerConfig

logger = logging.getLogger("hf_ispasp")


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| metric | dense | pruned | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def _speedup_cell(latency: Any) -> str:
    """Median per-pair speedup with its inter-quartile range: the spread says whether the machine was quiet."""
    return f"{latency.speedup:.2f}x faster (IQR {latency.speedup_q25:.2f}-{latency.speedup_q75:.2f})"


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune (cached) MiniLM-L6 on sentence polarity, prune, measure, save, reload, compare."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from . import ISpaSPPruner, load_pruned, save_pruned
    from .classification import calibration_loader, classification_metrics, predict_logits, tokenize_dataset
    from .evaluation import compute as compute_metric
    from .metrics import count_flops, count_parameters, latency_ratio

    try:  # the demo's data and cached fine-tune live in the repository's demo/ package, not in the library
        from demo.assets import polarity_dataset
        from demo.recipes import finetuned_minilm_polarity
    except ModuleNotFoundError as err:
        if err.name != "demo":
            raise
        raise UsageError("the demo needs the repository's demo/ package (it is not installed with hf_ispasp); "
                         "run `bash scripts/demo.sh` from a clone of the repository") from err

    _pruner_config(args)  # bad budgets and a cluttered output folder fail before minutes of work
    _check_output_dir(args.output_dir, args.overwrite)
    torch.manual_seed(args.seed)
    path = finetuned_minilm_polarity(seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForSequenceClassification.from_pretrained(path).eval()
    data = polarity_dataset()
    train = tokenize_dataset(data["train"], tokenizer)
    test = tokenize_dataset(data["test"], tokenizer)
    calib = calibration_loader(train, tokenizer, num_samples=args.calibration_samples, seed=args.seed)

    config = _pruner_config(args)
    pruner = ISpaSPPruner(dense, config)
    pruned = pruner.prune(calib)
    report = pruner.report

    dense_logits = predict_logits(dense, test, tokenizer)
    pruned_logits = predict_logits(pruned, test, tokenizer)
    dense_m = classification_metrics(dense_logits, test["label"])
    pruned_m = classification_metrics(pruned_logits, test["label"], dense_logits)  # the package's evaluate modules
    pruned_m["relative_error"] = compute_metric(
        "pruning_fidelity", predictions=pruned_logits.double().numpy(), references=dense_logits.double().numpy()
    )["relative_error"]

    gen = torch.Generator().manual_seed(args.seed)
    example1 = {"input_ids": torch.randint(1000, 20000, (1, 128), generator=gen)}
    example1["attention_mask"] = torch.ones_like(example1["input_ids"])
    example32 = {"input_ids": torch.randint(1000, 20000, (32, 128), generator=gen)}
    example32["attention_mask"] = torch.ones_like(example32["input_ids"])
    lat1 = latency_ratio(dense, pruned, example1, repeats=args.latency_repeats)
    lat32 = latency_ratio(dense, pruned, example32, repeats=max(3, args.latency_repeats // 5))
    flops_dense, flops_pruned = count_flops(dense, example1), count_flops(pruned, example1)

    save_pruned(pruned, args.output_dir, tokenizer=tokenizer)
    reloaded = load_pruned(args.output_dir)
    reload_logits = predict_logits(reloaded, test, tokenizer)
    torch.testing.assert_close(reload_logits, pruned_logits)

    enc_d, enc_p = report.layer_params_before, report.layer_params_after
    rows = [
        ("parameters (all)", f"{count_parameters(dense) / 1e6:.2f}M", f"{count_parameters(pruned) / 1e6:.2f}M",
         f"{count_parameters(pruned) / count_parameters(dense):.3f}"),
        ("parameters (encoder layers)", f"{enc_d / 1e6:.2f}M", f"{enc_p / 1e6:.2f}M", f"{enc_p / enc_d:.3f}"),
        ("GFLOPs (1 x 128 tokens)", f"{flops_dense / 1e9:.2f}", f"{flops_pruned / 1e9:.2f}",
         f"{flops_pruned / flops_dense:.3f}"),
        ("CPU latency, batch 1 x 128", f"{lat1.baseline_s * 1e3:.1f} ms", f"{lat1.candidate_s * 1e3:.1f} ms",
         _speedup_cell(lat1)),
        ("CPU latency, batch 32 x 128", f"{lat32.baseline_s * 1e3:.0f} ms", f"{lat32.candidate_s * 1e3:.0f} ms",
         _speedup_cell(lat32)),
        ("test accuracy (one-shot)", f"{100 * dense_m['accuracy']:.1f} ± {100 * dense_m['accuracy_stderr']:.1f}",
         f"{100 * pruned_m['accuracy']:.1f} ± {100 * pruned_m['accuracy_stderr']:.1f}",
         f"{100 * (pruned_m['accuracy'] - dense_m['accuracy']):+.1f} pts"),
        ("agreement with dense / KL / rel. logit error", "-",
         f"{100 * pruned_m['agreement']:.1f}% / {pruned_m['kl']:.4f} / {pruned_m['relative_error']:.3f}", "-"),
        ("pruning wall time", "-", f"{report.seconds:.1f} s ({report.calibration_tokens} calib. tokens)", "-"),
    ]
    result = {
        "config": config.to_dict(), "report": report.to_dict(), "dense": dense_m, "pruned": pruned_m,
        "latency_b1": lat1.to_dict(), "latency_b32": lat32.to_dict(), "flops": [flops_dense, flops_pruned],
        "output_dir": os.path.abspath(args.output_dir), "reload_identical": True,
    }
    print(f"\nMiniLM-L6 on sentence polarity ({len(test)} test sentences), i-SpaSP at FFN keep {args.ffn_keep}, "
          f"heads keep {args.head_keep}, {args.calibration_samples} calibration sentences\n")
    print(_table(rows))
    print(f"\nSaved to {args.output_dir}; load_pruned() reproduces the pruned logits (torch.testing.assert_close).")
    return result


class UsageError(ValueError):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


_DATA_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "txt": "text", "parquet": "parquet"}


def _check_output_dir(path: str, overwrite: bool) -> None:
    """Refuse a folder holding files we did not write (they would sit beside the checkpoint) unless asked."""
    from .atomic import foreign_files

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output-dir {path} is an existing file; pass a folder path")
    foreign = foreign_files(path)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(
            f"--output-dir {path} already holds files hf-ispasp did not write ({shown}); choose a new or empty "
            "folder, or pass --overwrite to save beside them (they are kept either way)"
        )


def _load_checkpoint(path: str) -> tuple[Any, Any]:
    """Tokenizer and model of ``path``, with the class its config names, so a task head is never dropped."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .serialization import looks_like_hub_id

    local = os.path.expanduser(path)
    if not os.path.isdir(local) and (os.path.exists(local) or not looks_like_hub_id(path)):
        raise UsageError(f"--model {path}: no such checkpoint folder; pass a folder with config.json or a Hub id")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {path}: cannot read its config.json ({_one_line(err)}); pass a folder with "
                         "config.json and weights, or a Hub id") from err
    architectures = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if cls is None:
        logger.warning("config.json of %s names no known architecture (%s); loading it as a base AutoModel",
                       path, architectures)
        cls = AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {path}: no tokenizer could be loaded ({_one_line(err)}); save the tokenizer "
                         "into the checkpoint folder (tokenizer.save_pretrained)") from err
    return tokenizer, cls.from_pretrained(path)


def _load_text(args: argparse.Namespace) -> Any:
    """The calibration text as a ``datasets.Dataset`` with a checked text column."""
    import datasets

    data = args.data
    if os.path.exists(data):
        if os.path.isdir(data):
            raise UsageError(f"--data {data} is a folder; pass a .csv/.json/.jsonl/.txt/.parquet file or a "
                             "dataset name")
        ext = os.path.splitext(data)[1].lstrip(".").lower()
        if ext not in _DATA_BUILDERS:
            raise UsageError(f"--data {data}: unsupported file type {ext!r}; use one of {sorted(_DATA_BUILDERS)}")
        if os.path.getsize(data) == 0:
            raise UsageError(f"--data {data} is empty; it needs at least one line of calibration text")
        try:
            raw = datasets.load_dataset(_DATA_BUILDERS[ext], data_files=data, split="train")
        except Exception as err:  # datasets wraps parser errors in several types
            raise UsageError(f"--data {data} could not be read as {ext} ({_one_line(err)})") from err
    elif os.sep in data and os.path.splitext(data)[1]:
        raise UsageError(f"--data {data}: no such file")
    else:
        try:
            raw = datasets.load_dataset(data, split=args.split)
        except Exception as err:
            raise UsageError(f"--data {data}: not a local file, and loading it as a dataset failed "
                             f"({_one_line(err)})") from err
    if args.text_column not in raw.column_names:
        raise UsageError(f"--data {data} has no column {args.text_column!r} (columns: {raw.column_names}); "
                         "name the text column with --text-column")
    if len(raw) == 0:
        raise UsageError(f"--data {data} holds no rows; it needs calibration text")
    return raw


def _lm_calibration(raw: Any, tokenizer: Any, model: Any, args: argparse.Namespace) -> Any:
    """Fixed-length chunks of the concatenated text, no labels and no padding: how causal LMs are calibrated."""
    from .language_modeling import calibration_chunks, chunk_text, default_block_size

    block_size = args.block_size or default_block_size(model, tokenizer)
    try:
        chunks = chunk_text(raw, tokenizer, block_size, text_column=args.text_column)
    except ValueError as err:
        raise UsageError(f"--data {args.data}: {_one_line(err).replace('block_size=', '--block-size ')}") from err
    subset = calibration_chunks(chunks, args.calibration_samples, seed=args.seed)
    logger.info("causal LM: calibrating on %d chunks of %d tokens", len(subset), block_size)
    return subset


def run_prune(args: argparse.Namespace) -> dict[str, Any]:
    """Prune any supported checkpoint on a tokenized text file or dataset and save it.

    A sequence classifier (or encoder) calibrates on the texts one by one, padded per batch; a causal LM
    (``...ForCausalLM`` / ``...LMHeadModel``) on fixed-length chunks of the concatenated texts (``--block-size``).
    """
    from . import ISpaSPPruner, save_pruned
    from .classification import calibration_loader, tokenize_dataset
    from .importance import is_causal_lm

    config = _pruner_config(args)
    _check_output_dir(args.output_dir, args.overwrite)
    if args.block_size is not None and args.block_size < 2:
        raise UsageError(f"--block-size {args.block_size} must be >= 2 (a chunk holds at least one prediction)")
    tokenizer, model = _load_checkpoint(args.model)
    raw = _load_text(args)
    if is_causal_lm(model):
        calibration = _lm_calibration(raw, tokenizer, model, args)
    else:
        tokenized = tokenize_dataset(raw, tokenizer, text_column=args.text_column)
        calibration = calibration_loader(tokenized, tokenizer, num_samples=args.calibration_samples)
    pruner = ISpaSPPruner(model, config)
    pruned = pruner.prune(calibration)
    save_pruned(pruned, args.output_dir, tokenizer=tokenizer)
    print(pruner.report.to_markdown())
    print(f"{type(pruned).__name__}: parameters {pruner.report.params_before} -> {pruner.report.params_after}; "
          f"saved to {args.output_dir}")
    if pruner.report.budget:
        achieved = pruner.report.budget["achieved"]
        print(f"{pruner.report.budget['allocation']} allocation of {pruner.report.budget['target']}: FLOPs "
              f"{achieved['flops']:.3f}, parameters {achieved['params']:.3f} of the dense model")
    return pruner.report.to_dict()


def _pruner_config(args: argparse.Namespace) -> PrunerConfig:
    settings: dict[str, Any] = {"ffn_keep_ratio": args.ffn_keep, "head_keep_ratio": args.head_keep, "seed": args.seed}
    for option, name in _CONFIG_OPTIONS.items():
        if getattr(args, option, None) is not None:
            settings[name] = getattr(args, option)
    try:
        return PrunerConfig(**settings)
    except ValueError as err:  # name the command-line flags, not the config fields
        flags = {"ffn_keep_ratio": "--ffn-keep", "head_keep_ratio": "--head-keep", "seed": "--seed",
                 **{name: "--" + option.replace("_", "-") for option, name in _CONFIG_OPTIONS.items()}}
        pattern = r"\b(" + "|".join(sorted(flags, key=len, reverse=True)) + r")\b(=?)"
        message = re.sub(pattern, lambda m: flags[m.group(1)] + (" " if m.group(2) else ""), str(err))
        raise UsageError(message) from err


# CLI options (argparse dest) that set a PrunerConfig field when given.
_CONFIG_OPTIONS = {"gqa_groups": "gqa_groups", "flops_keep": "flops_keep_ratio", "params_keep": "params_keep_ratio",
                   "latency_keep": "latency_keep_ratio", "allocation": "allocation"}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _user_errors() -> tuple[type[BaseException], ...]:
    from .adapters import UnsupportedModelError
    from .allocation import InfeasibleBudgetError
    from .atomic import CheckpointFolderError
    from .serialization import CheckpointMismatchError
    from .statistics import CalibrationError

    return (UsageError, UnsupportedModelError, CalibrationError, CheckpointFolderError, CheckpointMismatchError,
            InfeasibleBudgetError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-ispasp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fine-tune (cached), prune and evaluate MiniLM-L6 on sentence polarity")
    prune = sub.add_parser("prune", help="prune a checkpoint on calibration text and save it")
    for p in (demo, prune):
        p.add_argument("--ffn-keep", type=float, default=0.5)
        p.add_argument("--head-keep", type=float, default=0.75)
        p.add_argument("--flops-keep", type=float, default=None,
                       help="keep this fraction of the forward FLOPs instead (--ffn-keep/--head-keep unused)")
        p.add_argument("--params-keep", type=float, default=None, help="keep this fraction of the parameters instead")
        p.add_argument("--latency-keep", type=float, default=None,
                       help="keep this fraction of the latency measured on this machine instead")
        p.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                       help="with a FLOPs/params/latency target: per-layer widths from the error curves (global, "
                            "default) or the same fraction everywhere (uniform)")
        p.add_argument("--calibration-samples", type=int, default=512)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", help="also write the results to this JSON file")
    demo.add_argument("--output-dir", default=os.path.join("outputs", "minilm-polarity-pruned"))
    demo.add_argument("--latency-repeats", type=int, default=20)
    prune.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    prune.add_argument("--data", required=True, help="a datasets name, or a local .csv/.json/.txt file")
    prune.add_argument("--split", default="train")
    prune.add_argument("--text-column", default="text")
    prune.add_argument("--block-size", type=int, default=None,
                       help="causal LMs: tokens per calibration chunk (default: min(1024, the model's maximum "
                            "length))")
    prune.add_argument("--gqa-groups", choices=GQA_GROUPS, default=None,
                       help="grouped-query attention: prune whole KV heads (kv, default) or query heads (query)")
    prune.add_argument("--output-dir", required=True)
    for p in (demo, prune):
        p.add_argument("--overwrite", action="store_true",
                       help="save into an output folder that holds other files (they are kept, never deleted)")
    args = parser.parse_args(argv)
    if args.calibration_samples < 1:
        parser.error(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        result = run_demo(args) if args.command == "demo" else run_prune(args)
    except _user_errors() as err:
        print(f"hf-ispasp {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
    logger.info("done in %.0fs", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
