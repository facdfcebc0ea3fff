"""Pruning during ``Trainer.train()``: :class:`PruningCallback`, its schedules, and the optimizer across a prune.

The callback prunes the model the ``Trainer`` trains, in place, at the scheduled steps; :func:`remap_optimizer`
carries the optimizer state of the kept weights over to the compacted parameters, so training continues in the
same ``train()`` call. :func:`hf_ispasp.training.iterative_prune` is a thin user of the callback, and
``hf_ispasp.training`` re-exports these names.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .adapters import adapter_for
from .config import PrunerConfig, kept_count
from .metrics import count_flops, count_parameters
from .portable import attach_portable_save
from .pruner import ISpaSPPruner, PruningReport
from .record import METADATA_KEY
from .serialization import restore_added_biases
from .statistics import to_device

__all__ = ["PruningCallback", "remap_optimizer", "schedule_overrides"]

logger = logging.getLogger(__name__)


# Iterative schedule ---------------------------------------------------------------------------------------


def _block_counts(
    model: nn.Module, config: PrunerConfig | None = None
) -> tuple[dict[tuple[int, str], int], dict[tuple[int, str], int]]:
    """Group count and partition count per (layer, kind), as the pruner with ``config`` will see the blocks.

    One width per kind and layer is what per-layer ratios can express. The adapter is configured first: under
    ``gqa_groups="query"`` a decoder's head groups are query heads in one partition per key/value head.
    """
    adapter = adapter_for(model)
    if config is not None:
        adapter.configure(config)
    counts: dict[tuple[int, str], int] = {}
    partitions: dict[tuple[int, str], int] = {}
    for block in adapter.iter_blocks():
        key = (block.layer, block.kind)
        if counts.setdefault(key, block.num_groups) != block.num_groups:
            raise ValueError(f"layer {block.layer} has several '{block.kind}' blocks of different widths; the "
                             "iterative schedule needs one width per kind and layer")
        partitions[key] = block.partitions
    return counts, partitions


def schedule_overrides(
    original: dict[tuple[int, str], int], current: dict[tuple[int, str], int], config: PrunerConfig,
    fraction: float, partitions: dict[tuple[int, str], int] | None = None,
) -> dict[int, dict[str, float]]:
    """Per-layer keep ratios, relative to the *current* widths, that reach a fraction of the way to the budget.

    ``fraction`` in (0, 1]: the target keep ratio (relative to the original widths) goes linearly from 1 to
    ``config``'s ratio; ``fraction == 1`` gives exactly the widths of a one-shot prune of the original model.

    Args:
        original: Group counts of the dense model per (layer, kind).
        current: Group counts of the model about to be pruned.
        config: The final budget (ratios relative to the original model, overrides included).
        fraction: How far along the schedule this step is.
        partitions: Equal runs per (layer, kind) that keep equally many groups (query heads per key/value head
            under ``gqa_groups="query"``; the count does not change while pruning). Default: 1.
    """
    overrides: dict[int, dict[str, float]] = {}
    for (layer, kind), target in _target_counts(original, config, fraction, partitions).items():
        now = current[(layer, kind)]
        if target > now:
            raise ValueError(f"layer {layer} {kind}: the model already has {now} groups, fewer than the target "
                             f"{target}; start the schedule from the dense model")
        key = "ffn_keep_ratio" if kind == "ffn" else "head_keep_ratio"
        # kept_count(now, target / now) == round(target): the ratio relative to the current width is exact.
        overrides.setdefault(layer, {})[key] = target / now
    return overrides


def _target_counts(
    original: dict[tuple[int, str], int], config: PrunerConfig, fraction: float,
    partitions: dict[tuple[int, str], int] | None = None,
) -> dict[tuple[int, str], int]:
    """Groups per (layer, kind) ``fraction`` of the way from the original widths to ``config``'s."""
    counts = {}
    for (layer, kind), groups in original.items():
        ratio = 1.0 - (1.0 - config.keep_ratio(layer, kind)) * fraction
        runs = (partitions or {}).get((layer, kind), 1)
        # A multiple of the runs: the pruner's kept_count(now, target / now, ..., runs) gives back exactly target.
        counts[(layer, kind)] = kept_count(groups, ratio, config.round_to if kind == "ffn" else 1, runs)
    return counts


def _describe_schedule(model: nn.Module, config: PrunerConfig, schedule: dict[str, Any]) -> None:
    """Make the width record describe the whole schedule, not the last step's relative ratios."""
    record = getattr(getattr(model, "config", None), METADATA_KEY, None)
    if isinstance(record, dict):
        record["pruner_config"] = config.to_dict()
        record["schedule"] = schedule


# Pruning during training ----------------------------------------------------------------------------------


class PruningCallback(TrainerCallback):
    """Prune during ``Trainer.train()`` on a schedule; training goes on with the compacted model in the same run.

    At the end of optimizer step ``steps[k]`` (``0``: before the first step) the model the ``Trainer`` trains is
    pruned in place with i-SpaSP, recalibrated on ``calibration_data`` (eval mode, no grad; train mode restored),
    to the widths of ``targets[k]``, each relative to the dense model the trainer started from:

    - a float in (0, 1]: that fraction of the way from the dense model to ``config``'s budget (per-kind ratios go
      linearly, a FLOPs / params target too); ``1.0`` gives exactly the widths of a one-shot prune with ``config``
      (ratio budgets; a target is re-allocated at each step and reached within the allocation's tolerance).
      Default: ``k / len(steps)``, evenly spaced.
    - a ``PrunerConfig``: its budget (ratios and overrides, or a FLOPs / params target) relative to the dense
      model; the last one is the final budget and must equal ``config``'s when both are given.

    The optimizer is edited in place, not replaced: the ``Trainer``'s training loop, accelerate's
    ``AcceleratedOptimizer`` and the LR scheduler all hold references to it, and none of them can be swapped
    from a callback. Each compacted tensor takes the place of the old one in its param group (in the model's
    parameter order, as ``Trainer.create_optimizer`` builds them, so a saved optimizer state reloads), and its
    state (Adam's ``exp_avg`` / ``exp_avg_sq``, the step count) is the old state sliced to the kept rows /
    columns. The slice is taken from ``report.blocks[i].kept`` and checked against the weights: a tensor the
    prune only sliced must equal the old one at those indices; a block's ``down`` projection (the re-fitted one)
    is sliced by definition of its groups. A tensor for which no slice can be established (e.g. a fused qkv, or a
    bias the prune added) starts with fresh state. The LR scheduler is not touched: it keeps its position.

    Why the callback holds the trainer (:meth:`attach`): a callback is handed the model and the optimizer but not
    the trainer, and resuming needs more. A checkpoint written after a prune holds compacted weights; for
    ``trainer.train(resume_from_checkpoint=...)`` on a trainer built on the dense model, the model must be
    compacted to the checkpoint's widths (its ``config.json`` width record, applied with the adapter's
    ``apply_widths``) *before* the Trainer loads the weights and builds the optimizer whose saved state then
    loads, which happens inside ``train()`` before any callback event. :meth:`attach` therefore wraps that
    trainer's ``train`` (the public method, not a private hook). The steps at or before the checkpoint's
    ``global_step`` count as done; the rest of the schedule runs as planned.

    Not supported: models wrapped for distribution (DDP, FSDP, DeepSpeed): the wrapper holds the old parameters
    and the training loop its own reference to the wrapper, so a prune cannot reach them; this is an error.

    Args:
        steps: Optimizer steps after which to prune, strictly increasing (``0``: before training).
        calibration_data: Re-iterable calibration batches (DataLoader, list or Dataset), read at every prune.
        config: The final budget and the algorithm settings (default: the last of ``targets``).
        targets: One float or ``PrunerConfig`` per step (see above).
        trainer: The ``Trainer`` to attach to (or call :meth:`attach` later).
        accelerator: Passed to ``ISpaSPPruner`` (statistics summed across processes).

    Example::

        callback = PruningCallback([100, 200, 300], calibration, PrunerConfig(ffn_keep_ratio=0.5))
        trainer = DistillationTrainer(model=dense, args=args, train_dataset=data, teacher_model=teacher)
        callback.attach(trainer)
        trainer.train()  # or trainer.train(resume_from_checkpoint=True) in a fresh process
    """

    def __init__(
        self, steps: Sequence[int], calibration_data: Iterable[Any], config: PrunerConfig | None = None,
        targets: Sequence[float | PrunerConfig] | None = None, trainer: Trainer | None = None,
        accelerator: Any = None,
    ) -> None:
        self.steps = _check_steps(steps)
        self.plan = _check_targets(len(self.steps), targets, config)
        self.config = config or self.plan[-1][0]
        if isinstance(calibration_data, Iterator) and len(self.steps) > 1:
            raise ValueError("calibration_data is a one-shot iterator; pass a DataLoader, list or Dataset so every "
                             "prune can read it again")
        self.calibration_data = calibration_data
        self.accelerator = accelerator
        self.reports: list[PruningReport] = []
        self.pruned_at: list[int] = []
        self.trainer: Trainer | None = None
        self._dense: _DenseModel | None = None
        self._done = 0
        if trainer is not None:
            self.attach(trainer)

    # Wiring ------------------------------------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> PruningCallback:
        """Register with ``trainer`` (adds the callback unless already there) and record its dense model."""
        if self.trainer is trainer:
            return self
        if self.trainer is not None:
            raise ValueError("this PruningCallback is already attached to another trainer")
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._dense = _DenseModel.of(self._model(), [c for c, _ in self.plan])
        self._check_widths_shrink()
        train = trainer.train

        def train_resuming(resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
            if resume_from_checkpoint:
                path = resume_from_checkpoint
                if path is True:
                    path = get_last_checkpoint(trainer.args.output_dir)
                if path:  # None: the Trainer raises its own error
                    self._compact_to_checkpoint(path)
            return train(resume_from_checkpoint, *args, **kwargs)

        trainer.train = train_resuming
        return self

    def _model(self) -> nn.Module:
        trainer = self._trainer()
        return trainer.accelerator.unwrap_model(trainer.model)

    def _dense_model(self) -> _DenseModel:
        """Widths of the model as attached (set by :meth:`attach`, together with the trainer)."""
        self._trainer()
        if self._dense is None:
            raise RuntimeError("PruningCallback.attach(trainer) did not finish: attach it again")
        return self._dense

    def _trainer(self) -> Trainer:
        if self.trainer is None:
            raise RuntimeError("PruningCallback is not attached to a trainer: call callback.attach(trainer) before "
                               "trainer.train() (it needs the trainer to compact checkpoints it resumes from)")
        return self.trainer

    # Events ------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._trainer()
        if self.steps[-1] > state.max_steps:
            raise ValueError(f"the pruning schedule ends at step {self.steps[-1]}, after the last training step "
                             f"({state.max_steps}); the final budget would never be reached")
        step = state.global_step
        self._done = sum(s < step or (s == step and step > 0) for s in self.steps)
        if self._done:  # resumed: the checkpoint's widths must be those of the last prune done
            dense = self._dense_model()
            if _block_counts(self._model(), self.plan[self._done - 1][0])[0] == dense.counts[self._done - 1]:
                raise ValueError(f"resumed at step {step}, after {self._done} scheduled prune(s), but the model has "
                                 "its dense widths: the checkpoint has no width record")
        self._prune_due(step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._prune_due(state.global_step)

    def _prune_due(self, step: int) -> None:
        while self._done < len(self.steps) and self.steps[self._done] <= step:
            self._prune(self._done, step)
            self._done += 1

    # Pruning -----------------------------------------------------------------------------------------------
    def _prune(self, index: int, step: int) -> None:
        trainer = self._trainer()
        model = self._model()
        if trainer.model_wrapped is not trainer.model and trainer.model_wrapped is not model:
            raise ValueError(f"the trained model is wrapped ({type(trainer.model_wrapped).__name__}) for "
                             "distribution; PruningCallback prunes a single-process model only")
        config = self._step_config(index, model)
        before = dict(model.named_parameters())
        pruner = ISpaSPPruner(model, config, accelerator=self.accelerator)
        was_training = model.training
        model.eval()  # calibration without dropout; the pruner computes statistics under no_grad
        try:
            pruner.prune(self.calibration_data, inplace=True)
        finally:
            model.train(was_training)
        model.zero_grad(set_to_none=True)  # gradient-based selections leave gradients on the kept tensors
        report = pruner.report
        if report is None:  # prune() always writes one; a subclass that does not cannot be remapped
            raise RuntimeError(f"{type(pruner).__name__}.prune left no report: the optimizer cannot be remapped")
        self.reports.append(report)
        self.pruned_at.append(step)
        final, fraction = self.plan[index]
        _describe_schedule(model, final, {"steps": self.steps, "done": index + 1, "fraction": fraction})
        moved = {"sliced": 0, "kept": 0, "reset": 0}
        if trainer.optimizer is not None:
            moved = remap_optimizer(trainer.optimizer, before, model, report, _decay_names(trainer, model))
        logger.info("PruningCallback: step %d, prune %d/%d: %d -> %d parameters; optimizer state %s",
                    step, index + 1, len(self.steps), report.params_before, report.params_after, moved)

    def _step_config(self, index: int, model: nn.Module) -> PrunerConfig:
        """The config that takes ``model`` (the result of the earlier prunes) to step ``index``'s widths."""
        config, fraction = self.plan[index]
        dense = self._dense_model()
        target = config.budget_target
        if target is None:
            current = _block_counts(model, config)[0]
            overrides = schedule_overrides(dense.counts[index], current, config, fraction, dense.partitions[index])
            return dataclasses.replace(config, ffn_keep_ratio=1.0, head_keep_ratio=1.0, layer_overrides=overrides)
        metric, ratio = target
        wanted = 1.0 - (1.0 - ratio) * fraction
        relative = wanted * dense.sizes[metric] / _model_size(model, metric)
        if relative > 1.0 + 1e-9:
            raise ValueError(f"step {index + 1} of the schedule asks for {metric} {wanted:.4g} of the dense model, "
                             f"but the model already has {wanted / relative:.4g}; targets must shrink")
        return dataclasses.replace(config, **{f"{metric}_keep_ratio": min(relative, 1.0)})

    def _check_widths_shrink(self) -> None:
        """Widths of ratio budgets, step by step: an error before training, not in the middle of it."""
        dense = self._dense_model()
        previous: dict[tuple[int, str], int] | None = None
        for index, (config, fraction) in enumerate(self.plan):
            if config.budget_target is not None:
                continue
            counts = _target_counts(dense.counts[index], config, fraction, dense.partitions[index])
            grown = [key for key, n in counts.items() if previous is not None and n > previous.get(key, n)]
            if grown:
                layer, kind = grown[0]
                raise ValueError(f"step {index + 1} of the schedule keeps {counts[grown[0]]} {kind} groups in layer "
                                 f"{layer}, more than step {index} ({previous[grown[0]]}); widths cannot grow back")
            previous = counts

    # Resume ------------------------------------------------------------------------------------------------
    def _compact_to_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Give the (dense) model the widths of the checkpoint it is about to load, so its weights fit."""
        path = os.path.join(os.fspath(checkpoint), "config.json")
        if not os.path.isfile(path):
            return  # the Trainer reports the missing checkpoint
        with open(path, encoding="utf-8") as f:
            record = json.load(f).get(METADATA_KEY)
        if not isinstance(record, dict) or "widths" not in record:
            return  # saved before the first prune: dense weights
        model = self._model()
        adapter = adapter_for(model)
        if adapter.widths() == record["widths"]:
            return
        before = dict(model.named_parameters())
        adapter.apply_widths(record["widths"])
        restore_added_biases(model, record)
        setattr(model.config, METADATA_KEY, record)
        attach_portable_save(model)
        trainer = self._trainer()
        if trainer.optimizer is not None:  # user-given optimizer: its state is loaded from the checkpoint next
            remap_optimizer(trainer.optimizer, before, model, None, _decay_names(trainer, model))
        logger.info("PruningCallback: compacted the model to the widths of %s before resuming", checkpoint)


@dataclass
class _DenseModel:
    """What the schedule measures against: group counts per step's config, FLOPs and parameters."""

    counts: list[dict[tuple[int, str], int]]
    partitions: list[dict[tuple[int, str], int]]
    sizes: dict[str, float]

    @classmethod
    def of(cls, model: nn.Module, configs: list[PrunerConfig]) -> _DenseModel:
        pairs = [_block_counts(model, config) for config in configs]
        metrics = {c.budget_target[0] for c in configs if c.budget_target is not None}
        return cls([c for c, _ in pairs], [p for _, p in pairs], {m: _model_size(model, m) for m in metrics})


def _model_size(model: nn.Module, metric: str) -> float:
    """FLOPs (of the adapter's example input) or parameters, as the pruner's report counts them."""
    if metric == "params":
        return float(count_parameters(model))
    device = next(model.parameters()).device
    return float(count_flops(model, to_device(adapter_for(model).example_inputs(), device)))


def _check_steps(steps: Sequence[int]) -> list[int]:
    steps = list(steps)
    if not steps:
        raise ValueError("the pruning schedule has no steps: give the optimizer steps to prune at, e.g. [100, 200]")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0]
    if bad:
        raise ValueError(f"pruning steps must be integers >= 0 (optimizer steps), got {bad}")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"pruning steps {steps} must be strictly increasing")
    return [int(s) for s in steps]


_BUDGET_FIELDS = ("ffn_keep_ratio", "head_keep_ratio", "layer_overrides", "round_to", "flops_keep_ratio",
                  "params_keep_ratio", "latency_keep_ratio", "gqa_groups")


def _check_targets(
    count: int, targets: Sequence[float | PrunerConfig] | None, config: PrunerConfig | None
) -> list[tuple[PrunerConfig, float]]:
    """(absolute config, fraction of the way to it) per step, after the checks a schedule must pass."""
    if config is not None and not isinstance(config, PrunerConfig):
        raise TypeError(f"config must be a PrunerConfig, got {type(config).__name__}")
    if targets is None:
        if config is None:
            raise ValueError("give the final budget (config=PrunerConfig(...)) or one target per step (targets=...)")
        targets = [(k + 1) / count for k in range(count)]
    targets = list(targets)
    if len(targets) != count:
        raise ValueError(f"{len(targets)} targets for {count} pruning steps; give one per step")
    if all(isinstance(t, PrunerConfig) for t in targets):
        configs: list[PrunerConfig] = targets  # type: ignore[assignment]
        if config is not None and _budget(configs[-1]) != _budget(config):
            raise ValueError(f"the last target {_budget(configs[-1])} is not the final budget {_budget(config)}: "
                             "the schedule must end at the one-shot target")
        kinds = {c.budget_target[0] if c.budget_target else "ratios" for c in configs}
        if len(kinds) > 1:
            raise ValueError(f"the targets mix budgets of kinds {sorted(kinds)}; give every step the same kind")
        plan = [(c, 1.0) for c in configs]
    elif all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in targets):
        if config is None:
            raise ValueError("fractional targets are fractions of the way to config's budget: give config")
        fractions = [float(t) for t in targets]
        if any(not (0.0 < f <= 1.0) for f in fractions):
            raise ValueError(f"fractional targets {fractions} must be in (0, 1] (1.0: config's budget)")
        if any(b <= a for a, b in zip(fractions, fractions[1:], strict=False)):
            raise ValueError(f"fractional targets {fractions} must increase: widths only shrink")
        if fractions[-1] != 1.0:
            raise ValueError(f"the last fractional target is {fractions[-1]}, not 1.0: the schedule must end at "
                             "config's budget (the one-shot target)")
        plan = [(config, f) for f in fractions]
    else:
        raise TypeError("targets must be all floats (fractions of the way to config) or all PrunerConfigs, got "
                        f"{[type(t).__name__ for t in targets]}")
    targets_kind = [c.budget_target for c, _ in plan]
    if any(t is not None and t[0] == "latency" for t in targets_kind):
        raise ValueError("latency targets cannot be scheduled (latency relative to the dense model is not known "
                         "once it is pruned); use flops_keep_ratio or params_keep_ratio")
    ratios = [1.0 - (1.0 - t[1]) * f for (c, f), t in zip(plan, targets_kind, strict=True) if t is not None]
    if any(b > a for a, b in zip(ratios, ratios[1:], strict=False)):
        raise ValueError(f"the schedule's targets {ratios} grow; each step must keep at most what the one before kept")
    return plan


def _budget(config: PrunerConfig) -> dict[str, Any]:
    data = config.to_dict()
    return {k: data[k] for k in _BUDGET_FIELDS if k in data}


def _decay_names(trainer: Trainer, model: nn.Module) -> set[str]:
    try:
        return set(trainer.get_decay_parameter_names(model))
    except Exception:  # a custom Trainer without it: new tensors join their neighbour's group
        return set()


# Optimizer state across a prune ---------------------------------------------------------------------------


@torch.no_grad()
def remap_optimizer(
    optimizer: torch.optim.Optimizer, before: dict[str, nn.Parameter], model: nn.Module,
    report: PruningReport | None, decay_names: set[str] | None = None,
) -> dict[str, int]:
    """Point ``optimizer`` at the model's current parameters after a prune, carrying state over where it can.

    Edited in place (wrappers such as accelerate's ``AcceleratedOptimizer`` and the LR scheduler keep working).
    Each param group gets the current tensors of the parameters it held, in the model's order; a tensor that is
    new (an added bias) joins the no-decay group (``weight_decay == 0``) if its name is not in ``decay_names``, else
    the decayed one. State tensors shaped like the parameter are sliced to the kept indices (see
    :class:`PruningCallback` for how they are found), other entries (Adam's step) are copied; where no slice is
    known the state is dropped, and the optimizer starts it afresh.

    Args:
        optimizer: The optimizer (or accelerate's wrapper) built over the parameters in ``before``.
        before: ``model.named_parameters()`` before the prune (the old tensors).
        model: The model after the prune.
        report: The prune's report (kept groups per block); ``None``: no slices are known, state of a tensor whose
            shape changed is dropped.
        decay_names: Parameter names the Trainer decays (``Trainer.get_decay_parameter_names``).

    Returns:
        How many tensors kept their state whole (``kept``), sliced (``sliced``) or lost it (``reset``).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper delegates to it
    group_of = {id(p): i for i, group in enumerate(inner.param_groups) for p in group["params"]}
    slices = _kept_slices(model, report)
    counts = {"kept": 0, "sliced": 0, "reset": 0}
    new_groups: list[list[nn.Parameter]] = [[] for _ in inner.param_groups]
    for name, param in model.named_parameters():
        old = before.get(name)
        if old is not None and id(old) in group_of:
            index = group_of[id(old)]
        elif old is None and param.requires_grad:  # a tensor the prune created
            index = _new_param_group(inner.param_groups, name in (decay_names or set()))
        else:
            continue  # frozen, or not optimized before
        new_groups[index].append(param)
        if old is None or old is param:
            counts["kept" if old is param else "reset"] += 1
            continue
        state = inner.state.pop(old, None)
        if not state:
            continue
        moved = _move_state(state, old, param, slices.get(name))
        if moved is None:
            counts["reset"] += 1
        else:
            inner.state[param] = moved
            counts["sliced" if old.shape != param.shape else "kept"] += 1
    current = {id(p) for group in new_groups for p in group}
    for stale in [p for p in inner.state if id(p) not in current]:  # tensors gone from the model
        del inner.state[stale]
    for group, params in zip(inner.param_groups, new_groups, strict=True):
        group["params"] = params
    return counts


def _new_param_group(groups: list[dict[str, Any]], decayed: bool) -> int:
    """The group the Trainer would have put a new tensor in: by whether it decays."""
    for index, group in enumerate(groups):
        if (group.get("weight_decay", 0.0) != 0.0) == decayed:
            return index
    return len(groups) - 1


def _move_state(state: dict[str, Any], old: torch.Tensor, new: torch.Tensor,
                candidates: list[tuple[int, torch.Tensor, bool]] | None) -> dict[str, Any] | None:
    """``state`` for ``new``: shaped entries sliced like the parameter was, or ``None`` if no slice fits."""
    if old.shape == new.shape:
        return state
    index = _find_slice(old, new, candidates or [])
    if index is None:
        return None
    moved: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape:
            for dim, kept in index:
                value = value.index_select(dim, kept.to(value.device))
            moved[key] = value.contiguous()
        else:
            moved[key] = value
    return moved


def _find_slice(old: torch.Tensor, new: torch.Tensor, candidates: list[tuple[int, torch.Tensor, bool]]
                ) -> list[tuple[int, torch.Tensor]] | None:
    """Kept indices per shrunk dimension with ``old[index] == new``, or a ``down`` projection's own columns."""
    if old.dim() != new.dim():
        return None
    shrunk = [d for d in range(old.dim()) if old.shape[d] != new.shape[d]]
    options = []
    for d in shrunk:
        fits = [(kept, down) for dim, kept, down in candidates
                if dim == d and kept.numel() == new.shape[d] and int(kept.max()) < old.shape[d]]
        if not fits:
            return None
        options.append([(d, kept, down) for kept, down in fits])
    for choice in itertools.product(*options):
        sliced = old
        for d, kept, _ in choice:
            sliced = sliced.index_select(d, kept.to(old.device))
        if torch.equal(sliced, new):
            return [(d, kept) for d, kept, _ in choice]
    downs = [c for c in itertools.product(*options) if len(c) == 1 and c[0][2]]
    if len(downs) == 1:  # the re-fitted down projection: new values, but its columns are the kept groups
        return [(d, kept) for d, kept, _ in downs[0]]
    return None


def _kept_slices(model: nn.Module, report: PruningReport | None) -> dict[str, list[tuple[int, torch.Tensor, bool]]]:
    """Per parameter name of the pruned layers: (dimension, kept indices, is that block's ``down`` weight).

    A block's groups are ``g`` consecutive entries of a tensor along the pruned dimension, ``g`` = old size /
    groups before; candidates for every block of the parameter's layer are returned (checked by :func:`_find_slice`).
    """
    if report is None:
        return {}
    adapter = adapter_for(model)
    layers = list(adapter.layers())
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    downs: dict[str, str] = {}  # weight name -> block name
    for index in range(len(layers)):
        for block in adapter.blocks(index):
            down = adapter.current_down(block)
            if id(down) in names and hasattr(down, "weight"):
                downs[f"{names[id(down)]}.weight"] = block.name
    by_layer: dict[int, list[Any]] = {}
    for block in report.blocks:
        if block.kept and block.groups_after < block.groups_before:
            by_layer.setdefault(block.layer, []).append(block)
    result: dict[str, list[tuple[int, torch.Tensor, bool]]] = {}
    for index, blocks in by_layer.items():
        prefix = names.get(id(layers[index]))
        if prefix is None:
            continue
        for name, param in layers[index].named_parameters():
            full = f"{prefix}.{name}" if prefix else name
            options = []
            for block in blocks:
                kept = torch.tensor(block.kept, dtype=torch.long)
                for d, size in enumerate(param.shape):
                    if size % block.groups_after == 0:
                        g = size // block.groups_after
                        expanded = (kept[:, None] * g + torch.arange(g)).flatten()
                        options.append((d, expanded, downs.get(full) == block.name))
            result[full] = options
    return result
