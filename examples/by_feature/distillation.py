#!/usr/bin/env python
"""Text-classification base + distillation: fine-tune the pruned model towards the dense model's outputs.

    python examples/by_feature/distillation.py --distill_steps 200 --distill_weight 0.5 --temperature 2
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/by_feature/distillation.py --cpu

The loss is ``(1 - w) * task + w * T^2 * KL(teacher_T || student_T)`` (``hf_ispasp.training.distillation_loss``),
in the base's accelerate training loop. ``hf_ispasp.training.DistillationTrainer`` does the same with the Trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the base script

import text_classification as base  # noqa: E402
import torch  # noqa: E402

from hf_ispasp import ISpaSPPruner  # noqa: E402
from hf_ispasp.training import distillation_loss  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base.build_parser()
    parser.add_argument("--distill_steps", type=int, default=200, help="fine-tuning steps of the pruned model")
    parser.add_argument("--distill_weight", type=float, default=0.5, help="weight of the KL term (0: task only)")
    parser.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL term")
    args = parser.parse_args(argv)
    accelerator, tokenizer, model, loaders = base.setup(args)
    if args.train_steps:
        model = base.train(accelerator, model, loaders["train"], args.train_steps, args.learning_rate)
    dense_logits, labels = base.predict(accelerator, model, loaders["eval"])
    pruner = ISpaSPPruner(model, base.pruner_config(args))
    pruned = pruner.prune(loaders["calibration"])
    one_shot = base.score(base.predict(accelerator, pruned, loaders["eval"])[0], labels, dense_logits)

    def loss_fn(student: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = student(**batch)
        with torch.no_grad():
            teacher = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        kd = distillation_loss(out.logits, teacher, args.temperature)
        return (1 - args.distill_weight) * out.loss + args.distill_weight * kd

    pruned = base.train(accelerator, pruned, loaders["train"], args.distill_steps, args.learning_rate, loss_fn)
    metrics = {"dense": base.score(dense_logits, labels), "pruned": one_shot,
               "distilled": base.score(base.predict(accelerator, pruned, loaders["eval"])[0], labels, dense_logits)}
    return base.finish(accelerator, args, pruned, tokenizer, pruner.report, metrics)


if __name__ == "__main__":
    main()
