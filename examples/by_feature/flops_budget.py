#!/usr/bin/env python
"""Text-classification base + a FLOPs budget: keep a fraction of the forward FLOPs instead of fixed ratios.

    python examples/by_feature/flops_budget.py --flops_keep_ratio 0.5 --allocation global
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/by_feature/flops_budget.py --cpu

``PrunerConfig(flops_keep_ratio=..., allocation=...)``: ``global`` spreads the cut over blocks by their
residuals, ``uniform`` keeps the same share in every block; the report records the predicted and achieved FLOPs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the base script

import text_classification as base  # noqa: E402

from hf_ispasp import ISpaSPPruner  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base.build_parser()
    parser.add_argument("--flops_keep_ratio", type=float, default=0.5, help="fraction of the FLOPs to keep")
    parser.add_argument("--allocation", choices=["global", "uniform"], default="global",
                        help="how the FLOPs cut is spread over the blocks")
    args = parser.parse_args(argv)
    accelerator, tokenizer, model, loaders = base.setup(args)
    if args.train_steps:
        model = base.train(accelerator, model, loaders["train"], args.train_steps, args.learning_rate)
    dense_logits, labels = base.predict(accelerator, model, loaders["eval"])
    config = base.pruner_config(args, flops_keep_ratio=args.flops_keep_ratio, allocation=args.allocation)
    pruner = ISpaSPPruner(model, config)
    pruned = pruner.prune(loaders["calibration"])
    report = pruner.report
    metrics = {"dense": base.score(dense_logits, labels),
               "pruned": base.score(base.predict(accelerator, pruned, loaders["eval"])[0], labels, dense_logits)}
    if accelerator.is_main_process:
        print(f"FLOPs {report.flops_before:,} -> {report.flops_after:,} "
              f"({report.flops_after / report.flops_before:.1%}, target {args.flops_keep_ratio:.0%})")
    return base.finish(accelerator, args, pruned, tokenizer, report, metrics, budget=report.to_dict()["budget"])


if __name__ == "__main__":
    main()
