"""Held-out residuals of the anchored least-squares re-fit for a whole grid of ridges, from one eigendecomposition.

The inner loop of :func:`hf_ispasp.algorithm.validate_refit` (2-fold cross-validation of the re-fit ridge), kept
apart so the selection module stays small. This module knows nothing of transformers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["Fold", "fold_score", "fold_scores"]


@dataclass
class Fold:
    """Moments of one half, and its products with the kept columns (shared by both directions of the CV)."""

    mean: torch.Tensor
    count: float
    cov_w: torch.Tensor  # C[S, :] W^T  (k x d)
    cov_ss: torch.Tensor  # C[S, S]
    total: torch.Tensor  # tr(W C W^T): the residual of a zero re-fit on this half
    unit: torch.Tensor  # mean variance of the columns, the scale of the relative ridges


@functools.lru_cache(maxsize=32)
def _grid(ridges: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ridge grid as a tensor on ``device``, made once: a tensor made from Python numbers on an accelerator is a
    copy from pageable host memory, which waits for the stream (read-only: callers derive new tensors from it)."""
    return torch.tensor(ridges, dtype=dtype, device=device)


def fold_scores(
    fit: Fold, test: Fold, w: torch.Tensor, centered: bool, cols: torch.Tensor,
    ridges: tuple[float, ...], scale: float,
) -> dict[float, float]:
    """Residual on ``test`` of the anchored re-fit on ``fit``, for every relative ridge (times ``scale``).

    Same solution as :func:`hf_ispasp.algorithm.refit_projection` (``anchored=True``, relative ridge times
    ``scale``), through one eigendecomposition: with ``C_SS = U diag(e) U^T``, ``W'^T = U Z``,
    ``Z = diag(1 / (e + r)) (B + r P)``, ``B = U^T C_S W^T``, ``P = U^T W_S^T``. The re-fitted bias
    makes the mean error on ``test`` ``D (mean_test - mean_fit)`` with ``D = W - W'`` (zero-padded), so the residual is
    ``n_test (tr(D C_test D^T) + ||D delta||^2)``, expanded in the kept columns; its terms are quadratic in ``r``
    with fixed k x k coefficient matrices, so every further ridge costs O(k^2), not O(k^2 d).
    """
    delta = (test.mean - fit.mean) if centered else torch.zeros_like(test.mean)
    values, vectors = torch.linalg.eigh(fit.cov_ss)
    values = values.clamp_min(0)
    b = vectors.T @ fit.cov_w  # (k x d)
    p = vectors.T @ w[:, cols].T
    cross = vectors.T @ test.cov_w  # U^T C_t[S, :] W^T
    rotated = vectors.T @ test.cov_ss @ vectors  # M = U^T C_t,SS U
    total = test.total  # tr(W C_t W^T)
    # tr(Z^T M Z) = sum_ij M_ij d_i d_j (B B^T + r (B P^T + P B^T) + r^2 P P^T)_ij with d = 1 / (e + r)
    bp = b @ p.T
    # the k x k products are scaled by M in place (the same values as M * product): three k x k matrices, not six
    quad = ((b @ b.T).mul_(rotated), bp.add_(bp.T.clone()).mul_(rotated), (p @ p.T).mul_(rotated))
    lin = ((b * cross).sum(1), (p * cross).sum(1))  # tr(Z^T cross) = sum_i d_i (lin0 + r lin1)_i
    delta_s = vectors.T @ delta[cols]
    w_delta = w @ delta
    unit = fit.unit
    # every ridge at once, one host read at the end (on an accelerator a read per ridge is a synchronisation)
    finite = [r for r in ridges if not math.isinf(r)]
    r = _grid(tuple(finite), values.dtype, values.device) * scale * unit + 1e-12
    d = 1.0 / (values + r[:, None])  # (ridges x k)
    spread = total - 2 * (d * (lin[0] + r[:, None] * lin[1])).sum(1)
    spread = spread + sum(power * ((d @ q) * d).sum(1) for power, q in zip((1, r, r * r), quad, strict=True))
    weighted = d * delta_s  # (ridges x k)
    shifted = weighted @ b + r[:, None] * (weighted @ p)  # (ridges x d)
    offset = (w_delta - shifted).pow(2).sum(1)
    # infinite ridge: Z = P
    spread_inf = total - 2 * lin[1].sum() + quad[2].sum()
    offset_inf = (w_delta - p.T @ delta_s).pow(2).sum()
    spreads = torch.cat([spread, spread_inf.reshape(1)]).clamp_min(0)
    *scores, score_inf = (test.count * (spreads + torch.cat([offset, offset_inf.reshape(1)]))).tolist()
    by_ridge = dict(zip(finite, scores, strict=True))
    return {ridge: score_inf if math.isinf(ridge) else by_ridge[ridge] for ridge in ridges}


def fold_score(
    fit: Fold, test: Fold, w: torch.Tensor, centered: bool, cols: torch.Tensor, ridge: float, scale: float,
) -> float | None:
    """:func:`fold_scores` at one finite relative ridge, through one Cholesky solve instead of an
    eigendecomposition (3 against 49 ms at k = 768 in float32 on 2 CPU threads); ``None`` where the factorisation
    fails (a numerically indefinite system in this precision: the caller falls back to :func:`fold_scores`). It
    solves the re-fit's own system; :func:`fold_scores` clamps the small negative eigenvalues rounding leaves in a
    rank-deficient covariance, so its scores differ from these by up to about 3e-7 relative.

    ``Z = (C_SS + r I)^-1 (C_S W^T + r W_S^T)`` is the anchored re-fit (``W'^T``) on ``fit``; the residual on ``test``
    is ``n_test (tr(D C_test D^T) + ||D delta||^2)`` as there, expanded in the kept columns:
    ``tr(W C W^T) - 2 tr(Z^T C_S W^T) + tr(Z^T C_SS Z)`` on the test half.
    """
    if math.isinf(ridge):
        raise ValueError("fold_score takes a finite ridge (an infinite one keeps W_S: see fold_scores)")
    r = fit.unit * (ridge * scale) + 1e-12  # a device scalar: no host read, no copy onto the device
    system = fit.cov_ss.clone()
    system.diagonal().add_(r)
    factor, info = torch.linalg.cholesky_ex(system)
    z = torch.cholesky_solve(fit.cov_w + r * w[:, cols].T, factor)  # garbage where info says it failed
    spread = test.total - 2 * (z * test.cov_w).sum() + (z * (test.cov_ss @ z)).sum()
    delta = (test.mean - fit.mean) if centered else torch.zeros_like(test.mean)
    offset = (w @ delta - z.T @ delta[cols]).pow(2).sum()
    score = test.count * (spread.clamp_min(0) + offset)
    value, failed = torch.stack([score, info.to(score.dtype)]).tolist()  # one host read for both
    return None if failed != 0 else float(value)
