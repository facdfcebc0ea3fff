"""Recovering accuracy after pruning: a distillation ``Trainer``, :func:`iterative_prune` (pruning during training
with :class:`~hf_ispasp.pruning_callback.PruningCallback`, re-exported here), a model card.

The student is the compacted model itself (an ordinary ``PreTrainedModel`` with smaller modules), so the
``Trainer``'s evaluation, ``compute_metrics``, checkpointing and resume work unchanged: a checkpoint holds the
compacted weights and a ``config.json`` with the width record, and resuming loads that state dict into the
already-compacted model. To resume in a fresh process, rebuild the student with
``hf_ispasp.load_pruned(checkpoint_dir)`` (``from_pretrained`` would build the dense shapes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainingArguments

from .config import PrunerConfig
from .importance import is_causal_lm
from .pruner import ISpaSPPruner, PruningReport
from .pruning_callback import PruningCallback, _describe_schedule, remap_optimizer, schedule_overrides
from .record import METADATA_KEY

__all__ = [
    "DistillationArguments",
    "DistillationTrainer",
    "PruningCallback",
    "distillation_loss",
    "distillation_mask",
    "hidden_state_loss",
    "iterative_prune",
    "pruning_model_card",
    "remap_optimizer",
    "schedule_overrides",
]

logger = logging.getLogger(__name__)


@dataclass
class DistillationArguments:
    """How the student learns from the dense teacher; parseable with ``HfArgumentParser``.

    The training loss is ``(1 - distill_weight) * task + distill_weight * T^2 * KL(teacher_T || student_T)
    + hidden_weight * hidden``, where ``hidden`` is the relative squared error between the student's and the
    teacher's hidden states (every layer; pruning keeps the hidden size, so they compare directly).

    Args:
        distill_weight: Weight of the logit KL term; 0 trains on the task loss only.
        temperature: Softmax temperature of the KL term (the term is scaled by ``T^2`` so its gradients keep
            their size when ``T`` changes, as in Hinton et al.).
        hidden_weight: Weight of the hidden-state matching term; 0 disables it.
    """

    distill_weight: float = field(default=0.5, metadata={"help": "Weight of the logit distillation term (0-1)."})
    temperature: float = field(default=2.0, metadata={"help": "Distillation softmax temperature."})
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight of hidden-state matching (0: off)."})

    def __post_init__(self) -> None:
        for name in ("distill_weight", "temperature", "hidden_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r} must be a number, got {type(value).__name__}.")
            setattr(self, name, float(value))
        if not (0.0 <= self.distill_weight <= 1.0):
            raise ValueError(f"distill_weight={self.distill_weight!r} must be in [0, 1] (0: task loss only).")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature!r} must be a positive number (e.g. 2.0).")
        if not (math.isfinite(self.hidden_weight) and self.hidden_weight >= 0):
            raise ValueError(f"hidden_weight={self.hidden_weight!r} must be >= 0 (0 disables hidden matching).")

    @property
    def active(self) -> bool:
        return self.distill_weight > 0 or self.hidden_weight > 0


def _token_rows(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(positions x features): per-token tensors keep real tokens only; per-sequence tensors pass through."""
    if mask is not None and tensor.dim() == 3 and tensor.shape[:2] == mask.shape:
        return tensor[mask.bool()]
    return tensor.reshape(-1, tensor.shape[-1])


def distillation_mask(
    logits: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
    shifted: bool = False,
) -> torch.Tensor | None:
    """Positions of per-token logits the logit KL should count: real tokens that the task loss scores too.

    Padding (``attention_mask == 0``) never counts. With per-token ``labels``, a position counts only where its
    target is not ``-100``; a causal LM's logits at ``t`` predict ``labels[t + 1]`` (``shifted``), so its last
    position and the positions before masked targets (prompt tokens, padding, an ``eos`` used as padding) drop
    out, as they do from the model's own loss. The KL and the LM loss then average over the same tokens.

    Args:
        logits: ``(batch, seq, vocab)`` (other shapes: no mask, ``None`` is returned).
        attention_mask: ``(batch, seq)``.
        labels: ``(batch, seq)`` targets with ``-100`` where nothing is predicted.
        shifted: The model's loss shifts the labels (a causal LM).
    """
    if logits.dim() != 3:
        return None
    positions = logits.shape[:2]
    mask = None
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(positions):
        mask = attention_mask.to(logits.device).bool()
    if labels is not None and tuple(labels.shape) == tuple(positions) and not labels.is_floating_point():
        targets = labels.to(logits.device) != -100
        if shifted:
            targets = torch.cat([targets[:, 1:], torch.zeros_like(targets[:, :1])], dim=1)
        mask = targets if mask is None else mask & targets
    return mask


# Float32 elements of one chunk of the token-level KL (256 MB): a 7B decoder's logits for 4 x 2048 tokens over a
# 32k vocabulary are 1 GB in float32, and the KL's softmaxes and saved tensors several times that.
KL_CHUNK_ELEMENTS = 2**26


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
    attention_mask: torch.Tensor | None = None, chunk_rows: int | None = None,
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over sequences (or real tokens).

    Args:
        student_logits: ``(batch, classes)`` or ``(batch, seq, vocab)``.
        teacher_logits: Same shape as ``student_logits``.
        temperature: Softmax temperature.
        attention_mask: Drops padding positions of per-token logits (any ``(batch, seq)`` token mask works, e.g.
            :func:`distillation_mask`'s).
        chunk_rows: Token rows per chunk. Each chunk's float32 softmaxes are recomputed in the backward pass
            (activation checkpointing) instead of kept, so the loss holds one chunk in float32 at a time. Default:
            as many rows as fit :data:`KL_CHUNK_ELEMENTS`; small problems are one chunk.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows={chunk_rows!r} must be a positive integer (or None for the default)")
    student = _token_rows(student_logits, attention_mask)
    teacher = _token_rows(teacher_logits, attention_mask)
    rows = student.shape[0]
    if rows == 0:  # no position counts (every target masked): nothing to distil, keep the graph
        return student_logits.sum() * 0.0
    chunk = chunk_rows or max(1, KL_CHUNK_ELEMENTS // max(student.shape[-1], 1))
    if rows <= chunk:
        total = _kl_sum(student, teacher, temperature)
    else:
        total = sum(
            checkpoint(_kl_sum, student[i : i + chunk], teacher[i : i + chunk], temperature, use_reentrant=False)
            for i in range(0, rows, chunk)
        )
    return total / rows * temperature**2


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed KL of the rows of ``student`` from ``teacher``, softmaxes at ``temperature`` in float32."""
    return F.kl_div(F.log_softmax(student.float() / temperature, -1), F.log_softmax(teacher.float() / temperature, -1),
                    log_target=True, reduction="sum")


def hidden_state_loss(
    student_hidden: Iterable[torch.Tensor], teacher_hidden: Iterable[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over layers of ``||S - T||^2 / ||T||^2`` on real tokens (scale-free across layers and models).

    Args:
        student_hidden: The student's ``hidden_states`` (embeddings, then one per layer).
        teacher_hidden: The teacher's, with as many entries and the same hidden size.
        attention_mask: Drops padding positions.
    """
    student_hidden, teacher_hidden = list(student_hidden), list(teacher_hidden)
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"the student returns {len(student_hidden)} hidden states and the teacher {len(teacher_hidden)}; "
            "hidden-state matching needs the same number of layers"
        )
    terms = []
    for s, t in zip(student_hidden, teacher_hidden, strict=True):
        s, t = _token_rows(s, attention_mask).float(), _token_rows(t, attention_mask).float()
        terms.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


class DistillationTrainer(Trainer):
    """``Trainer`` that mixes the task loss with distillation from a (dense) teacher.

    Evaluation reports the plain task loss (``eval_loss`` stays comparable with and without distillation);
    ``compute_metrics``, checkpoints and ``resume_from_checkpoint`` are the ``Trainer``'s own. The teacher is
    frozen (run under ``no_grad``), kept in eval mode on the training device, never wrapped for distribution
    and never saved. With ``distill_weight == hidden_weight == 0`` (or no teacher) this is exactly ``Trainer``.

    Causal LMs: the task loss is the model's own next-token loss on ``labels`` (``-100`` ignored, e.g. from
    ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``); the logit KL is token-level over the positions that
    loss scores (:func:`distillation_mask`), so padding and masked targets never count. The teacher runs without
    a KV cache.

    Args:
        model: The (pruned) student.
        args: The usual ``TrainingArguments``.
        teacher_model: The dense model; ``None`` trains on the task loss only.
        distillation: Loss weights and temperature.
        kwargs: Passed to ``Trainer`` (datasets, collator, ``compute_metrics``, callbacks, ...).
    """

    def __init__(
        self, model: nn.Module | None = None, args: TrainingArguments | None = None,
        teacher_model: nn.Module | None = None, distillation: DistillationArguments | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(model=model, args=args, **kwargs)
        self.distillation = distillation or DistillationArguments()
        self.teacher = teacher_model
        if self.teacher is not None:
            # Frozen by running under no_grad, not by requires_grad_(False): that would leak into the caller's
            # model (e.g. the dense model that later prunes deep-copy and fine-tune).
            self.teacher.eval().to(self.args.device)
        if self.distilling:
            # Our loss is a per-batch mean: let the Trainer divide it by the gradient-accumulation steps.
            self.loss_is_scaled_for_ga = False
        self._parts: dict[str, list[float]] = {}
        # A causal LM's logits at t predict labels[t + 1]: the KL mask follows the shift of the model's own loss.
        self._student_causal = is_causal_lm(self.accelerator.unwrap_model(self.model))
        self._teacher_causal = self.teacher is not None and is_causal_lm(self.teacher)

    @property
    def distilling(self) -> bool:
        return self.teacher is not None and self.distillation.active

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not (self.distilling and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        config = self.distillation
        want_hidden = config.hidden_weight > 0
        model_inputs = {**inputs, "output_hidden_states": True} if want_hidden else inputs
        has_labels = inputs.get("labels") is not None
        if has_labels:
            task, outputs = super().compute_loss(model, model_inputs, return_outputs=True)
        else:
            task, outputs = None, model(**model_inputs)
        teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "label")}
        if want_hidden:
            teacher_inputs["output_hidden_states"] = True
        if self._teacher_causal:
            teacher_inputs["use_cache"] = False  # a frozen teacher's KV cache would only hold memory
        with torch.no_grad():
            teacher_out = self.teacher(**teacher_inputs)
        mask = inputs.get("attention_mask")
        loss = torch.zeros((), device=outputs["logits"].device)
        if task is not None:
            loss = loss + (1.0 - config.distill_weight) * task
            self._parts.setdefault("loss_task", []).append(float(task.detach()))
        if config.distill_weight > 0:
            kd_mask = distillation_mask(outputs["logits"], mask, inputs.get("labels"), self._student_causal)
            kd = distillation_loss(outputs["logits"], teacher_out["logits"], config.temperature, kd_mask)
            loss = loss + config.distill_weight * kd
            self._parts.setdefault("loss_kd", []).append(float(kd.detach()))
        if want_hidden:
            hidden = hidden_state_loss(outputs["hidden_states"], teacher_out["hidden_states"], mask)
            loss = loss + config.hidden_weight * hidden
            self._parts.setdefault("loss_hidden", []).append(float(hidden.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the running means of the loss components (this process's) to the training logs."""
        if "loss" in logs and self._parts:
            logs.update({k: round(sum(v) / len(v), 4) for k, v in self._parts.items() if v})
            self._parts = {}
        super().log(logs, start_time)


def iterative_prune(
    model: nn.Module,
    config: PrunerConfig,
    calibration_data: Iterable[Any],
    args: TrainingArguments,
    num_steps: int = 3,
    train_dataset: Any = None,
    teacher_model: nn.Module | None = None,
    distillation: DistillationArguments | None = None,
    accelerator: Any = None,
    finetune_after_last: bool = False,
    **trainer_kwargs: Any,
) -> tuple[nn.Module, list[PruningReport]]:
    """Prune toward ``config``'s budget in ``num_steps`` prunes with a short fine-tune between them.

    Keep ratios in ``PrunerConfig`` are relative to the current widths, so each step gets per-layer ratios that
    compound to the final budget relative to the *original* model: the final widths equal those of a one-shot
    prune with ``config``. Each prune calibrates on the fine-tuned model of the previous step.

    A thin user of :class:`PruningCallback`: one :class:`DistillationTrainer` on a copy of ``model`` runs
    ``num_steps - 1`` fine-tunes of the length ``args`` gives (``max_steps``, or its epochs over
    ``train_dataset``) back to back, and the callback prunes before the first one and after each (the Adam moments
    of the kept weights and the learning-rate schedule run on through the prunes). It writes to
    ``{args.output_dir}/iterative``.

    Args:
        model: The dense model (not modified).
        config: The final budget and algorithm settings.
        calibration_data: Re-iterable calibration batches (a DataLoader, a list or a Dataset; this process's
            shard under ``accelerate launch``, see :func:`hf_ispasp.distributed.shard_calibration_data`).
        args: ``TrainingArguments`` of each intermediate fine-tune (keep it short, e.g. ``max_steps``).
        num_steps: Number of prunes (1 is a one-shot prune).
        train_dataset: Data of the intermediate fine-tunes.
        teacher_model: Distillation teacher (default: ``model`` itself when ``distillation`` is active).
        distillation: Loss settings of the fine-tunes (default: task loss only).
        accelerator: Passed to ``ISpaSPPruner`` for the reduction of statistics across processes.
        finetune_after_last: Fine-tune after the last prune as well.
        trainer_kwargs: Passed to :class:`DistillationTrainer` (collator, ``compute_metrics``, ...).

    Returns:
        The pruned (and fine-tuned) model and one ``PruningReport`` per step.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    if isinstance(calibration_data, Iterator) and num_steps > 1:
        raise ValueError("calibration_data is a one-shot iterator; pass a DataLoader, list or Dataset so every "
                         "step can read it again")
    if num_steps > 1 and train_dataset is None:
        raise ValueError("an iterative schedule fine-tunes between steps: pass train_dataset")
    stages = num_steps - 1 + int(finetune_after_last)
    if stages == 0:  # a one-shot prune: no Trainer
        pruner = ISpaSPPruner(model, config, accelerator=accelerator)
        pruned = pruner.prune(calibration_data)
        _describe_schedule(pruned, config, {"num_steps": 1, "finetune_after_last": False})
        return pruned, [pruner.report]
    distillation = distillation or DistillationArguments(distill_weight=0.0)
    if teacher_model is None and distillation.active:
        teacher_model = model
    run_args = dataclasses.replace(args, output_dir=os.path.join(args.output_dir, "iterative"))
    trainer = DistillationTrainer(
        model=copy.deepcopy(model), args=run_args, train_dataset=train_dataset, teacher_model=teacher_model,
        distillation=distillation, **trainer_kwargs,
    )
    stage = _stage_steps(trainer)
    trainer.args.max_steps = stage * stages
    callback = PruningCallback([stage * k for k in range(num_steps)], calibration_data, config,
                               trainer=trainer, accelerator=accelerator)
    trainer.train()
    pruned = trainer.model
    _describe_schedule(pruned, config, {"num_steps": num_steps, "finetune_after_last": finetune_after_last})
    return pruned, callback.reports


def _stage_steps(trainer: Trainer) -> int:
    """Optimizer steps of one fine-tune under the trainer's arguments (``max_steps`` or epochs of the data)."""
    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    per_epoch = max(len(trainer.get_train_dataloader()) // args.gradient_accumulation_steps, 1)
    return max(math.ceil(args.num_train_epochs * per_epoch), 1)


# Model card -----------------------------------------------------------------------------------------------

CITATION = """@article{wolfe2021ispasp,
  title   = {i-SpaSP: Structured Neural Pruning via Sparse Signal Recovery},
  author  = {Wolfe, Cameron R. and Kyrillidis, Anastasios},
  journal = {arXiv preprint arXiv:2112.04905},
  year    = {2021}
}"""


def pruning_model_card(
    model: nn.Module, base_model: str, report: PruningReport | None = None, metrics: dict[str, Any] | None = None,
    dataset: str | None = None, extra: str = "",
) -> str:
    """A README.md for a pruned checkpoint: widths, budget, size, metrics, how to load it, citation.

    Args:
        model: The pruned model (its ``config.ispasp`` record is read).
        base_model: Id or path of the dense model it came from.
        report: The pruning report (parameters and FLOPs before / after).
        metrics: Evaluation results to list, e.g. ``{"dense": {...}, "pruned": {...}}``.
        dataset: Dataset it was calibrated / fine-tuned on.
        extra: Free text appended before the citation.
    """
    record = getattr(getattr(model, "config", None), METADATA_KEY, None) or getattr(model, "ispasp_metadata", {})
    budget = record.get("pruner_config", {})
    lines = ["---", "library_name: transformers", "tags:", "- pruning", "- i-spasp", "- hf-ispasp"]
    if not os.path.isdir(base_model):
        lines.append(f"base_model: {base_model}")
    lines += ["---", "", f"# {os.path.basename(base_model.rstrip('/'))} pruned with i-SpaSP", ""]
    lines.append(f"Structured pruning of `{base_model}` with i-SpaSP (Wolfe & Kyrillidis, arXiv:2112.04905) "
                 f"using [hf_ispasp]{' on ' + dataset if dataset else ''}.")
    lines += ["", "## Budget", "", f"- FFN keep ratio: {budget.get('ffn_keep_ratio')}",
              f"- attention-head keep ratio: {budget.get('head_keep_ratio')}"]
    if budget.get("layer_overrides"):
        lines.append(f"- per-layer overrides: `{budget['layer_overrides']}`")
    if "schedule" in record:
        lines.append(f"- iterative schedule: {record['schedule']}")
    if report is not None:
        lines += [f"- parameters: {report.params_before:,} -> {report.params_after:,} "
                  f"({100 * report.params_after / max(report.params_before, 1):.1f}%)",
                  f"- FLOPs (one 128-token sequence): {report.flops_before:.3g} -> {report.flops_after:.3g}"]
    widths = record.get("widths")
    if widths:
        lines += ["", "## Widths per layer", "", "```json", _compact_json(widths), "```"]
    if metrics:
        lines += ["", "## Evaluation", "", "| model | " + " | ".join(_metric_names(metrics)) + " |",
                  "|---" * (1 + len(_metric_names(metrics))) + "|"]
        for name, values in metrics.items():
            row = [_fmt(values.get(k)) for k in _metric_names(metrics)]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines += ["", "## Loading", "",
              "The checkpoint has compacted shapes; load it with hf_ispasp, which rebuilds them:", "",
              "```python", "from hf_ispasp import load_pruned", "", 'model = load_pruned("path/or/hub-id")', "```"]
    if extra:
        lines += ["", extra]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _metric_names(metrics: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for values in metrics.values():
        names += [k for k in values if k not in names]
    return names


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _compact_json(value: Any) -> str:

    return json.dumps(value, indent=1, sort_keys=True)
