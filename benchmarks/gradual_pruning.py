"""Gradual pruning with ``PruningCallback`` against one-shot pruning followed by the same fine-tune.

MiniLM-L6 fine-tuned on sentence polarity (``demo.recipes.finetuned_minilm_polarity()``), pruned to FFN 0.5 /
heads 0.75 with the default i-SpaSP settings on the 512 calibration sentences, two ways, each with one epoch of
``DistillationTrainer`` (task loss) on the 3200 training sentences, same seed, learning rate and batches:

- one-shot: prune the dense model, then fine-tune the pruned model for the epoch;
- gradual: fine-tune the dense model for the epoch with ``PruningCallback`` pruning at three optimizer steps
  (default 0, 33, 66 of the epoch's 100), a third, two thirds and all of the way to the same budget.

Test metrics on the 800 test sentences: accuracy ± standard error, agreement with the dense model and mean
KL(dense || model); wall time of each arm (prunes included).

    python benchmarks/gradual_pruning.py                      # ~25 min on 2 cores
    python benchmarks/gradual_pruning.py --tiny --output-dir /tmp/x
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from hf_ispasp import ISpaSPPruner, PrunerConfig  # noqa: E402
from hf_ispasp.training import DistillationTrainer, PruningCallback  # noqa: E402

NAME = "gradual_pruning"
FFN, HEADS = 0.5, 0.75


def trainer_for(model, task, args, output_dir: str) -> DistillationTrainer:
    from transformers import DataCollatorWithPadding, TrainingArguments

    training = TrainingArguments(
        output_dir=output_dir, num_train_epochs=args.epochs, learning_rate=args.lr, per_device_train_batch_size=32,
        seed=0, data_seed=0, save_strategy="no", report_to=[], logging_steps=10, use_cpu=True, disable_tqdm=True,
        max_steps=6 if task.tiny else -1,
    )
    return DistillationTrainer(model=model, args=training, train_dataset=task.train,
                               data_collator=DataCollatorWithPadding(task.tokenizer))


def widths(model) -> list[list[int]]:
    record = model.config.ispasp["widths"]
    return [record["heads"], record["ffn"]]


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="optimizer steps of the gradual prunes (default 0, 1/3, 2/3 of the run)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the markdown from the existing JSON")
    parser.add_argument("--gradual-only", action="store_true",
                        help="run only the gradual arm and add it to the existing JSON (an interrupted run)")
    args = parser.parse_args(argv)
    if args.report_only:
        data = json.loads((args.output_dir / f"{NAME}.json").read_text())
        report(data["records"], data["meta"], args.output_dir)
        return 0
    task = common.load_task(tiny=args.tiny, work_dir=args.output_dir)
    config = PrunerConfig(ffn_keep_ratio=FFN, head_keep_ratio=HEADS, show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        total = trainer_for(copy.deepcopy(task.model), task, args, tmp)
        steps_in_run = total.args.max_steps if total.args.max_steps > 0 else round(
            args.epochs * len(total.get_train_dataloader()))
    steps = args.steps or [0, steps_in_run // 3, 2 * steps_in_run // 3]
    results = common.Results(args.output_dir, NAME, resume=args.gradual_only, meta={
        "tiny": args.tiny, "epochs": args.epochs, "lr": args.lr, "train_sentences": len(task.train),
        "test_sentences": len(task.test), "calibration_sentences": len(task.calibration), "ffn_keep_ratio": FFN,
        "head_keep_ratio": HEADS, "schedule_steps": steps, "training_steps": steps_in_run,
        "pruner_config": config.to_dict(),
    })
    calibration = task.calibration_loader(labels=False)
    results.data["records"] = [r for r in results.records if not r["method"].startswith("gradual")]
    if not args.gradual_only:
        results.data["records"] = [{"method": "dense", **task.dense_metrics, "seconds": 0.0}]
        one_shot(task, config, calibration, args, results)
    gradual(task, config, calibration, args, steps, results)
    report(results.records, results.data["meta"], args.output_dir)
    print(f"wrote {results.path}")
    return 0


def one_shot(task: Any, config: PrunerConfig, calibration: Any, args: Any, results: common.Results) -> None:
    """(a) one-shot prune, then the fine-tune."""
    torch.manual_seed(0)
    pruner = ISpaSPPruner(task.model, config)
    pruned, prune_seconds = common.timed(pruner.prune, calibration)
    results.add({"method": "one-shot, no fine-tune", **task.evaluate(pruned), "seconds": prune_seconds,
                 "prune_seconds": prune_seconds, "widths": widths(pruned)})
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(pruned, task, args, tmp)
        _, train_seconds = common.timed(trainer.train)
    record = task.evaluate(trainer.model.eval())
    results.add({"method": "one-shot + fine-tune", **record, "seconds": prune_seconds + train_seconds,
                 "prune_seconds": prune_seconds, "train_seconds": train_seconds, "widths": widths(trainer.model),
                 "final_loss": _last_loss(trainer)})
    print(f"one-shot + fine-tune: accuracy {record['accuracy']:.4f} in {prune_seconds + train_seconds:.0f}s",
          flush=True)


def gradual(task: Any, config: PrunerConfig, calibration: Any, args: Any, steps: list[int],
            results: common.Results) -> None:
    """(b) the same fine-tune on the dense model, pruned three times on the way."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(copy.deepcopy(task.model), task, args, tmp)
        callback = PruningCallback(steps, calibration, config, trainer=trainer)
        _, seconds = common.timed(trainer.train)
    record = task.evaluate(trainer.model.eval())
    prune_seconds = sum(r.seconds for r in callback.reports)
    results.add({"method": f"gradual ({len(steps)} prunes)", **record, "seconds": seconds,
                 "prune_seconds": prune_seconds, "train_seconds": seconds - prune_seconds,
                 "widths": widths(trainer.model), "pruned_at": callback.pruned_at,
                 "params_after_each": [r.params_after for r in callback.reports], "final_loss": _last_loss(trainer)})
    print(f"gradual: accuracy {record['accuracy']:.4f} in {seconds:.0f}s", flush=True)


def _last_loss(trainer) -> float | None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else None


def findings(records: list[dict]) -> list[str]:
    by = {r["method"]: r for r in records}
    one = by.get("one-shot + fine-tune")
    gradual = next((r for r in records if r["method"].startswith("gradual")), None)
    if not (one and gradual):
        return []
    diff = 100 * (gradual["accuracy"] - one["accuracy"])
    se = 100 * max(one["accuracy_stderr"], gradual["accuracy_stderr"])
    same = "the same widths" if one.get("widths") == gradual.get("widths") else "different widths"
    return [
        f"- Gradual vs one-shot + fine-tune ({same}, FLOPs ratio {gradual['flops_ratio']:.3f} vs "
        f"{one['flops_ratio']:.3f}): {'+' if diff >= 0 else ''}{diff:.1f} accuracy points "
        f"({'within' if abs(diff) < se else 'beyond'} one standard error, {se:.1f} points), agreement with the dense "
        f"model {100 * one['agreement']:.1f}% -> {100 * gradual['agreement']:.1f}%, KL {one['kl']:.4f} -> "
        f"{gradual['kl']:.4f}; wall time {one['seconds']:.0f} s -> {gradual['seconds']:.0f} s (prunes "
        f"{one['prune_seconds']:.0f} s -> {gradual['prune_seconds']:.0f} s).",
    ]


def report(records: list[dict], meta: dict, output_dir) -> None:
    rows = [{**r, "acc": f"{common.pct(r['accuracy'])} ± {common.pct(r['accuracy_stderr'])}",
             "agreement %": 100 * r["agreement"], "time": f"{r['seconds']:.0f}",
             "prune": f"{r.get('prune_seconds', 0.0):.0f}"} for r in records]
    table = common.markdown_table(rows, [
        ("method", "method"), ("accuracy % (± s.e.)", "acc"), ("agreement with dense %", "agreement %"),
        ("KL(dense ‖ model)", "kl"), ("FLOPs ratio", "flops_ratio"), ("wall time (s)", "time"),
        ("of which pruning (s)", "prune"),
    ])
    text = "\n".join([
        "## Gradual pruning with PruningCallback",
        "",
        f"MiniLM-L6 fine-tuned on sentence polarity, pruned to FFN {meta['ffn_keep_ratio']} / heads "
        f"{meta['head_keep_ratio']} with the default i-SpaSP settings on {meta['calibration_sentences']} "
        f"calibration sentences, then (or while) fine-tuned for {meta['epochs']:g} epoch on the "
        f"{meta['train_sentences']} training sentences ({meta['training_steps']} optimizer steps, lr {meta['lr']:g}, "
        "batch 32, task loss, same seed). One-shot: prune, then fine-tune. Gradual: "
        f"`hf_ispasp.training.PruningCallback` prunes the model being fine-tuned at steps {meta['schedule_steps']} "
        "(a third, two thirds and all of the way to the budget; Adam moments of the kept weights carried over, "
        f"the learning-rate schedule undisturbed). Metrics on the {meta['test_sentences']} test sentences; wall "
        "time of each arm on 2 shared CPU cores, prunes included.",
        "",
        table,
        "",
        *findings(records),
        "",
        "The gradual arm trains its first third on a wider (slower) model and runs three calibrations instead of "
        "one; in exchange each prune removes a third of the budget from a model already adapted to the previous "
        "cut. Wall times are on a machine shared with other jobs; compare them only within the table.",
        "",
        "`python benchmarks/gradual_pruning.py` (`--report-only` rebuilds this fragment from the JSON)",
    ])
    path = common.write_fragment(output_dir, NAME, text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
