#!/usr/bin/env python
"""Prune a causal language model with i-SpaSP, measure perplexity, recover by distillation, save.

model + text -> perplexity of the dense model -> prune on ``--num_calibration_samples`` chunks -> perplexity
one-shot -> (``--do_train``: fine-tune with token-level distillation from the dense model -> perplexity) -> a
greedy sample from ``--prompt`` for each model, a before/after table -> save_pretrained with the width record and
the tokenizer, ``pruning_results.json`` and a model card. Runs the same with ``python`` and ``accelerate launch``
(calibration is sharded across processes and the statistics are summed through accelerate; evaluation and
training are data-parallel).

    python examples/prune_causal_lm.py \
        --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --block_size 512 --num_calibration_samples 128 --ffn_keep_ratio 0.7 --head_keep_ratio 0.75 \
        --do_train --max_steps 200 --learning_rate 2e-5 --distill_weight 0.5 --output_dir out/qwen-pruned

    python examples/prune_causal_lm.py --model_name_or_path ./my-llama \
        --train_file train.txt --validation_file valid.txt --gqa_groups query --output_dir out/pruned

See examples/README.md for ``accelerate launch``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_ispasp import ISpaSPPruner, PrunerConfig, save_pruned
from hf_ispasp.distributed import destroy_process_group, shard_calibration_data
from hf_ispasp.evaluation import load as load_metric
from hf_ispasp.language_modeling import calibration_chunks, chunk_text, default_block_size, greedy_sample
from hf_ispasp.metrics import count_parameters, latency_ratio
from hf_ispasp.training import DistillationArguments, DistillationTrainer, iterative_prune, pruning_model_card

logger = logging.getLogger(__name__)

#: PruningArguments fields handed to PrunerConfig when given (``None``: the config file's or PrunerConfig's value).
PRUNER_FLAGS = ("ffn_keep_ratio", "head_keep_ratio", "gqa_groups", "selection", "round_to", "calibration_batch_size")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or local folder of the (dense) causal LM."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` name (e.g. wikitext)."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Its configuration (e.g. wikitext-2-raw-v1)."}
    )
    train_file: str | None = field(default=None, metadata={"help": "A .txt (one document a line) or .json(l)."})
    validation_file: str | None = field(default=None, metadata={"help": "A .txt or .json(l) evaluation file."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    validation_split_name: str = field(default="validation", metadata={"help": "Evaluation split name."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Held-out %% of train when there is no evaluation split."}
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per chunk (default: min(1024, the model's maximum length))."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training chunks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on evaluation chunks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenizing."})


@dataclass
class PruningArguments:
    ffn_keep_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of FFN neurons kept per layer (PrunerConfig default 0.5)."}
    )
    head_keep_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of attention groups kept per layer: KV heads with their queries, or query "
                          "heads with --gqa_groups query (PrunerConfig default 0.75)."},
    )
    gqa_groups: str | None = field(
        default=None, metadata={"help": "kv (whole key/value heads) or query (query heads, equally many per KV head)."}
    )
    selection: str | None = field(
        default=None, metadata={"help": "Selection rule: ispasp (default) or a baseline (wanda_sp, flap, ...)."}
    )
    round_to: int | None = field(default=None, metadata={"help": "Round kept FFN widths to a multiple of this."})
    calibration_batch_size: int | None = field(default=None, metadata={"help": "Calibration batch (per process)."})
    pruner_config_file: str | None = field(
        default=None, metadata={"help": "A PrunerConfig JSON; the flags above, when given, override it."}
    )
    num_calibration_samples: int = field(default=128, metadata={"help": "Training chunks used for calibration."})
    iterative_steps: int = field(default=1, metadata={"help": "Prune in this many steps (>1: fine-tune between)."})
    iterative_max_steps: int = field(default=50, metadata={"help": "Optimizer steps of each in-between fine-tune."})
    prompt: str = field(default="The", metadata={"help": "Prompt of the greedy samples before and after."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per sample."})
    latency_repeats: int = field(
        default=10, metadata={"help": "Timed dense/pruned pairs per round on one chunk (0: no latency)."}
    )
    model_card: bool = field(default=True, metadata={"help": "Write README.md describing the pruning."})

    def pruner_config(self) -> PrunerConfig:
        """The config file (if any), then every pruning flag given, forwarded by name to PrunerConfig."""
        known = {f.name for f in dataclasses.fields(PrunerConfig)}
        settings = PrunerConfig.from_json_file(self.pruner_config_file).to_dict() if self.pruner_config_file else {}
        for name in PRUNER_FLAGS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in known:
                raise ValueError(f"--{name} is not supported by this hf_ispasp (PrunerConfig has no {name!r} field)")
            settings[name] = value
        settings["max_calibration_samples"] = self.num_calibration_samples
        return PrunerConfig.from_dict(settings)


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
        builder = {"txt": "text", "json": "json", "jsonl": "json"}.get(extension, extension)
        raw = datasets.load_dataset(builder, data_files=files)
    if data_args.validation_split_name not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=seed)
        raw = datasets.DatasetDict({"train": split["train"], data_args.validation_split_name: split["test"]})
    return raw


def perplexity(metrics: dict[str, float], prefix: str) -> float:
    """exp of the evaluation loss: every chunk has ``block_size`` tokens, so the Trainer's mean is per token.

    Under N processes the Trainer fills the last evaluation batch by repeating chunks, which moves the mean
    slightly unless the chunks fill whole batches on every process (``--max_eval_samples``).
    """
    loss = metrics[f"{prefix}_loss"]
    # The Trainer's loss is already a mean per token, so one group of one token gives exp(loss); the module
    # (hf_ispasp.evaluation's `evaluate` module, no Hub needed) returns inf where that overflows.
    return load_metric("perplexity", keep_in_memory=True).compute(nll=[loss], num_tokens=[1])["perplexity"]


def synchronized_clock(device: torch.device) -> Callable[[], float]:
    """``perf_counter`` after the device's queued kernels finished: GPU calls return before they run."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


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
    config = prune_args.pruner_config()  # a bad budget fails before any loading
    config.show_progress = training_args.should_log and not training_args.disable_tqdm

    # Model and data --------------------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    dense = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype)
    block_size = data_args.block_size or default_block_size(dense, tokenizer)
    raw = load_raw_datasets(data_args, training_args.seed)
    with training_args.main_process_first(desc="tokenizing and grouping"):
        train = chunk_text(raw["train"], tokenizer, block_size, data_args.text_column,
                           data_args.preprocessing_num_workers)
        evaluation = chunk_text(raw[data_args.validation_split_name], tokenizer, block_size, data_args.text_column,
                                data_args.preprocessing_num_workers)
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    logger.info("%d training and %d evaluation chunks of %d tokens", len(train), len(evaluation), block_size)

    # Dense model -----------------------------------------------------------------------------------------
    trainer = Trainer(model=dense, args=training_args, eval_dataset=evaluation, data_collator=default_data_collator)
    metrics = {"dense": trainer.evaluate(metric_key_prefix="dense")}
    dense = trainer.model.eval()
    accelerator = trainer.accelerator  # reduces the calibration statistics across processes
    main_process = trainer.is_world_process_zero()
    samples = {"prompt": prune_args.prompt}
    if main_process:  # generation runs no collective: the other processes go on meanwhile
        samples["dense"] = greedy_sample(dense, tokenizer, prune_args.prompt, prune_args.max_new_tokens)

    # Prune -----------------------------------------------------------------------------------------------
    calibration = calibration_chunks(train, prune_args.num_calibration_samples, training_args.seed)
    shard = shard_calibration_data(calibration, accelerator, config, tokenizer.pad_token_id or 0)
    if prune_args.iterative_steps > 1:
        step_args = dataclasses.replace(training_args, max_steps=prune_args.iterative_max_steps, save_strategy="no",
                                        eval_strategy="no", load_best_model_at_end=False, push_to_hub=False)
        pruned, reports = iterative_prune(
            dense, config, list(shard), step_args, num_steps=prune_args.iterative_steps, train_dataset=train,
            distillation=distill_args, accelerator=accelerator, data_collator=default_data_collator,
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
    if main_process:
        samples["pruned"] = greedy_sample(pruned, tokenizer, prune_args.prompt, prune_args.max_new_tokens)

    # Recover ---------------------------------------------------------------------------------------------
    trainer = DistillationTrainer(
        model=pruned, args=training_args, train_dataset=train, eval_dataset=evaluation,
        data_collator=default_data_collator, teacher_model=dense if distill_args.active else None,
        distillation=distill_args,
    )
    metrics["pruned"] = trainer.evaluate(metric_key_prefix="pruned")
    if training_args.do_train:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics["fine-tuned"] = trainer.evaluate(metric_key_prefix="finetuned")
        if main_process:
            samples["fine-tuned"] = greedy_sample(trainer.model, tokenizer, prune_args.prompt,
                                                  prune_args.max_new_tokens)
    prefixes = {"dense": "dense", "pruned": "pruned", "fine-tuned": "finetuned"}
    ppl = {name: perplexity(values, prefixes[name]) for name, values in metrics.items()}

    # Report and save -------------------------------------------------------------------------------------
    trainer.accelerator.wait_for_everyone()
    if main_process:
        model = trainer.model.eval()
        latency = None
        if prune_args.latency_repeats > 0:
            example = {"input_ids": torch.tensor(evaluation[0]["input_ids"], device=model.device)[None]}
            with torch.no_grad():
                latency = latency_ratio(dense, model, example, repeats=prune_args.latency_repeats,
                                        clock=synchronized_clock(model.device))
        params = {"dense": count_parameters(dense), "pruned": count_parameters(model)}
        print(summary_table(ppl, params, latency, block_size))
        for name in ("dense", "pruned", "fine-tuned"):
            if name in samples:
                print(f"\n[{name}] {samples[name]}")
        save_pruned(model, training_args.output_dir, tokenizer=tokenizer)
        results = {
            "num_processes": trainer.accelerator.num_processes, "block_size": block_size, "perplexity": ppl,
            "parameters": params, "latency": latency.to_dict() if latency is not None else None,
            "samples": samples, "metrics": metrics, "pruning": report.to_dict(),
            "widths": model.config.ispasp["widths"], "pruner_config": config.to_dict(),
        }
        with open(os.path.join(training_args.output_dir, "pruning_results.json"), "w") as f:
            json.dump(results, f, indent=2)
        if prune_args.model_card:
            table = {name: {"perplexity": value, "loss": metrics[name][f"{prefixes[name]}_loss"]}
                     for name, value in ppl.items()}
            dataset = data_args.dataset_name or os.path.basename(data_args.train_file)
            card = pruning_model_card(model, model_args.model_name_or_path, report, table, dataset=dataset)
            with open(os.path.join(training_args.output_dir, "README.md"), "w") as f:
                f.write(card)
        if training_args.push_to_hub:
            from huggingface_hub import HfApi

            repo = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
            api = HfApi(token=training_args.hub_token)
            repo_id = api.create_repo(repo, private=training_args.hub_private_repo, exist_ok=True).repo_id
            api.upload_folder(repo_id=repo_id, folder_path=training_args.output_dir,
                              ignore_patterns=["checkpoint-*", "runs/*"], commit_message="i-SpaSP pruned model")
        logger.info("perplexity: %s", json.dumps(ppl))
    destroy_process_group()


def summary_table(ppl: dict[str, float], params: dict[str, int], latency: Any, block_size: int) -> str:
    """Dense vs pruned: parameters, perplexity (one-shot and fine-tuned) and the latency ratio, in markdown."""
    tuned = "fine-tuned" in ppl
    header = ("", "dense", "pruned (one-shot)") + (("fine-tuned",) if tuned else ())
    size = f"{_count(params['pruned'])} ({100 * params['pruned'] / params['dense']:.1f}%)"
    rows = [("parameters", _count(params["dense"]), size) + ((size,) if tuned else ()),
            ("perplexity", f"{ppl['dense']:.2f}", f"{ppl['pruned']:.2f}")
            + ((f"{ppl['fine-tuned']:.2f}",) if tuned else ())]
    if latency is not None:
        speed = f"{latency.candidate_s * 1e3:.1f} ms ({latency.speedup:.2f}x faster)"
        rows.append((f"latency, 1 x {block_size} tokens", f"{latency.baseline_s * 1e3:.1f} ms", speed)
                    + ((speed,) if tuned else ()))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(["", *lines, *("| " + " | ".join(row) + " |" for row in rows)])



def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


if __name__ == "__main__":
    main()
