#!/usr/bin/env python
"""Text-classification base + gradual pruning: prune in steps during fine-tuning with ``PruningCallback``.

    python examples/by_feature/gradual_pruning.py --prune_at 0 50 100 --train_steps 150

The ``Trainer`` fine-tunes the dense model; at the end of each step in ``--prune_at`` the callback prunes the
model it trains in place, a further share of the way to the final ratios, and edits the optimizer to the kept
rows, so training goes on with the compacted model in the same run. The callback cannot reach a model wrapped
for distribution (DDP), so this script runs one process (``accelerate launch`` with ``--num_processes 1``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the base script

import text_classification as base  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_ispasp.training import PruningCallback  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base.build_parser()
    parser.add_argument("--prune_at", type=int, nargs="+", default=[0, 50, 100],
                        help="optimizer steps after which to prune (0: before the first step)")
    args = parser.parse_args(argv)
    accelerator, tokenizer, model, loaders = base.setup(args)
    if accelerator.num_processes > 1:
        raise SystemExit("PruningCallback cannot prune a DDP-wrapped model: run one process")
    dense_logits, labels = base.predict(accelerator, model, loaders["eval"])
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=max(args.train_steps, max(args.prune_at) + 1),
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, use_cpu=args.cpu,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=args.seed)
    trainer = Trainer(model=model.train(), args=training_args, train_dataset=loaders["train"].dataset,
                      data_collator=loaders["train"].collate_fn)
    callback = PruningCallback(args.prune_at, loaders["calibration"], base.pruner_config(args), trainer=trainer)
    trainer.train()
    pruned = trainer.model.eval()
    report = callback.reports[-1]
    report.params_before, report.flops_before = callback.reports[0].params_before, callback.reports[0].flops_before
    metrics = {"dense (before training)": base.score(dense_logits, labels),
               "gradually pruned": base.score(base.predict(accelerator, pruned, loaders["eval"])[0], labels)}
    return base.finish(accelerator, args, pruned, tokenizer, report, metrics, pruned_at=callback.pruned_at)


if __name__ == "__main__":
    main()
