#!/usr/bin/env python
"""Text-classification base + calibration sharded across processes, statistics summed through accelerate.

    accelerate launch --multi_gpu --num_processes 4 examples/by_feature/multi_process_calibration.py
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/by_feature/multi_process_calibration.py --cpu

Each process reads whole calibration batches of its own (``hf_ispasp.distributed.shard_calibration_data``: batch
``i`` goes to process ``i % N``, none repeated or dropped), and ``ISpaSPPruner(..., accelerator=accelerator)`` sums
the statistics across processes before every selection, so all processes select the groups one process would.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the base script

import text_classification as base  # noqa: E402

from hf_ispasp import ISpaSPPruner  # noqa: E402
from hf_ispasp.distributed import shard_calibration_data  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = base.build_parser().parse_args(argv)
    accelerator, tokenizer, model, loaders = base.setup(args)
    if args.train_steps:
        model = base.train(accelerator, model, loaders["train"], args.train_steps, args.learning_rate)
    dense_logits, labels = base.predict(accelerator, model, loaders["eval"])
    config = base.pruner_config(args, calibration_batch_size=args.batch_size)
    shard = shard_calibration_data(loaders["calibration"].dataset, accelerator, config, tokenizer.pad_token_id or 0)
    pruner = ISpaSPPruner(model, config, accelerator=accelerator)
    pruned = pruner.prune(shard)
    print(f"process {accelerator.process_index}: {pruner.report.calibration_batches} calibration batches")
    metrics = {"dense": base.score(dense_logits, labels),
               "pruned": base.score(base.predict(accelerator, pruned, loaders["eval"])[0], labels, dense_logits)}
    kept = [block.kept for block in pruner.report.blocks]
    return base.finish(accelerator, args, pruned, tokenizer, pruner.report, metrics, kept=kept,
                       calibration_batches_main_process=pruner.report.calibration_batches)


if __name__ == "__main__":
    main()
