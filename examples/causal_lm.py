#!/usr/bin/env python
"""Prune a decoder LLM with i-SpaSP and compare it with the dense model (perplexity, next-token agreement, size).

    python examples/causal_lm.py --model_name_or_path Qwen/Qwen2.5-0.5B --train_file train.txt \\
        --validation_file valid.txt --block_size 512 --ffn_keep_ratio 0.7 --head_keep_ratio 0.75
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/causal_lm.py --cpu

Offline by default: the small LLaMA trained from scratch by ``demo/lm.py`` (trained once on first use) and its
Wikipedia splits. Text files are ``.txt`` (one document a line) or ``.json``/``.jsonl`` with a ``text`` field;
they are tokenized and cut into ``--block_size`` chunks (``hf_ispasp.language_modeling.chunk_text``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the text-classification base: shared helpers

import datasets  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from text_classification import finish  # noqa: E402
from torch.utils.data import DataLoader, default_collate  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_ispasp import ISpaSPPruner, PrunerConfig  # noqa: E402
from hf_ispasp.evaluation import compute  # noqa: E402
from hf_ispasp.language_modeling import calibration_chunks, chunk_text  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", help="causal LM (default: demo/lm.py's trained small LLaMA)")
    p.add_argument("--train_file", help=".txt/.jsonl text to calibrate on (default: the Wikipedia train split)")
    p.add_argument("--validation_file", help=".txt/.jsonl text to evaluate on (default: the validation split)")
    p.add_argument("--block_size", type=int, default=128, help="tokens per chunk")
    p.add_argument("--max_eval_chunks", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8, help="batch size per process")
    p.add_argument("--calibration_samples", type=int, default=128, help="training chunks to calibrate on")
    p.add_argument("--ffn_keep_ratio", type=float, default=0.7, help="FFN neurons kept per layer")
    p.add_argument("--head_keep_ratio", type=float, default=0.75, help="attention (KV) heads kept per layer")
    p.add_argument("--gqa_groups", choices=["kv", "query"], default="kv", help="whole KV heads, or query heads")
    p.add_argument("--output_dir", default="out/causal-lm")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (needed for several CPU processes)")
    p.add_argument("--seed", type=int, default=0)
    return p


def get_dataloaders(accelerator: Accelerator, args: argparse.Namespace, tokenizer: Any) -> dict[str, DataLoader]:
    """Calibration and evaluation loaders of text chunks; the one function the tests swap."""
    if args.train_file:
        files = {"train": args.train_file, "validation": args.validation_file or args.train_file}
    else:
        from demo.lm import wiki_splits

        files = {split: str(path) for split, path in wiki_splits().items() if split != "test"}
    loader = "text" if files["train"].endswith(".txt") else "json"
    return make_dataloaders(accelerator, args, tokenizer, datasets.load_dataset(loader, data_files=files))


def make_dataloaders(accelerator: Accelerator, args: argparse.Namespace, tokenizer: Any,
                     raw: datasets.DatasetDict) -> dict[str, DataLoader]:
    """``--block_size`` chunks of ``raw`` (``train``/``validation`` with a ``text`` column), batched."""
    with accelerator.main_process_first():
        train = chunk_text(raw["train"], tokenizer, args.block_size, labels=False)
        evaluation = chunk_text(raw["validation"], tokenizer, args.block_size, labels=False)
    evaluation = evaluation.select(range(min(args.max_eval_chunks, len(evaluation)))).with_format("torch")
    calibration = calibration_chunks(train, args.calibration_samples, seed=args.seed).with_format("torch")
    return {"calibration": DataLoader(calibration, batch_size=args.batch_size, collate_fn=default_collate),
            "eval": DataLoader(evaluation, batch_size=args.batch_size, collate_fn=default_collate)}


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader,
             dense_predictions: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Perplexity (``evaluate`` perplexity module: summed NLL, token counts) and next-token agreement with the
    dense model's predictions (``pruning_fidelity``, ``labels``); returns the metrics and this model's predictions."""
    nll, tokens, predictions = [], [], []
    for batch in accelerator.prepare_data_loader(loader):
        ids = batch["input_ids"]
        logits = model(input_ids=ids, attention_mask=batch.get("attention_mask")).logits[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(ids), -1)
        sums, preds = accelerator.gather_for_metrics((loss.sum(-1), logits.argmax(-1)))
        nll += sums.tolist()
        tokens += [ids.shape[1] - 1] * len(sums)
        predictions.append(preds.cpu())
    predictions = torch.cat(predictions).flatten()
    metrics = {"perplexity": compute("perplexity", nll=nll, num_tokens=tokens)["perplexity"]}
    if dense_predictions is not None:
        metrics.update(compute("pruning_fidelity", "labels", predictions=predictions.tolist(),
                               references=dense_predictions.tolist()))
    return metrics, predictions


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    torch.manual_seed(args.seed)
    if args.model_name_or_path is None:
        from demo.lm import trained_decoder

        args.model_name_or_path = str(trained_decoder("llama"))
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    loaders = get_dataloaders(accelerator, args, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).to(accelerator.device).eval()
    dense, dense_predictions = evaluate(accelerator, model, loaders["eval"])
    config = PrunerConfig(ffn_keep_ratio=args.ffn_keep_ratio, head_keep_ratio=args.head_keep_ratio,
                          gqa_groups=args.gqa_groups, seed=args.seed, show_progress=False)
    pruner = ISpaSPPruner(model, config)
    pruned = pruner.prune(loaders["calibration"])  # each process calibrates on all of it: same selection
    metrics = {"dense": dense, "pruned": evaluate(accelerator, pruned, loaders["eval"], dense_predictions)[0]}
    return finish(accelerator, args, pruned, tokenizer, pruner.report, metrics)


if __name__ == "__main__":
    main()
