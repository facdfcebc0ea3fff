"""Gradient-based group importance: the loss-using baselines that i-SpaSP is compared against.

- ``taylor`` (:func:`taylor_scores`): first-order Taylor importance of the hidden units (Molchanov et al.,
  "Importance Estimation for Neural Network Pruning", CVPR 2019). The score of a group is, summed over
  calibration sequences, ``|sum over the sequence's tokens and the group's columns of H * dL/dH|``: the
  first-order change of the task loss when the group's hidden representation is set to zero, taken per example
  as in Molchanov et al. (2017), so that opposite signs on different sequences do not cancel.
- ``llm_pruner`` (:func:`llm_pruner_scores`): LLM-Pruner's group importance (Ma, Fang, Wang, "LLM-Pruner: On the
  Structural Pruning of Large Language Models", NeurIPS 2023), element-wise first order (their ``param_first``)
  with ``sum`` aggregation: ``sum |W * dL/dW|`` over every weight removed with the group.

Scores come from one forward and one backward pass of the *dense* model per calibration batch. The loss is the
model's own (``labels`` in the batch); a causal language model without labels is scored on next-token
prediction of its inputs, padding ignored (``labels = input_ids``, ``-100`` where ``attention_mask == 0``), as
LLM-Pruner does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters.base import ModelAdapter, PrunableBlock
from .adapters.groups import get_module
from .surgery import group_rows

__all__ = ["group_salience", "is_causal_lm", "llm_pruner_scores", "taylor_scores"]

logger = logging.getLogger(__name__)

_LABEL_KEYS = ("labels", "label")


def _labels(batch: Any) -> torch.Tensor | None:
    if not isinstance(batch, Mapping):
        return None
    for key in _LABEL_KEYS:
        if key in batch and batch[key] is not None:
            return torch.as_tensor(batch[key])
    return None


def is_causal_lm(model: nn.Module, adapter: ModelAdapter | None = None) -> bool:
    """A causal language model: its adapter says so (``causal_lm``), its config is a decoder's, or its class is an
    LM head (``...ForCausalLM``, ``...LMHeadModel``)."""
    if getattr(adapter, "causal_lm", False) or getattr(getattr(model, "config", None), "is_decoder", False):
        return True
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _losses(
    model: nn.Module, adapter: ModelAdapter, batches: Iterable[Any], device: torch.device, rule: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(loss, labels, token mask)`` of the model on every batch; labels of a causal LM default to its inputs."""
    causal = is_causal_lm(model, adapter)
    for batch in batches:
        labels = _labels(batch)
        args, kwargs, mask = adapter.prepare_batch(batch, device)
        if labels is None and causal and "input_ids" in kwargs:
            labels = kwargs["input_ids"].clone()
            if mask is not None:
                labels[~mask.to(labels.device)] = -100  # padding predicts nothing and is never a target
        if labels is None:
            raise ValueError(
                f"selection={rule!r} needs labels in every calibration batch (a 'labels' entry) to compute the task "
                "loss; keep the label column in the calibration DataLoader (a causal language model uses its "
                "input_ids), or use a label-free rule such as selection='ispasp'"
            )
        labels = labels.to(device)
        output = model(*args, **kwargs, labels=labels)
        loss = getattr(output, "loss", None)
        if loss is None:
            raise ValueError(f"{type(model).__name__} returned no loss for labelled inputs; cannot use {rule}")
        yield loss, labels, mask


def _target_count(labels: torch.Tensor, causal: bool) -> float:
    """Targets a mean loss averages over: shifted next-token labels of a causal LM, else labels not ``-100``."""
    if labels.is_floating_point():
        return float(labels.shape[0]) if labels.dim() else 1.0
    if causal and labels.dim() == 2:
        labels = labels[:, 1:]
    return float((labels != -100).sum())


def taylor_scores(
    model: nn.Module, adapter: ModelAdapter, batches: Iterable[Any], device: torch.device,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-group Taylor scores of every prunable block of ``model``, keyed by block name.

    Args:
        model: The dense model; it must compute its task loss when called with ``labels``.
        adapter: Its adapter (gives the blocks and reads ``H`` without padding).
        batches: Calibration batches with a ``labels`` (or ``label``) entry; optional for a causal LM.
        device: Where the model runs.
        reduce: Sums a tensor in place across processes (each scored its own shard), so all select alike.

    Raises:
        ValueError: a batch has no labels, or the model returns no loss.
    """
    blocks = list(adapter.iter_blocks())
    sums = {b.name: torch.zeros(b.num_groups, dtype=torch.float64) for b in blocks}
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            hidden = args[0]
            if hidden.requires_grad:
                captured[name] = hidden
                return None
            # Nothing upstream needs a gradient (a frozen model, or frozen earlier layers): dL/dH needs no
            # parameter gradient, so make H a leaf that asks for one. Detaching cuts nothing, since no gradient
            # could flow past H anyway; the model's own requires_grad flags are never touched.
            hidden = hidden.detach().requires_grad_(True)
            captured[name] = hidden
            return (hidden, *args[1:])

        return hook

    handles = [adapter.current_down(b).register_forward_pre_hook(make_hook(b.name)) for b in blocks]
    was_training = model.training
    model.eval()  # dropout off: the scores describe the deterministic network that is pruned
    seen = 0
    try:
        with torch.enable_grad():
            for loss, _, mask in _losses(model, adapter, batches, device, "taylor"):
                hit = [b for b in blocks if b.name in captured]
                # Gradients of the captured H only: parameters' .grad (and requires_grad) stay as they were.
                grads = (torch.autograd.grad(loss, [captured[b.name] for b in hit], allow_unused=True)
                         if hit and loss.requires_grad else [None] * len(hit))
                for block, grad in zip(hit, grads, strict=True):
                    if grad is not None:
                        product = (captured[block.name] * grad).detach()
                        sums[block.name] += _per_sequence(adapter, block, product, mask)
                captured.clear()
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("selection='taylor' got no calibration batches")
    if reduce is not None:
        for total in sums.values():
            reduce(total)
    logger.debug("taylor scores from %d batches", seen)
    return sums


def _per_sequence(adapter: ModelAdapter, block: Any, product: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``sum_sequences |sum_{tokens, group columns} H * dL/dH|`` for one batch (padding excluded)."""
    width = block.num_groups * block.group_size
    if product.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(product.shape[:2]):
        per_seq = (product * mask.to(product.device, product.dtype).unsqueeze(-1)).sum(1)  # (batch, width)
    else:  # layouts without a (batch, tokens) mask: the whole batch counts as one example
        per_seq = adapter.hidden_rows(block, product, mask).sum(0, keepdim=True)
    grouped = per_seq.reshape(-1, width).to(torch.float64).reshape(-1, block.num_groups, block.group_size).sum(-1)
    return grouped.abs().sum(0).cpu()


def llm_pruner_scores(
    model: nn.Module, adapter: ModelAdapter, batches: Iterable[Any], device: torch.device,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """LLM-Pruner's per-group importance of every prunable block, keyed by block name.

    ``sum |W * G|`` over every weight removed with the group (rows of the output-side projections, columns of the
    input-side ones and of ``down``, the weight of a norm sliced with it; biases are not counted, as in the
    reference ``TaylorImportance``), with ``G`` the gradient of the loss summed over all calibration targets
    (each batch's mean loss weighted by its target count, i.e. the gradient of the mean over the whole calibration
    set up to a constant), accumulated before the absolute value as LLM-Pruner's single backward pass over all
    its examples does. Which weights go with a group comes from the adapter's group spec (its cuts and row
    maps). Parameter gradients are computed with ``torch.autograd.grad``: ``.grad`` is never written, and a frozen
    weight is made to require a gradient only for the duration of the call. Memory: one float32 gradient per
    prunable weight. ``reduce`` (see :func:`taylor_scores`) sums the gradients across processes before the
    absolute value, so a sharded calibration scores exactly as one process would on all the data.

    Deviations: the reference prunes a fixed range of layers with a global or per-layer ratio; here every block
    gets the engine's budget, so rules compare at equal widths. Blocks are scored once, on the dense model.

    Raises:
        ValueError: the adapter has no group specs, a batch has no labels (and the model is no causal LM), or the
            model returns no loss.
    """
    spec_of = getattr(adapter, "spec", None)
    if spec_of is None:
        raise ValueError(
            f"selection='llm_pruner' needs an adapter built on group specs (hf_ispasp.adapters.SpecAdapter) to know "
            f"which weights go with a group; {type(adapter).__name__} has none"
        )
    blocks = list(adapter.iter_blocks())
    cuts = {b.name: _weighted_cuts(adapter, b) for b in blocks}
    params = list({id(w): w for parts in cuts.values() for _, w, _, _ in parts}.values())
    frozen = [p for p in params if not p.requires_grad]
    causal = is_causal_lm(model, adapter)
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            for loss, labels, _ in _losses(model, adapter, batches, device, "llm_pruner"):
                grads = torch.autograd.grad(loss * _target_count(labels, causal), params, allow_unused=True)
                for total, grad in zip(sums, grads, strict=True):
                    if grad is not None:
                        total += grad.to(torch.float32)
                seen += 1
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    if seen == 0:
        raise ValueError("selection='llm_pruner' got no calibration batches")
    if reduce is not None:
        for total in sums:
            reduce(total)
    gradient = {id(p): g for p, g in zip(params, sums, strict=True)}
    scores = {}
    for block in blocks:
        scores[block.name] = sum(
            group_salience(module, gradient[id(weight)], output, block.num_groups, sizes)
            for module, weight, output, sizes in cuts[block.name]
        )
    logger.debug("llm_pruner scores from %d batches", seen)
    return scores


def _weighted_cuts(adapter: ModelAdapter, block: PrunableBlock) -> list[tuple[nn.Module, torch.Tensor, bool, tuple]]:
    """``(module, weight, output side, row map)`` of every cut of ``block``'s spec whose module has a weight."""
    spec = adapter.spec(block)
    layer = adapter.layers()[block.layer]
    found = []
    sides = [(c, True) for c in spec.outputs] + [(c, False) for c in (*spec.inputs, spec.down)]
    for cut, output in sides:
        module = get_module(layer, cut.path)
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and (weight.dim() >= 2 or output):
            found.append((module, weight, output, cut.sizes))
    return found


def group_salience(
    module: nn.Module, gradient: torch.Tensor, output: bool, count: int, sizes: tuple[int, ...]
) -> torch.Tensor:
    """``sum |W * G|`` per group over the units of ``module`` that go with it (float64, on the CPU).

    ``output``: the groups own output units (rows of a Linear's weight), else input units (columns); ``sizes`` is
    the row map of the sliced dimension (see :mod:`hf_ispasp.adapters.groups`), ``count`` the number of groups.
    Units past the grouped segments (shared by every group, e.g. Phi-3's key/value rows under query groups) count
    for none.
    """
    salience = (module.weight.detach().to(torch.float32) * gradient.to(torch.float32)).abs()
    per_unit = _per_unit(module, salience, output).to(torch.float64).cpu()
    rows = group_rows(torch.arange(count), count, sizes)
    owners = torch.cat([torch.arange(count).repeat_interleave(size) for size in sizes])
    return torch.zeros(count, dtype=torch.float64).index_add_(0, owners, per_unit[rows])


def _per_unit(module: nn.Module, salience: torch.Tensor, output: bool) -> torch.Tensor:
    """Salience summed over everything but the sliced dimension (output or input units) of ``module``'s weight."""
    if salience.dim() == 1:  # a norm's weight: one entry per unit
        return salience
    if isinstance(module, Conv1D):  # weight stored (in, out)
        salience = salience.t()
    if not output:
        salience = salience.transpose(0, 1)
    return salience.reshape(salience.shape[0], -1).sum(1)
