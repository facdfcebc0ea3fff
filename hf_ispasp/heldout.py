"""Held-out residuals of the anchored least-squares re-fit: a whole grid of ridges from one eigendecomposition, or
one ridge from a Cholesky solve.

The inner loop of :func:`hf_ispasp.algorithm.validate_refit` (held-out validation of the re-fit ridge), kept
apart so the selection module stays small. This module knows nothing of transformers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["Fold", "factored_scores", "fold_score", "fold_scores"]


@dataclass
class Fold:
    """Moments of one half, and its products with the kept columns (shared by both directions of the CV)."""

    mean: torch.Tensor
    count: float
    cov_w: torch.Tensor  # C[S, :] W^T  (k x d)
    cov_ss: torch.Tensor  # C[S, S]
    total: torch.Tensor | None  # tr(W C W^T): the residual of a zero re-fit on this half (None: it only fits)
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

    Measured on an H200 (BERT-base shape, fp32 and bf16, ABBA): one Cholesky solve per ridge of the grid
    (:func:`factored_scores`) instead of this eigendecomposition made no difference to the prune within the noise
    (2.41 against 2.24 s fp32, 2.29 against 2.48 s bf16; validate_1 of one FFN block 38.6 against 40.5 ms): the
    nine solves of the grid cost about what one float32 ``eigh`` does at k = 1536 (18.8 ms), so the grid keeps
    this path on every device.
    """
    delta = (test.mean - fit.mean) if centered else torch.zeros_like(test.mean)
    values, vectors = torch.linalg.eigh(fit.cov_ss)
    values = values.clamp_min(0)
    b = vectors.T @ fit.cov_w  # (k x d)
    p = vectors.T @ w[:, cols].T
    cross = vectors.T @ test.cov_w  # U^T C_t[S, :] W^T
    lin = ((b * cross).sum(1), (p * cross).sum(1))  # tr(Z^T cross) = sum_i d_i (lin0 + r lin1)_i
    del cross  # spent before the rotation, the validation's peak
    delta_s = vectors.T @ delta[cols]
    rotated = _rotated(vectors, test.cov_ss)  # M = U^T C_t,SS U
    del vectors  # nothing below reads the basis: one k x k matrix less while the quadratic terms are formed
    total = _tested_total(test)  # tr(W C_t W^T)
    w_delta = w @ delta
    unit = fit.unit
    # every ridge at once, one host read at the end (on an accelerator a read per ridge is a synchronisation)
    finite = [r for r in ridges if not math.isinf(r)]
    r = _grid(tuple(finite), values.dtype, values.device) * scale * unit + 1e-12
    d = 1.0 / (values + r[:, None])  # (ridges x k)
    spread = total - 2 * (d * (lin[0] + r[:, None] * lin[1])).sum(1)
    # tr(Z^T M Z) = sum_ij M_ij d_i d_j (B B^T + r (B P^T + P B^T) + r^2 P P^T)_ij with d = 1 / (e + r). Each k x k
    # product is scaled by M in place (the same values as M * product) and spent before the next is formed: one
    # k x k matrix at a time besides M, not three
    quadratic = []
    forms = (lambda: b @ b.T, lambda: _symmetrised(b @ p.T), lambda: p @ p.T)
    for index, (power, form) in enumerate(zip((1, r, r * r), forms, strict=True)):
        q = form().mul_(rotated)
        quadratic.append(power * ((d @ q) * d).sum(1))
        if index == len(forms) - 1:
            last = q.sum()  # of M * P P^T (the last form): the infinite ridge's tr(P^T M P)
        del q  # before the next form: one k x k product at a time besides M
    del rotated
    spread = spread + sum(quadratic)
    weighted = d * delta_s  # (ridges x k)
    shifted = weighted @ b + r[:, None] * (weighted @ p)  # (ridges x d)
    offset = (w_delta - shifted).pow(2).sum(1)
    # infinite ridge: Z = P
    spread_inf = total - 2 * lin[1].sum() + last
    offset_inf = (w_delta - p.T @ delta_s).pow(2).sum()
    spreads = torch.cat([spread, spread_inf.reshape(1)]).clamp_min(0)
    *scores, score_inf = (test.count * (spreads + torch.cat([offset, offset_inf.reshape(1)]))).tolist()
    by_ridge = dict(zip(finite, scores, strict=True))
    return {ridge: score_inf if math.isinf(ridge) else by_ridge[ridge] for ridge in ridges}


def _tested_total(test: Fold) -> torch.Tensor:
    if test.total is None:
        raise ValueError("this half only fits (HeldOutHalves.directions): its tr(W C W^T) was not formed")
    return test.total


_ROTATION_ROWS = 256  # rows of U^T C U formed at a time in the product's own memory


def _rotated(vectors: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """``U^T C U`` with one k x k matrix of workspace instead of two: ``T = U^T C`` is formed whole, then
    overwritten a block of rows at a time by ``T[rows] U`` (row block ``i`` of the result reads only row block
    ``i`` of ``T``). At k = 1536 in float32 that is 9.4 MB less at the validation's peak."""
    product = vectors.T @ covariance
    for start in range(0, product.shape[0], _ROTATION_ROWS):
        rows = product[start : start + _ROTATION_ROWS]
        rows.copy_(rows @ vectors)
    return product


def _symmetrised(product: torch.Tensor) -> torch.Tensor:
    """``A + A^T`` in ``A``'s memory (``B P^T + P B^T`` from ``B P^T``)."""
    return product.add_(product.T.clone())


def factored_scores(
    fit: Fold, test: Fold, w: torch.Tensor, centered: bool, cols: torch.Tensor, ridges: tuple[float, ...],
    scale: float,
) -> dict[float, float] | None:
    """:func:`fold_scores` through one Cholesky solve per finite ridge instead of an eigendecomposition; ``None``
    where a factorisation fails (a numerically indefinite system in this precision: the caller falls back to the
    eigendecomposition). All ridges queue on the device and are read back together, once. It solves the re-fit's
    own system; the eigendecomposition clamps the small negative eigenvalues rounding leaves in a rank-deficient
    covariance, so its scores differ from these by up to about 3e-7 relative.

    ``Z = (C_SS + r I)^-1 (C_S W^T + r W_S^T)`` is the anchored re-fit (``W'^T``) on ``fit`` (``Z = W_S^T`` at an
    infinite ridge); the residual on ``test`` is ``n_test (tr(D C_test D^T) + ||D delta||^2)`` as there, expanded in
    the kept columns: ``tr(W C W^T) - 2 tr(Z^T C_S W^T) + tr(Z^T C_SS Z)`` on the test half.
    """
    delta = (test.mean - fit.mean) if centered else torch.zeros_like(test.mean)
    w_kept, w_delta, delta_kept, total = w[:, cols].T, w @ delta, delta[cols], _tested_total(test)

    def residual(z: torch.Tensor) -> torch.Tensor:
        spread = total - 2 * (z * test.cov_w).sum() + (z * (test.cov_ss @ z)).sum()
        return test.count * (spread.clamp_min(0) + (w_delta - z.T @ delta_kept).pow(2).sum())

    scores, failed = [], []
    for ridge in ridges:
        if math.isinf(ridge):
            scores.append(residual(w_kept))
            continue
        r = fit.unit * (ridge * scale) + 1e-12  # a device scalar: no host read, no copy onto the device
        system = fit.cov_ss.clone()
        system.diagonal().add_(r)
        factor, info = torch.linalg.cholesky_ex(system)
        del system
        scores.append(residual(torch.cholesky_solve(fit.cov_w + r * w_kept, factor)))  # garbage where info fails
        failed.append(info.to(scores[-1].dtype))
    values = torch.stack(scores + failed).tolist()  # one host read for every score and status
    if any(values[len(scores):]):
        return None
    return dict(zip(ridges, values[: len(scores)], strict=True))


def fold_score(
    fit: Fold, test: Fold, w: torch.Tensor, centered: bool, cols: torch.Tensor, ridge: float, scale: float,
) -> float | None:
    """:func:`fold_scores` at one finite relative ridge, through one Cholesky solve instead of an
    eigendecomposition (3 against 49 ms at k = 768 in float32 on 2 CPU threads), as :func:`factored_scores`;
    ``None`` where the factorisation fails."""
    if math.isinf(ridge):
        raise ValueError("fold_score takes a finite ridge (an infinite one keeps W_S: see fold_scores)")
    scores = factored_scores(fit, test, w, centered, cols, (ridge,), scale)
    return None if scores is None else scores[ridge]
