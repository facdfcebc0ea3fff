"""Group scores of the retraining-free LLM pruning baselines that need only a block's input statistics.

Both rules score the columns of a block's output projection ``W`` (out x width, the ``down`` module) from the
per-column statistics of its input ``X`` (the hidden representation ``H``, padding excluded), and sum the
column scores over each group's columns. They share the engine with i-SpaSP (same calibration, same blocks,
same widths), so they are compared at equal widths; the global, per-layer budget search of FLAP is out of scope.
The statistics are those of the block's input in the partly pruned network (earlier blocks already pruned, as
for every rule here); FLAP and Wanda-sp's reference code measure every layer of the dense model instead.

- ``wanda_sp``: structured Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
  ICLR 2024), in the form FLAP's authors evaluate (An et al., "Fluctuation-based Adaptive Structured Pruning for
  Large Language Models", AAAI 2024): column ``j`` scores ``sum_i |W_ij| * ||X_j||_2``, the norm over calibration
  tokens and uncentred. Only the down projection's weights count, as in the reference code (``prune_wanda_sp``
  in CASIA-IVA-Lab/FLAP, ``lib/prune.py``, scores ``o_proj`` and ``down_proj`` alone); it averages over the rows
  where we sum, which changes no order.
- ``flap``: FLAP's fluctuation metric (``WIFV``): column ``j`` scores ``Var(X_j) * ||W_:,j||_2^2``, the sample
  variance over calibration tokens. The reference code squares this per-column metric for attention before
  summing it per head; we square it for every group (a group of one column, an FFN neuron, keeps its order).
  After the cut FLAP adds the dropped columns' mean contribution to the bias (:func:`mean_compensation`).

This module knows nothing of transformers.
"""

from __future__ import annotations

import torch

__all__ = ["flap_scores", "mean_compensation", "wanda_sp_scores"]


def _per_group(columns: torch.Tensor, group_size: int) -> torch.Tensor:
    return columns.reshape(-1, group_size).sum(-1)


def wanda_sp_scores(gram_diagonal: torch.Tensor, weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Wanda-sp per group: ``sum_{j in group} sum_i |W_ij| ||X_j||_2``.

    Args:
        gram_diagonal: ``sum_b X_bj^2`` per column (the diagonal of the uncentred Gram matrix).
        weight: ``W`` (out x width) in the statistics' dtype.
        group_size: Columns per group.
    """
    norms = gram_diagonal.clamp_min(0).sqrt()
    return _per_group(weight.abs().sum(0) * norms, group_size)


def flap_scores(
    count: float, total: torch.Tensor, gram_diagonal: torch.Tensor, weight: torch.Tensor, group_size: int
) -> torch.Tensor:
    """FLAP's fluctuation per group: ``sum_{j in group} (Var(X_j) ||W_:,j||^2)^2``.

    ``Var`` is the unbiased sample variance over the ``count`` calibration tokens, from the column sums ``total``
    and ``gram_diagonal`` (``sum_b X_bj`` and ``sum_b X_bj^2``).
    """
    n = max(float(count), 1.0)
    mean = total / n
    variance = ((gram_diagonal - n * mean * mean) / max(n - 1.0, 1.0)).clamp_min(0)
    return _per_group((variance * weight.pow(2).sum(0)).pow(2), group_size)


def mean_compensation(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, kept_columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's baseline bias compensation: keep ``W_S`` and add the dropped columns' mean output to the bias.

    ``b' = b + W[:, D] mean(X)[D]`` with ``D`` the dropped columns, so that the block's output at the calibration
    mean input is unchanged (and the mean output error over the calibration tokens is zero). Without a bias
    (``bias=None``) the compensation is the new bias. Returns ``(W_S, b')``.
    """
    dropped = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    dropped[kept_columns.to(weight.device)] = False
    shift = weight[:, dropped] @ mean[dropped]
    new_bias = shift if bias is None else bias + shift
    return weight[:, kept_columns.to(weight.device)].clone(), new_bias
