#!/usr/bin/env python
"""Prune a text classifier with i-SpaSP and compare it with the dense model (accuracy, fidelity, size).

    python examples/text_classification.py --ffn_keep_ratio 0.5 --head_keep_ratio 0.75
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/text_classification.py --cpu

Offline by default: the MiniLM of ``demo.assets`` with a new 2-class head, fine-tuned for ``--train_steps`` on
the sentence-polarity csv. ``--train_file``/``--validation_file`` take csv files with ``text`` and ``label``
columns. The scripts in ``by_feature/`` import the helpers below and add one thing each.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's demo/ package (offline assets)

import datasets  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from hf_ispasp import ISpaSPPruner, PrunerConfig, PruningReport, save_pruned  # noqa: E402
from hf_ispasp.distributed import destroy_process_group  # noqa: E402
from hf_ispasp.evaluation import compute  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The base flags; feature scripts add theirs to this parser."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", help="sequence classifier or encoder (default: the offline MiniLM)")
    p.add_argument("--train_file", help="csv with text,label columns (default: the polarity sentences)")
    p.add_argument("--validation_file", help="csv for evaluation (default: 20%% of the training rows)")
    p.add_argument("--max_length", type=int, default=64, help="truncate sentences to this many tokens")
    p.add_argument("--batch_size", type=int, default=32, help="batch size per process")
    p.add_argument("--train_steps", type=int, default=100, help="fine-tune the dense model first (0: skip)")
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--calibration_samples", type=int, default=256, help="training sentences to calibrate on")
    p.add_argument("--ffn_keep_ratio", type=float, default=0.5, help="FFN neurons kept per layer")
    p.add_argument("--head_keep_ratio", type=float, default=0.75, help="attention heads kept per layer")
    p.add_argument("--output_dir", default="out/text-classification")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (needed for several CPU processes)")
    p.add_argument("--seed", type=int, default=0)
    return p


def get_dataloaders(accelerator: Accelerator, args: argparse.Namespace, tokenizer: Any) -> dict[str, DataLoader]:
    """Train, calibration and evaluation loaders from local csv files; the one function the tests swap."""
    if args.train_file:
        files = {"train": args.train_file, **({"test": args.validation_file} if args.validation_file else {})}
        raw = datasets.load_dataset("csv", data_files=files)
    else:
        from demo.assets import polarity_csv

        raw = datasets.load_dataset("csv", data_files=str(polarity_csv()), column_names=["label", "text"],
                                    encoding="utf-8-sig")
    if "test" not in raw:
        raw = raw["train"].train_test_split(test_size=0.2, seed=args.seed)
    return make_dataloaders(accelerator, args, tokenizer, raw)


def make_dataloaders(accelerator: Accelerator, args: argparse.Namespace, tokenizer: Any,
                     raw: datasets.DatasetDict) -> dict[str, DataLoader]:
    """Tokenize ``raw`` (``train``/``test`` with ``text``, ``label``) and batch it; label values map to sorted ids."""
    label_ids = {v: i for i, v in enumerate(sorted({str(v) for v in raw["train"]["label"]}))}

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        out = tokenizer([t.strip() for t in batch["text"]], truncation=True, max_length=args.max_length)
        return {**out, "labels": [label_ids[str(v)] for v in batch["label"]]}

    with accelerator.main_process_first():
        data = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
    collate = DataCollatorWithPadding(tokenizer)
    train = data["train"].shuffle(seed=args.seed)
    calibration = train.select(range(min(args.calibration_samples, len(train)))).remove_columns("labels")
    return {"train": DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate),
            "calibration": DataLoader(calibration, batch_size=args.batch_size, collate_fn=collate),
            "eval": DataLoader(data["test"], batch_size=args.batch_size, collate_fn=collate)}


def setup(args: argparse.Namespace) -> tuple[Accelerator, Any, torch.nn.Module, dict[str, DataLoader]]:
    """Accelerator, tokenizer, dense model (evaluation mode, on the device) and the data loaders."""
    accelerator = Accelerator(cpu=args.cpu)
    torch.manual_seed(args.seed)
    if args.model_name_or_path is None:
        from demo.assets import minilm_path

        args.model_name_or_path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    loaders = get_dataloaders(accelerator, args, tokenizer)
    num_labels = int(max(loaders["train"].dataset["labels"])) + 1
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=num_labels)
    return accelerator, tokenizer, model.to(accelerator.device).eval(), loaders


def train(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader, steps: int, lr: float,
          loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None) -> torch.nn.Module:
    """``steps`` AdamW steps, data-parallel under ``accelerate launch``; returns the unwrapped model in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    wrapped, optimizer, loader = accelerator.prepare(model.train(), optimizer, loader)
    done = 0
    while done < steps:
        for batch in loader:
            loss = loss_fn(wrapped, batch) if loss_fn else wrapped(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
    accelerator.free_memory()
    return accelerator.unwrap_model(wrapped).eval()


@torch.no_grad()
def predict(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the whole evaluation set, gathered from every process."""
    logits, labels = [], []
    for batch in accelerator.prepare_data_loader(loader):
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        out, refs = accelerator.gather_for_metrics((out, batch["labels"]))
        logits.append(out.float().cpu())
        labels.append(refs.cpu())
    return torch.cat(logits), torch.cat(labels)


def score(logits: torch.Tensor, labels: torch.Tensor, dense_logits: torch.Tensor | None = None) -> dict[str, float]:
    """Accuracy through the ``evaluate`` accuracy module; agreement, KL and relative error to the dense model."""
    result = compute("accuracy", predictions=logits.argmax(-1).tolist(), references=labels.tolist())
    if dense_logits is not None:
        result.update(compute("pruning_fidelity", predictions=logits.tolist(), references=dense_logits.tolist()))
    return {k: float(v) for k, v in result.items()}


def pruner_config(args: argparse.Namespace, **overrides: Any) -> PrunerConfig:
    """The pruning settings from the flags (``overrides`` win)."""
    return PrunerConfig(**{"ffn_keep_ratio": args.ffn_keep_ratio, "head_keep_ratio": args.head_keep_ratio,
                           "seed": args.seed, "show_progress": False, **overrides})


def finish(accelerator: Accelerator, args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any,
           report: PruningReport, metrics: dict[str, dict[str, float]], **extra: Any) -> dict[str, Any]:
    """Save the pruned model, tokenizer and ``results.json`` (main process); print size and metrics."""
    record = getattr(getattr(model, "config", None), "ispasp", None) or model.ispasp_metadata  # timm: no config
    results = {"metrics": metrics, "params": {"dense": report.params_before, "pruned": report.params_after},
               "flops": {"dense": report.flops_before, "pruned": report.flops_after},
               "widths": record["widths"], "num_processes": accelerator.num_processes, **extra}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_pruned(model, args.output_dir, tokenizer=tokenizer)
        Path(args.output_dir, "results.json").write_text(json.dumps(results, indent=2))
        print(f"parameters {report.params_before:,} -> {report.params_after:,} "
              f"({report.params_after / report.params_before:.1%})")
        for name, values in metrics.items():
            print(f"{name:>10}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    destroy_process_group()
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    accelerator, tokenizer, model, loaders = setup(args)
    if args.train_steps:
        model = train(accelerator, model, loaders["train"], args.train_steps, args.learning_rate)
    dense_logits, labels = predict(accelerator, model, loaders["eval"])
    pruner = ISpaSPPruner(model, pruner_config(args))
    pruned = pruner.prune(loaders["calibration"])  # each process calibrates on all of it: same selection
    metrics = {"dense": score(dense_logits, labels),
               "pruned": score(predict(accelerator, pruned, loaders["eval"])[0], labels, dense_logits)}
    return finish(accelerator, args, pruned, tokenizer, pruner.report, metrics)


if __name__ == "__main__":
    main()
