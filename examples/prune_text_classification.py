#!/usr/bin/env python
"""Prune a text classifier with i-SpaSP, recover accuracy by fine-tuning / distillation, evaluate, save.

model + dataset -> (fine-tune the dense model) -> prune -> fine-tune or distil from the dense model -> evaluate
-> save_pretrained (+ push_to_hub). Runs the same with ``python`` and with ``accelerate launch`` (calibration is
sharded across processes and the statistics are summed through accelerate, training is data-parallel).

    python examples/prune_text_classification.py \
        --model_name_or_path bert-base-uncased --dataset_name glue --dataset_config_name sst2 \
        --do_train_dense --ffn_keep_ratio 0.5 --head_keep_ratio 0.75 --distill_weight 0.5 \
        --num_train_epochs 1 --output_dir out/sst2-pruned

    python examples/prune_text_classification.py --model_name_or_path ./my-model \
        --train_file train.csv --validation_file dev.csv --output_dir out/pruned

See examples/README.md for ``accelerate launch``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import numpy as np
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_ispasp import ISpaSPPruner, PrunerConfig, save_pruned
from hf_ispasp.classification import classification_metrics
from hf_ispasp.distributed import destroy_process_group, shard_calibration_data
from hf_ispasp.evaluation import load as load_metric
from hf_ispasp.training import DistillationArguments, DistillationTrainer, iterative_prune, pruning_model_card

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or local folder of the (dense) model."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name (e.g. glue)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration (e.g. sst2)."})
    train_file: str | None = field(default=None, metadata={"help": "A csv/json(l) file with text and labels."})
    validation_file: str | None = field(default=None, metadata={"help": "A csv/json(l) evaluation file."})
    text_column: str | None = field(default=None, metadata={"help": "Text column (default: text/sentence)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for pairs."})
    label_column: str = field(default="label", metadata={"help": "Label column."})
    validation_split_name: str = field(default="validation", metadata={"help": "Evaluation split name."})
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Held-out %% of train when there is no evaluation split."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate sequences to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on evaluation examples."})


@dataclass
class PruningArguments:
    ffn_keep_ratio: float = field(default=0.5, metadata={"help": "Fraction of FFN neurons kept per layer."})
    head_keep_ratio: float = field(default=0.75, metadata={"help": "Fraction of attention heads kept per layer."})
    calibration_samples: int = field(default=512, metadata={"help": "Training examples used for calibration."})
    calibration_batch_size: int = field(default=32, metadata={"help": "Calibration batch size (per process)."})
    pruner_config_file: str | None = field(
        default=None, metadata={"help": "A PrunerConfig JSON; its settings override the two ratios above."}
    )
    iterative_steps: int = field(default=1, metadata={"help": "Prune in this many steps (>1: fine-tune between)."})
    iterative_max_steps: int = field(default=50, metadata={"help": "Optimizer steps of each in-between fine-tune."})
    do_train_dense: bool = field(default=False, metadata={"help": "Fine-tune the dense model on the task first."})
    do_train_pruned: bool = field(default=True, metadata={"help": "Fine-tune (or distil) the pruned model."})
    model_card: bool = field(default=True, metadata={"help": "Write README.md describing the pruning."})

    def pruner_config(self) -> PrunerConfig:
        if self.pruner_config_file:
            return PrunerConfig.from_json_file(self.pruner_config_file)
        return PrunerConfig(ffn_keep_ratio=self.ffn_keep_ratio, head_keep_ratio=self.head_keep_ratio,
                            calibration_batch_size=self.calibration_batch_size,
                            max_calibration_samples=self.calibration_samples)


def load_raw_datasets(data_args: DataArguments, seed: int) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        if data_args.train_file is None:
            raise ValueError("pass --dataset_name or --train_file")
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files[data_args.validation_split_name] = data_args.validation_file
        extension = data_args.train_file.rsplit(".", 1)[-1]
        raw = datasets.load_dataset("json" if extension in ("json", "jsonl") else extension, data_files=files)
    if data_args.validation_split_name not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw = datasets.DatasetDict({"train": split["train"], data_args.validation_split_name: split["test"]})
    return raw


def compute_metrics(eval_pred) -> dict[str, float]:
    """Accuracy (with its standard error) and macro F1, from the `evaluate` modules that ship with hf_ispasp.

    ``load_metric("f1")`` is ``evaluate.load`` on the package's copy, so it needs no Hub; where the Hub is
    reachable, ``evaluate.load("f1")`` computes the same.
    """
    import torch

    logits, labels = eval_pred
    metrics = classification_metrics(torch.as_tensor(np.asarray(logits)), labels)
    f1 = load_metric("f1", keep_in_memory=True).compute(
        predictions=np.asarray(logits).argmax(-1), references=labels, average="macro")["f1"]
    return {"accuracy": metrics["accuracy"], "accuracy_stderr": metrics["accuracy_stderr"], "macro_f1": f1}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataArguments, PruningArguments, DistillationArguments,
                               TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, prune_args, distill_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, prune_args, distill_args, training_args = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO
                        if training_args.should_log else logging.WARNING, handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    # Data ------------------------------------------------------------------------------------------------
    raw = load_raw_datasets(data_args, training_args.seed)
    train_raw, eval_raw = raw["train"], raw[data_args.validation_split_name]
    text_column = data_args.text_column or next(
        (c for c in ("text", "sentence", "sentence1", "content") if c in train_raw.column_names), None
    )
    if text_column is None:
        raise ValueError(f"no text column among {train_raw.column_names}; pass --text_column")
    feature = train_raw.features.get(data_args.label_column)
    if isinstance(feature, datasets.ClassLabel):
        label_names = feature.names
        to_id = None
    else:  # raw values in a csv/json file: sort them for a stable id mapping
        label_names = sorted({str(v) for v in train_raw[data_args.label_column]})
        to_id = {name: i for i, name in enumerate(label_names)}
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)

    def preprocess(batch):
        texts = (batch[text_column],) if not data_args.text_pair_column else (
            batch[text_column], batch[data_args.text_pair_column])
        out = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        labels = batch[data_args.label_column]
        out["labels"] = [to_id[str(v)] for v in labels] if to_id else labels
        return out

    with training_args.main_process_first(desc="tokenization"):
        train = train_raw.map(preprocess, batched=True, remove_columns=train_raw.column_names)
        evaluation = eval_raw.map(preprocess, batched=True, remove_columns=eval_raw.column_names)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    collator = DataCollatorWithPadding(tokenizer)

    # Dense model -----------------------------------------------------------------------------------------
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=collator, compute_metrics=compute_metrics)
    if prune_args.do_train_dense:
        trainer.train()
    metrics = {"dense": trainer.evaluate(metric_key_prefix="dense")}
    dense = trainer.model.eval()
    accelerator = trainer.accelerator  # reduces the calibration statistics across processes

    # Prune -----------------------------------------------------------------------------------------------
    config = prune_args.pruner_config()
    config.show_progress = training_args.should_log and not training_args.disable_tqdm
    calibration = train.shuffle(seed=training_args.seed).remove_columns(["labels"])
    shard = shard_calibration_data(calibration, accelerator, config, tokenizer.pad_token_id or 0)
    if prune_args.iterative_steps > 1:
        step_args = dataclasses.replace(training_args, max_steps=prune_args.iterative_max_steps, save_strategy="no",
                                        eval_strategy="no", load_best_model_at_end=False, push_to_hub=False)
        pruned, reports = iterative_prune(
            dense, config, list(shard), step_args, num_steps=prune_args.iterative_steps, train_dataset=train,
            distillation=distill_args, accelerator=accelerator, data_collator=collator,
        )
        report = reports[-1]
        report.params_before = reports[0].params_before
        report.flops_before = reports[0].flops_before
    else:
        pruner = ISpaSPPruner(dense, config, accelerator=accelerator)
        pruned = pruner.prune(shard)
        report = pruner.report
    logger.info("pruned: %d -> %d parameters, widths %s", report.params_before, report.params_after,
                pruned.config.ispasp["widths"])

    # Recover ---------------------------------------------------------------------------------------------
    trainer = DistillationTrainer(
        model=pruned, args=training_args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
        compute_metrics=compute_metrics, teacher_model=dense if distill_args.active else None,
        distillation=distill_args,
    )
    metrics["pruned"] = trainer.evaluate(metric_key_prefix="pruned")
    if prune_args.do_train_pruned:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics["fine-tuned"] = trainer.evaluate(metric_key_prefix="finetuned")

    # Save ------------------------------------------------------------------------------------------------
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model = trainer.model
        save_pruned(model, training_args.output_dir)
        tokenizer.save_pretrained(training_args.output_dir)
        summary = {"num_processes": trainer.accelerator.num_processes, "metrics": metrics,
                   "pruning": report.to_dict(), "widths": model.config.ispasp["widths"]}
        with open(os.path.join(training_args.output_dir, "pruning_results.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if prune_args.model_card:
            table = {name: {k.split("_", 1)[1]: v for k, v in values.items() if k.endswith(("accuracy", "_loss"))}
                     for name, values in metrics.items()}
            card = pruning_model_card(model, model_args.model_name_or_path, report, table,
                                      dataset=data_args.dataset_name or os.path.basename(data_args.train_file))
            with open(os.path.join(training_args.output_dir, "README.md"), "w") as f:
                f.write(card)
        if training_args.push_to_hub:
            from huggingface_hub import HfApi

            repo = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
            api = HfApi(token=training_args.hub_token)
            repo_id = api.create_repo(repo, private=training_args.hub_private_repo, exist_ok=True).repo_id
            api.upload_folder(repo_id=repo_id, folder_path=training_args.output_dir,
                              ignore_patterns=["checkpoint-*", "runs/*"], commit_message="i-SpaSP pruned model")
        logger.info("results: %s", json.dumps(metrics))
    destroy_process_group()


if __name__ == "__main__":
    main()
