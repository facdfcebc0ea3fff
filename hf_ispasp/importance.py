"""First-order Taylor importance of groups (Molchanov et al., "Importance Estimation for Neural Network
Pruning", CVPR 2019), the label-using baseline that i-SpaSP is compared against.

The score of a group is, summed over calibration sequences, ``|sum over the sequence's tokens and the group's
columns of H * dL/dH|``: the first-order change of the task loss when the group's hidden representation is
set to zero, taken per example as in Molchanov et al. (2017), so that opposite signs on different sequences
do not cancel. Scores come from one forward and one backward pass of the *dense* model per calibration
batch, so, unlike i-SpaSP, the rule needs labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .adapters.base import ModelAdapter

__all__ = ["taylor_scores"]

logger = logging.getLogger(__name__)

_LABEL_KEYS = ("labels", "label")


def _labels(batch: Any) -> torch.Tensor | None:
    if not isinstance(batch, Mapping):
        return None
    for key in _LABEL_KEYS:
        if key in batch and batch[key] is not None:
            return torch.as_tensor(batch[key])
    return None


def taylor_scores(
    model: nn.Module, adapter: ModelAdapter, batches: Iterable[Any], device: torch.device
) -> dict[str, torch.Tensor]:
    """Per-group Taylor scores of every prunable block of ``model``, keyed by block name.

    Args:
        model: The dense model; it must compute its task loss when called with ``labels``.
        adapter: Its adapter (gives the blocks and reads ``H`` without padding).
        batches: Calibration batches with a ``labels`` (or ``label``) entry.
        device: Where the model runs.

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
            for batch in batches:
                labels = _labels(batch)
                if labels is None:
                    raise ValueError(
                        "selection='taylor' needs labels in every calibration batch (a 'labels' entry) to compute "
                        "the task loss; keep the label column in the calibration DataLoader, or use a label-free "
                        "rule such as selection='ispasp'"
                    )
                args, kwargs, mask = adapter.prepare_batch(batch, device)
                captured.clear()
                output = model(*args, **kwargs, labels=labels.to(device))
                loss = getattr(output, "loss", None)
                if loss is None:
                    raise ValueError(f"{type(model).__name__} returned no loss for labelled inputs; cannot use taylor")
                hit = [b for b in blocks if b.name in captured]
                # Gradients of the captured H only: parameters' .grad (and requires_grad) stay as they were.
                grads = (torch.autograd.grad(loss, [captured[b.name] for b in hit], allow_unused=True)
                         if hit and loss.requires_grad else [None] * len(hit))
                for block, grad in zip(hit, grads, strict=True):
                    if grad is not None:
                        product = (captured[block.name] * grad).detach()
                        sums[block.name] += _per_sequence(adapter, block, product, mask)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("selection='taylor' got no calibration batches")
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
