"""i-SpaSP on streamed statistics (Wolfe & Kyrillidis, arXiv:2112.04905).

A prunable block maps its input to a hidden representation ``H`` (tokens x width, made of ``N`` groups
of ``g`` columns) and projects it back with ``Y = H W^T + b``. Every quantity the iteration needs is a
function of three statistics of ``H`` accumulated in one streaming pass: the token count ``n``, the
column sums ``s = sum_b H_b`` and the Gram matrix ``G = H^T H``. With ``P = W^T W`` and ``E = G * P``
(elementwise), the residual of a support is ``||V||_F^2 = m^T E m`` where ``m`` marks the dropped
columns, so an iteration costs nothing that grows with the calibration set.

The same three statistics are also kept for one half of the calibration sequences, so the least-squares
re-fit of ``W`` can be validated on held-out data (:func:`validate_refit`): with fewer tokens than columns an
unregularised re-fit interpolates the calibration tokens and generalises worse than no re-fit at all.

This module knows nothing of transformers or timm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .baselines import flap_scores, wanda_sp_scores
from .heldout import Fold, fold_score, fold_scores
from .partitions import check_partitions, drops_above_floor, random_per_run, topk_per_run

logger = logging.getLogger(__name__)

__all__ = [
    "REFIT_RIDGES",
    "TRUSTED_SUPPORT_ROWS_PER_COLUMN",
    "BlockStatistics",
    "RefitChoice",
    "SelectionResult",
    "accumulation_dtype",
    "all_finite",
    "group_columns",
    "ieee_float32",
    "output_energy",
    "refit_projection",
    "refit_with_residual",
    "residual_after_refit",
    "residual_curve",
    "select_groups",
    "selection_precision",
    "validate_refit",
    "weight_gram",
    "well_posed",
]


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Float32 matrix products in full IEEE precision (no TF32 on Ampere+ GPUs), restored afterwards.

    TF32 keeps 10 mantissa bits: a Gram matrix or a selection in TF32 differs from float32 in the 4th digit,
    enough to change which group is dropped first.
    """
    previous = torch.get_float32_matmul_precision()
    matmul = torch.backends.cuda.matmul
    reduced = (matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction)
    torch.set_float32_matmul_precision("highest")
    # half-precision products with a float32 result: no split-K partial sums rounded to half precision
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = reduced


def accumulation_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where the device has it (CPU, CUDA: an addition is memory-bound, so float64 costs little);
    float32 with Kahan compensation where it does not (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry of every tensor is finite. A finite sum proves it (an inf or NaN entry makes the sum inf
    or NaN), so the exact elementwise check runs only for a tensor whose sum is not finite (an entry is, or the sum
    overflowed): one fast reduction instead of a boolean copy and a scan, 20x faster on a CPU. The sums of the
    tensors on one device are read back together: one host read (a synchronisation on an accelerator) per device,
    not one per tensor."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    for group in by_device.values():
        finite = torch.stack([torch.isfinite(t.sum()) for t in group])
        if bool(finite.all()):
            continue
        if not all(ok or bool(torch.isfinite(t).all()) for t, ok in zip(group, finite.tolist(), strict=True)):
            return False
    return True


@dataclass
class BlockStatistics:
    """Streaming sums of a block's hidden representation; memory is O(width^2), not O(samples).

    The sums live on ``device`` (the layer's device: no host transfer per batch) in ``dtype`` (float64 by
    default; see :func:`accumulation_dtype`). In float32 each sum carries a Kahan compensation term, so the
    accumulated error stays at one rounding of the sum, not one per batch.

    Besides the totals, the sums over *fold 0* (the calibration sequences that hash to the first half, see
    ``hf_ispasp.statistics``) are kept, so that the re-fit can be validated on held-out data: fold 1 is the
    difference. That doubles the memory (2 x width^2), never more. Rows added without a fold are counted in
    ``unassigned``; the halves are then unavailable.

    ``panels`` (float64 sums of a CPU block of 512 columns or more, or of an accelerator's from
    :data:`_DEVICE_PANEL_WIDTH`): each batch adds only the blocks on and below the diagonal of its Gram matrix,
    and :meth:`finish` mirrors them once after the last batch. On a CPU the sums are those of whole symmetric
    matrices bit for bit (every entry is added the same values in the same order), with half the additions and
    no per-batch mirroring; on an accelerator they agree to float32 rounding (the BLAS may sum a panel's entries
    in another order than the whole product's), with about half the products and no width^2 float32 product
    per batch. Anything that reads the sums finishes them first.

    ``deferred_rows`` (with ``panels``, on a CPU): the rows of each fold are copied into a buffer of that many rows and
    multiplied when it is full, so a CPU's products run at large-matrix speed and the float64 sums take one
    addition per buffer instead of one per batch (a few hundred real tokens per batch and fold: 1.45x faster at
    width 1536). The products stay float32 and the sums float64; only how rows are grouped into products changes,
    as with a larger calibration batch. :meth:`finish` multiplies what is left and frees the buffers.
    """

    width: int
    count: torch.Tensor | None = None
    total: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    fold_count: torch.Tensor | None = None
    fold_total: torch.Tensor | None = None
    fold_gram: torch.Tensor | None = None
    unassigned: torch.Tensor | None = None
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float64
    panels: bool = False
    deferred_rows: int = 0
    _pending: dict[bool, tuple[torch.Tensor, int]] = field(default_factory=dict, repr=False)  # fold 0?: buffer, rows
    _compensation: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _mirrored: bool = field(default=True, repr=False)  # False: the Gram sums hold only their lower blocks
    _counts: tuple[float, float, float] | None = field(default=None, repr=False)  # host copy, see host_counts()
    _read_only: bool = field(default=False, repr=False)  # a half (halves()): it reads another object's sums
    _folds_released: bool = field(default=False, repr=False)  # release_folds(): the fold sums are gone

    _SHAPES: ClassVar[dict[str, int]] = {
        "count": 0, "total": 1, "gram": 2, "fold_count": 0, "fold_total": 1, "fold_gram": 2, "unassigned": 0,
    }

    def __post_init__(self) -> None:
        given = next((getattr(self, n) for n in self._SHAPES if getattr(self, n) is not None), None)
        if given is not None:  # built from tensors (e.g. halves()): live where they live
            self.device, self.dtype = given.device, given.dtype
        self.device = torch.device(self.device)
        for name, dims in self._SHAPES.items():
            if getattr(self, name) is None:
                shape = (self.width,) * dims
                if given is None:
                    setattr(self, name, torch.zeros(shape, dtype=self.dtype, device=self.device))
                else:  # a read-only zero that takes no memory (a half has no fold sums of its own)
                    setattr(self, name, torch.zeros((), dtype=self.dtype, device=self.device).expand(shape))

    def update(self, hidden: torch.Tensor, dtype: torch.dtype = torch.float32, fold: int | None = None) -> None:
        """Add rows of ``hidden`` (tokens x width), already stripped of padding tokens.

        ``dtype`` is the precision of the products (float32: IEEE, never TF32); ``fold`` (0 or 1) says which
        half of the calibration data the rows belong to; ``None``: unknown.
        """
        if self._read_only:
            raise ValueError("these statistics are one half of another object's (BlockStatistics.halves()) and share "
                             "its sums: update the statistics they came from, then take the halves again")
        if hidden.shape[-1] != self.width:
            raise ValueError(f"hidden representation has width {hidden.shape[-1]}, statistics expect {self.width}")
        if fold not in (None, 0, 1):
            raise ValueError(f"fold must be 0, 1 or None, got {fold!r}")
        rows = hidden.reshape(-1, self.width).to(device=self.device)
        if rows.shape[0] == 0:
            return
        block = _panel_block(rows) if self.panels and self.dtype == torch.float64 else None
        with ieee_float32():
            if block is not None:
                if not _half_product(rows, dtype):  # half-precision rows stay so: their panels use out_dtype
                    rows = rows.to(dtype)
                total, gram = rows.sum(0, dtype=dtype), None
                self._defer(rows, fold == 0)
            else:
                total, gram = _sums(rows, dtype)
        if self.dtype != torch.float64:  # a float64 sum adds lower-precision values exactly, without a copy
            total, gram = total.to(self.dtype), gram.to(self.dtype)
        count = float(rows.shape[0])  # a Python number: no host-to-device copy per batch
        self._counts = None
        self._add("count", count)
        self._add("total", total)
        if gram is not None:
            self._add("gram", gram)
        if fold == 0:
            self._add("fold_count", count)
            self._add("fold_total", total)
            if gram is not None:
                self._add("fold_gram", gram)
        elif fold is None:
            self._add("unassigned", count)

    def _add_panels(self, rows: torch.Tensor, fold_zero: bool) -> None:
        """Add the blocks on and below the diagonal of ``rows^T rows`` to the Gram sums (see ``panels``)."""
        self._mirrored = False
        for start, end, panel in _lower_panels(rows, _panel_block(rows) or _GRAM_BLOCK):
            self.gram[start:, start:end] += panel
            if fold_zero:
                self.fold_gram[start:, start:end] += panel

    def _defer(self, rows: torch.Tensor, fold_zero: bool) -> None:
        """Copy ``rows`` into their fold's buffer of ``deferred_rows`` rows; add the product of every full buffer."""
        size = self.deferred_rows if _defers_rows(rows) else 0
        if size <= 0:
            self._add_panels(rows, fold_zero)
            return
        buffer, filled = self._pending.get(fold_zero, (None, 0))
        if buffer is None:
            buffer = torch.empty(size, self.width, dtype=rows.dtype, device=rows.device)
        start = 0
        while start < len(rows):
            take = min(len(rows) - start, size - filled)
            buffer[filled : filled + take] = rows[start : start + take]
            filled, start = filled + take, start + take
            if filled == size:
                self._add_panels(buffer, fold_zero)
                filled = 0
        self._pending[fold_zero] = (buffer, filled)

    def finish(self) -> None:
        """Complete Gram sums accumulated as lower blocks (``panels``): multiply the rows still held back
        (``deferred_rows``), then mirror; a no-op otherwise."""
        for fold_zero in sorted(self._pending, reverse=True):  # fold 0 first, as in a batch's fold plan
            buffer, filled = self._pending[fold_zero]
            if filled:
                with ieee_float32():
                    self._add_panels(buffer[:filled], fold_zero)
        self._pending.clear()  # the buffers' memory goes back
        if not self._mirrored:
            _mirror_lower(self.gram)
            _mirror_lower(self.fold_gram)
            self._mirrored = True

    def _add(self, name: str, value: torch.Tensor | float) -> None:
        target = getattr(self, name)
        if self.dtype == torch.float64:
            target += value
            return
        # Kahan: c holds the low-order bits lost by the previous additions.
        c = self._compensation.setdefault(name, torch.zeros_like(target))
        y = -c + value
        t = target + y
        c.copy_((t - target) - y)
        target.copy_(t)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to sum across processes (the caller may change them in place)."""
        self._check_folds()
        self.finish()
        self._counts = None
        return [getattr(self, name) for name in self._SHAPES]

    def host_counts(self) -> tuple[float, float, float]:
        """``(count, fold_count, unassigned)`` as Python numbers, read from the device once and kept until the sums
        change (:meth:`update`, :meth:`tensors`): a selection reads the token count a dozen times, and on an
        accelerator every read is a synchronisation."""
        if self._counts is None:
            values = torch.stack([self.count, self.fold_count, self.unassigned]).tolist()
            self._counts = (float(values[0]), float(values[1]), float(values[2]))
        return self._counts

    @property
    def rows(self) -> float:
        """The number of rows (tokens) summed: ``count`` as a Python number (:meth:`host_counts`)."""
        return self.host_counts()[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BlockStatistics:
        """A copy on ``device`` in ``dtype`` (selection may run in another precision than accumulation)."""
        self._check_folds()
        self.finish()
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        if device == self.device and dtype == self.dtype:
            return self
        moved = {n: getattr(self, n).to(device=device, dtype=dtype) for n in self._SHAPES}
        return BlockStatistics(self.width, **moved)

    def is_finite(self) -> bool:
        self.finish()
        return all_finite(self.total, self.gram)

    def release_folds(self) -> None:
        """Free the fold sums (a width^2 matrix in the sums' precision) once nothing will validate on them: the
        selection's own width^2 workspace then comes in their place. The halves cannot be formed afterwards."""
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self.fold_gram, self.fold_total = zero.expand(self.width, self.width), zero.expand(self.width)
        self._folds_released = True

    @property
    def folds_released(self) -> bool:
        """Whether :meth:`release_folds` freed the fold sums."""
        return self._folds_released

    def _check_folds(self) -> None:
        if self._folds_released:
            raise ValueError("these statistics' fold sums were released (release_folds()): their halves are gone; "
                             "copy, sum or validate them before releasing the folds")

    def has_halves(self) -> bool:
        """Whether both folds hold rows and every row has a fold (the held-out halves exist)."""
        self._check_folds()
        self.finish()
        count, fold_count, unassigned = self.host_counts()
        return unassigned <= 0 and 0 < fold_count < count

    def halves(self, dtype: torch.dtype | None = None) -> tuple[BlockStatistics, BlockStatistics] | None:
        """Statistics of the two folds (fold 1 = total - fold 0), or ``None`` when one is empty or unknown. (The
        validation reads the halves through :class:`HeldOutHalves` instead, without forming either.)

        In ``dtype`` (default: the sums'), with the values of ``to(dtype=dtype).halves()`` bit for bit (each sum
        cast, then the difference taken in ``dtype``) but without that copy of the whole sums: fold 1's Gram
        matrix is formed a block of rows at a time. Fold 0 shares this object's fold sums where no cast is needed
        (read it, do not add to it).
        """
        if not self.has_halves():
            return None
        dtype = self.dtype if dtype is None else dtype
        second = torch.empty(self.gram.shape, dtype=dtype, device=self.gram.device)
        for start in range(0, self.width, _ROWS):
            rows = slice(start, start + _ROWS)
            torch.sub(self.gram[rows].to(dtype), self.fold_gram[rows].to(dtype), out=second[rows])
        fold_count, fold_total = self.fold_count.to(dtype), self.fold_total.to(dtype)
        first = BlockStatistics(self.width, fold_count, fold_total, self.fold_gram.to(dtype), _read_only=True)
        return first, BlockStatistics(self.width, self.count.to(dtype) - fold_count, self.total.to(dtype) - fold_total,
                                      second, _read_only=True)


# From this many rows (tokens) per column a block's statistics are well posed: selection_dtype="auto" validates in
# float32.
WELL_POSED_ROWS_PER_COLUMN = 2.0
# From this many the re-fit threshold's support is kept without a held-out validation of its own
# (validated_selection). Measured on MiniLM-L6 polarity: trusting it changed nothing at 2.2 tokens per FFN column
# (128 sentences) or from 8.8 per attention column, but at 2.35 per attention column (32 sentences) it raised the
# mean KL to dense from 0.0090 to 0.0103; twice the well-posed density keeps a margin.
TRUSTED_SUPPORT_ROWS_PER_COLUMN = 4.0
# From this many the re-fit ridge is validated one way (fit on the larger half, measure on the other) instead of
# both: half the eigendecompositions. Measured on MiniLM-L6 polarity (FFN 0.5 / heads 0.75, calibration_size): the
# same ridge on every block at 8, 32, 128 and 2048 sentences (KL 0.00899 vs 0.00904 at 32, 0.00655 at 128), one
# FFN block 0.1 for 0.03 at 512 (KL 0.00553 vs 0.00556); selection 4.07 -> 3.16 s at 128 sentences and 3.68 ->
# 3.18 s at 512 (engine_shapes, the same kept groups). Below 2 rows per column the second direction still
# steadies the choice where the re-fit can interpolate the calibration tokens.
ONE_WAY_ROWS_PER_COLUMN = WELL_POSED_ROWS_PER_COLUMN


def well_posed(stats: BlockStatistics, rows_per_column: float = WELL_POSED_ROWS_PER_COLUMN) -> bool:
    """At least ``rows_per_column`` rows per column: no (near-)zero directions in the Gram matrix from too few
    rows, so a least-squares re-fit does not interpolate the calibration tokens."""
    return stats.rows >= rows_per_column * stats.width


def selection_precision(stats: BlockStatistics, requested: str = "auto") -> tuple[torch.dtype, torch.dtype]:
    """The precisions of one block's selection and of its held-out validation: ``(selection, validation)``.

    ``"auto"``: the selection (proxy, thresholds, eliminations) in the accumulation precision (float64), the
    held-out validation of the re-fit ridge, whose eigendecompositions are about half the selection time, in
    float32 where the statistics are well posed (at least :data:`WELL_POSED_ROWS_PER_COLUMN` rows per column).
    Measured on the test models: every well-posed block keeps the groups of an all-float64 selection this way,
    while a float32 elimination ordered two near-equal groups of a tiny ELECTRA's FFN differently; below 2 rows
    per column the Gram matrix has (near-)zero directions and even a float32 validation changed the choice
    (tiny EfficientNet and MobileNetV3, 48 pixel rows for up to 576 columns), so that stays in float64.
    ``"float64"`` / ``"float32"``: both in that precision.
    """
    if requested != "auto":
        dtype = getattr(torch, requested)
        return dtype, dtype
    return stats.dtype, (torch.float32 if well_posed(stats) else stats.dtype)


def _sums(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums and Gram matrix of ``rows`` with products in ``dtype``.

    Half-precision rows on a GPU with float32 products: the tensor cores multiply them as they are, with float32
    results and accumulation (``out_dtype``). A product of two bfloat16 (or float16) numbers is exact in float32, so
    this is the float32 product of the same values, without first widening the whole activation batch and at
    tensor-core speed instead of IEEE float32 speed (about 20x on an H100).
    """
    if _half_product(rows, dtype):
        return rows.sum(0, dtype=torch.float32), torch.mm(rows.T, rows, out_dtype=torch.float32)
    rows = rows.to(dtype)
    return rows.sum(0), _gram(rows)


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows``; on a CPU, at widths where it pays, from half the blocks (:func:`_symmetric_gram`)."""
    if _by_blocks(rows):
        return _symmetric_gram(rows)
    return rows.T @ rows


def _half_product(rows: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether float32 products of ``rows`` run on half-precision inputs with float32 results (see :func:`_sums`)."""
    half = rows.dtype in (torch.bfloat16, torch.float16)
    return half and dtype == torch.float32 and rows.is_cuda and _half_products_available(rows.device)


# On an accelerator, from this width a batch's Gram sums are added as lower panels of this many columns: about half
# the multiply-adds of the whole product (the FFN Gram matrices are most of the calibration's device time) and a
# panel-sized product instead of a width^2 float32 one (37.7 MB at width 3072, 485 MB at 11008) on top of the sums.
_DEVICE_PANEL_WIDTH = 2048
_DEVICE_GRAM_BLOCK = 512  # a multiple of _GRAM_BLOCK: _mirror_lower completes either


def _panel_block(rows: torch.Tensor) -> int | None:
    """Columns per block where a batch's Gram sums are added as lower panels (``BlockStatistics.panels``), or
    ``None``: one whole product."""
    if rows.device.type == "cpu":
        return _GRAM_BLOCK if _by_blocks(rows) else None
    return _DEVICE_GRAM_BLOCK if rows.shape[1] >= _DEVICE_PANEL_WIDTH else None


def _defers_rows(rows: torch.Tensor) -> bool:
    """Whether panel sums buffer rows (``BlockStatistics.deferred_rows``): on a CPU; an accelerator's products are
    fast enough per batch, and a buffer would add its memory."""
    return rows.device.type == "cpu"


def _by_blocks(rows: torch.Tensor) -> bool:
    """Whether the Gram matrix of ``rows`` is formed from its lower blocks (a CPU, 512 columns or more)."""
    return rows.device.type == "cpu" and rows.shape[1] >= 2 * _GRAM_BLOCK


def weight_gram(weight: torch.Tensor, stats: BlockStatistics) -> torch.Tensor:
    """``W^T W`` of an output projection where (and in the precision) the selection runs: the selection and the
    held-out validation of one block take it as ``weight_gram=`` instead of forming it once each."""
    return _weight_gram(_matching(weight, stats))


def _weight_gram(weight: torch.Tensor) -> torch.Tensor:
    """``W^T W``; on an accelerator exactly symmetric, from its lower blocks (:func:`_symmetric_gram`). A device GEMM
    need not round entries (i, j) and (j, i) alike, and an energy ``G * W^T W`` that is not exactly symmetric costs
    the elimination a transposed width^2 copy (:func:`_columns_as_rows`: 72 MB in float64 at BERT-base's FFN width,
    0.9 GiB at LLaMA-7B's); the lower blocks are also half the products. On a CPU as before (blocked, hence
    symmetric, from 512 columns)."""
    return _symmetric_gram(weight) if _mirrors_weight_gram(weight.device) else _gram(weight)


def _factors_energy(device: torch.device) -> bool:
    """Whether the elimination reads the energy from its factors on ``device`` (see :attr:`_Problem.factors`)."""
    return device.type != "cpu"


_ON_DEMAND_WEIGHT_BYTES = 64 << 20


def _weight_gram_on_demand(weight: torch.Tensor, gram: torch.Tensor) -> bool:
    """Whether the factored elimination reads the rows of ``W^T W`` from ``weight`` (on the device and in the
    precision of the statistics' ``gram``) as its steps need them instead of forming it (see
    :attr:`_Problem.factors`).

    Each step then reads ``W`` once: at BERT-base's FFN width (19 MB in float64, 1536 steps) 29 GB per block,
    about 10 ms on an H200 by its bandwidth, for 72 MB less at the selection's peak; at LLaMA-7B's (360 MB, 5504
    steps) 2 TB, about 0.4 s per block, a quarter of a 51 s prune, for 0.9 GiB of 80-141 GiB. Estimates, not
    measurements: up to :data:`_ON_DEMAND_WEIGHT_BYTES` of ``W`` the memory is worth the reads."""
    return _factors_energy(gram.device) and weight.numel() * gram.element_size() <= _ON_DEMAND_WEIGHT_BYTES


def _mirrors_weight_gram(device: torch.device) -> bool:
    """Whether :func:`_weight_gram` forms ``W^T W`` from its lower blocks on ``device`` (an accelerator)."""
    return device.type != "cpu"


_GRAM_BLOCK = 256  # columns per block of the CPU Gram matrix (fastest of 128-384 on 2 cores at width 1536)


def _symmetric_gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows`` from the blocks on and below its diagonal, mirrored: about half the multiply-adds of the
    full product (a BLAS ``syrk``, which torch does not expose), 1.6-1.8x faster on a CPU at width 1536. Every
    entry is a dot product over the rows, as in the full product, and the result is exactly symmetric."""
    width = rows.shape[1]
    gram = torch.empty(width, width, dtype=rows.dtype, device=rows.device)
    for start, end, panel in _lower_panels(rows):
        gram[start:, start:end] = panel
    _mirror_lower(gram)
    return gram


def _lower_panels(rows: torch.Tensor, block: int = _GRAM_BLOCK) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, end, panel)``: rows ``start:`` of columns ``start:end`` of ``rows^T rows``, ``block`` columns at a
    time; float32 panels of half-precision rows (tensor-core products, see :func:`_sums`)."""
    width = rows.shape[1]
    half = rows.dtype in (torch.bfloat16, torch.float16)
    for start in range(0, width, block):
        end = min(start + block, width)
        left, right = rows[:, start:].T, rows[:, start:end]
        yield start, end, torch.mm(left, right, out_dtype=torch.float32) if half else left @ right


def _mirror_lower(matrix: torch.Tensor) -> None:
    """Make ``matrix`` exactly symmetric from its blocks on and below the diagonal (:data:`_GRAM_BLOCK` wide), in
    place: the blocks above are their transposes, a diagonal block's upper triangle its lower one."""
    width = matrix.shape[0]
    for start in range(0, width, _GRAM_BLOCK):
        end = min(start + _GRAM_BLOCK, width)
        matrix[start:end, end:] = matrix[end:, start:end].T
        square = matrix[start:end, start:end]
        square.copy_(torch.tril(square) + torch.tril(square, -1).T)


_HALF_PRODUCTS: dict[str, bool] = {}


def _half_products_available(device: torch.device) -> bool:
    """``torch.mm(..., out_dtype=torch.float32)`` exists for half-precision inputs on this device (torch >= 2.8)."""
    key = str(device)
    if key not in _HALF_PRODUCTS:
        probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        try:
            _HALF_PRODUCTS[key] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _HALF_PRODUCTS[key] = False
    return _HALF_PRODUCTS[key]


@dataclass
class CarriedRefit:
    """The anchored least-squares re-fit the re-fit threshold reached on the support it returned: its downdated
    coefficients are that support's re-fit on the statistics it selected from (the same normal equations that
    :func:`refit_projection` solves afresh), so the final re-fit needs no second solve (see
    :func:`refit_with_residual`)."""

    coefficients: torch.Tensor  # W'^T: one row per kept column (kept groups' columns, in order) x out_features
    damping: float  # the relative ridge it was selected with
    ridge: float  # the absolute ridge (see _ridge)
    centered: bool
    objective: float  # n (tr(D C D^T) + ridge ||W' - W_S||^2): the ridge objective, summed over tokens


@dataclass
class SelectionResult:
    """Kept groups (sorted) and the residual of the selection, before any re-fit."""

    groups: torch.Tensor
    residual: float
    relative_residual: float
    iterations: int
    residual_history: list[float] = field(default_factory=list)
    output_energy: float | None = None  # tr(W G W^T): the dense output's energy, the scale of relative_residual
    refit: CarriedRefit | None = None  # the anchored re-fit threshold's own re-fit of ``groups`` (see CarriedRefit)


def _submatrix(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``matrix[rows][:, cols]`` in one gather (half the memory traffic of the two-step form)."""
    return matrix[rows[:, None], cols]


_INVERSE_LEAF = 256  # the largest diagonal block inverted through its Cholesky factor (fastest of 192-384, 2 cores)


def _spd_inverse(held: list[torch.Tensor], rebuild: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Inverse of the symmetric positive definite matrix in ``held`` (a covariance plus a ridge; the caller's only
    reference, taken from the list), computed in that matrix's own memory by block elimination (see
    :func:`_invert_in_place`): about the multiply-adds of a Cholesky factorisation and its inverse, but nearly all in
    large matrix products, 1.5-1.9x faster on a CPU at width 768-1536 and as accurate (``|P A - I|`` within 1.5x),
    with an n x n/2 workspace instead of a second n x n matrix. Where rounding made the matrix numerically
    indefinite (a diagonal block's factorisation fails), ``rebuild()`` forms it again and LU inverts it."""
    matrix = held.pop()
    failures: list[torch.Tensor] = []
    _invert_in_place(matrix, failures)
    if bool(torch.stack(failures).any()):  # one host read for every block (a synchronisation on an accelerator)
        del matrix
        return torch.linalg.inv(rebuild())
    return matrix


def _invert_in_place(a: torch.Tensor, failures: list[torch.Tensor]) -> None:
    """Overwrite the symmetric positive definite ``a`` (a square view) with its inverse, exactly symmetric.

    With ``B = A11^-1`` and the Schur complement ``S = A22 - A21 B A12``: ``inv = [[B + T S^-1 T^T, -T S^-1],
    [-S^-1 T^T, S^-1]]``, ``T = B A12``; both inverses recursively, down to :data:`_INVERSE_LEAF` columns
    (Cholesky there). ``failures`` receives every leaf's factorisation status (non-zero: not positive definite).
    """
    n = a.shape[0]
    if n <= _INVERSE_LEAF:
        factor, info = torch.linalg.cholesky_ex(a)
        failures.append(info)
        a.copy_(torch.cholesky_inverse(factor))
        return
    h = (n // 2 + 31) // 32 * 32  # a multiple of 32: the products' blocks stay aligned
    a11, a12, a21, a22 = a[:h, :h], a[:h, h:], a[h:, :h], a[h:, h:]
    _invert_in_place(a11, failures)  # B
    t = a11 @ a12  # T = B A12
    a22.addmm_(a21, t, alpha=-1)  # S
    _invert_in_place(a22, failures)  # S^-1
    coupling = t @ a22  # T S^-1
    a11.addmm_(coupling, t.T)  # B + T S^-1 T^T
    del t
    a11.add_(a11.T.clone()).mul_(0.5)  # exactly symmetric (the product above is so only up to rounding)
    a12.copy_(coupling).neg_()
    a21.copy_(a12.T)


def _group_sum(values: torch.Tensor, group_size: int) -> torch.Tensor:
    return values.reshape(-1, group_size).sum(-1)


def group_columns(groups: torch.Tensor, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Column indices of the kept groups (groups are ``group_size`` consecutive columns), on ``device`` (default:
    the groups'). A selection's groups come back on the host; indexing device tensors with a host index copies it
    at every gather (a stream wait on an accelerator), so callers that gather there ask for the columns there."""
    groups = torch.as_tensor(groups).to(device=device, dtype=torch.long)
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).reshape(-1)


def _topk_groups(
    scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None, partitions: int = 1
) -> torch.Tensor:
    """Indices of the ``k`` largest scores (ties broken by lower index, deterministically); with ``partitions``
    > 1 the ``k / partitions`` largest of every run."""
    if partitions > 1:
        return topk_per_run(scores, k // partitions, partitions, candidates)
    if candidates is not None:
        scores = torch.where(candidates, scores, torch.full_like(scores, -torch.inf))
    order = torch.argsort(-scores, stable=True)
    return order[:k]


def _columns_as_rows(matrix: torch.Tensor) -> torch.Tensor:
    """A matrix whose row j is column j of ``matrix``: ``matrix`` itself where it is exactly symmetric (the CPU Gram
    matrices are), else a transposed copy."""
    return matrix if torch.equal(matrix, matrix.T) else matrix.T.contiguous()


class _Problem:
    """The quadratic forms of one block, precomputed once per selection."""

    def __init__(self, stats: BlockStatistics, weight: torch.Tensor, group_size: int,
                 weight_gram: torch.Tensor | None = None) -> None:
        self.stats = stats
        self.group_size = group_size
        self.weight = _matching(weight, stats)
        self.gram = stats.gram
        self.total = stats.total
        self._weight_gram = weight_gram
        self.num_groups = stats.width // group_size
        self._host: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def weight_gram(self) -> torch.Tensor:
        """``W^T W``: the caller's, or formed where it is used (not kept: a width^2 matrix)."""
        return _weight_gram(self.weight) if self._weight_gram is None else self._weight_gram

    @functools.cached_property
    def energy(self) -> torch.Tensor:
        """``E = G * W^T W`` (elementwise), formed on first use: the re-fit threshold needs it only at the end,
        after its own width^2 matrices are gone."""
        return self.gram * self.weight_gram

    @property
    def energy_formed(self) -> bool:
        """Whether :attr:`energy` has been formed (it is cached once it has)."""
        return "energy" in self.__dict__

    @functools.cached_property
    def factors(self) -> torch.Tensor | None:
        """``G`` where :attr:`energy` is read from its factors instead of formed (accelerators, groups of one column,
        ``G`` exactly symmetric so that a row is also a column): a row of ``E`` is ``G``'s times ``W^T W``'s
        (:meth:`weight_gram_rows`), so the elimination multiplies two rows per step (a few more kernels, inside its
        CUDA graph) and the selection holds one width^2 matrix less at its peak (72 MB in float64 at BERT-base's FFN
        width, 0.9 GiB at LLaMA-7B's), two where the caller holds no ``W^T W`` either and it is read from ``W`` on
        demand (:func:`_weight_gram_on_demand`; otherwise formed and kept). ``W^T W`` must be exactly symmetric
        too. ``None``: use :attr:`energy`."""
        if not _factors_energy(self.gram.device) or self.group_size != 1 or self.energy_formed:
            return None
        if not torch.equal(self.gram, self.gram.T):
            return None
        if self._weight_gram is None and not _weight_gram_on_demand(self.weight, self.gram):
            self._weight_gram = self.weight_gram  # kept: every step reads a row of it
        if self._weight_gram is not None and not torch.equal(self._weight_gram, self._weight_gram.T):
            return None
        return self.gram

    def weight_gram_rows(self, rows: slice | torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (and, with ``cols``, columns) of ``W^T W``: the caller's, or ``W[:, rows]^T W`` formed for them (a
        few rows of W^T W cost out x width multiply-adds each and no width^2 matrix)."""
        indexed = isinstance(rows, torch.Tensor)  # index_select: no advanced indexing inside a CUDA graph's step
        if self._weight_gram is not None:
            if cols is not None:
                return _submatrix(self._weight_gram, rows, cols)
            return self._weight_gram.index_select(0, rows) if indexed else self._weight_gram[rows]
        left = self.weight.index_select(1, rows) if indexed else self.weight[:, rows]
        return left.T @ (self.weight if cols is None else self.weight.index_select(1, cols))

    def _energy_block(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``E[rows][:, cols]`` from :attr:`factors` (which must be there), without forming ``E``."""
        return _submatrix(self.factors, rows, cols) * self.weight_gram_rows(rows, cols)

    def _energy_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` of ``E`` from :attr:`factors` (which must be there)."""
        return self.factors[start:end] * self.weight_gram_rows(slice(start, end))

    def _energy_times(self, vector: torch.Tensor) -> torch.Tensor:
        """``E @ vector``; from :attr:`factors` a block of rows at a time (no width^2 product)."""
        if self.factors is None:
            return self.energy @ vector
        out = torch.empty_like(vector)
        for start in range(0, len(vector), _ROWS):
            end = start + _ROWS
            torch.mv(self._energy_rows(start, end), vector, out=out[start:end])
        return out

    @functools.cached_property
    def full_energy(self) -> float:
        if self.factors is not None:
            if self._weight_gram is not None:
                return float(torch.dot(self.factors.reshape(-1), self._weight_gram.reshape(-1)))
            width = self.factors.shape[0]
            return float(sum(self._energy_rows(start, start + _ROWS).sum() for start in range(0, width, _ROWS)))
        return float(self.energy.sum())

    def dropped_mask(self, support: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(self.num_groups, dtype=self.gram.dtype, device=self.gram.device)
        mask[support] = 0.0
        return mask.repeat_interleave(self.group_size)

    def residual(self, support: torch.Tensor) -> float:
        m = self.dropped_mask(support)
        return float(m @ self._energy_times(m) if self.factors is not None else m @ self.energy @ m)

    def dropped_residual(self, support: torch.Tensor) -> float:
        """:meth:`residual` as ``tr(W_D G_DD W_D^T)`` over the dropped columns ``D``: without ``E`` (nor ``W^T W``)
        where neither is at hand, at a fraction of forming them (out x |D|^2 multiply-adds, not width^2 x out)."""
        dropped = torch.nonzero(self.dropped_mask(support)).flatten()
        w_d = self.weight[:, dropped]
        return float((w_d @ _submatrix(self.gram, dropped, dropped) * w_d).sum())

    def proxy(self, support: torch.Tensor, kind: str) -> torch.Tensor:
        """Per-group size of the residual gradient ``V W`` w.r.t. the dense hidden representation."""
        m = self.dropped_mask(support)
        if kind == "sum":
            # Signed sum over samples per column (reference code), then the norm over the group's columns.
            column = self.weight.T @ (self.weight @ (m * self.total))
            return column.reshape(self.num_groups, self.group_size).norm(dim=-1)
        dropped = self.weight * m  # W with kept columns zeroed: V_b = dropped @ H_b
        vtv = dropped @ self.gram @ dropped.T  # sum_b V_b V_b^T
        column = ((vtv @ self.weight) * self.weight).sum(0)  # sum_b (V_b^T W_j)^2
        return _group_sum(column.clamp_min(0), self.group_size).sqrt()

    def static_score(self, kind: str) -> torch.Tensor:
        if kind == "sum":
            return self.total.reshape(self.num_groups, self.group_size).norm(dim=-1)
        if kind == "l2":
            return _group_sum(torch.diagonal(self.gram).clamp_min(0), self.group_size).sqrt()
        if kind == "output":
            return torch.diagonal(self.group_energy())
        raise ValueError(f"unknown score {kind!r}")

    def residual_threshold(self, merged: torch.Tensor, keep: int, partitions: int = 1,
                           path: list[tuple[int, float]] | None = None) -> torch.Tensor:
        """Backward elimination on the merged support with the exact residual (no re-solve).

        One group leaves per step, so the loop is inherently sequential. On the CPU it runs in numpy on the
        group-level energy; on an accelerator it stays on the device and never waits for it (the dropped group is
        a device scalar; the path is rebuilt from the drop order at the end), so a step costs a handful of kernel
        launches instead of a transfer of the whole energy matrix to the host. Both run the same float64 (or
        selection-dtype) arithmetic and break ties by the lower index, so they drop the same groups. With
        ``partitions``, a run at ``keep / partitions`` groups loses no more. ``path`` receives ``(groups kept,
        residual)`` at the start and after every step.
        """
        if self.gram.device.type != "cpu":
            return self._eliminate_on_device(merged, keep, partitions, path)
        energy_t, self_energy = self._host_energy()
        candidate = np.zeros(self.num_groups, dtype=bool)
        candidate[merged.cpu().numpy()] = True
        energy_m = self.dropped_energy(merged).numpy()
        remaining = int(candidate.sum())
        run = np.arange(self.num_groups) // (self.num_groups // partitions)
        counts = np.bincount(run[candidate], minlength=partitions)
        if path is not None:
            residual = self.residual(merged)
            path.append((remaining, residual))
        while remaining > keep:
            # Residual increase when group j joins the dropped set: 2 (E m)_j + E_jj (ties: the lower index).
            movable = candidate & (counts[run] > keep // partitions) if partitions > 1 else candidate
            increase = np.where(movable, 2 * energy_m + self_energy, np.inf)
            drop = int(np.argmin(increase))
            candidate[drop] = False
            counts[run[drop]] -= 1
            remaining -= 1
            energy_m += energy_t[drop]
            if path is not None:
                residual += float(increase[drop])
                path.append((remaining, residual))
        return torch.from_numpy(np.flatnonzero(candidate)).to(merged.device)

    def dropped_energy(self, merged: torch.Tensor) -> torch.Tensor:
        """``E m`` per group, ``m`` marking the columns outside ``merged``: the elimination's starting point."""
        return _group_sum(self._energy_times(self.dropped_mask(merged)), self.group_size)

    def _eliminate_on_device(self, merged: torch.Tensor, keep: int, partitions: int,
                             path: list[tuple[int, float]] | None) -> torch.Tensor:
        """:meth:`residual_threshold` where the statistics live, without a host synchronisation per step."""
        energy_m = self.dropped_energy(merged)
        if self.factors is None:
            energy = self.group_energy()
            energy_t = _columns_as_rows(energy)
            self_energy = torch.diagonal(energy).clone()

            def block_of(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
                return _submatrix(energy, rows, cols)

            def add_row(target: torch.Tensor, index: torch.Tensor) -> None:
                target.add_(energy_t.index_select(0, index).squeeze(0))
        else:  # groups of one column: E's rows from G's and W^T W's, E never formed
            gram = self.factors
            given = self._weight_gram
            column_sq = (self.weight * self.weight).sum(0) if given is None else torch.diagonal(given)
            self_energy = torch.diagonal(gram) * column_sq
            block_of = self._energy_block

            def add_row(target: torch.Tensor, index: torch.Tensor) -> None:
                target.addcmul_(gram.index_select(0, index).squeeze(0), self.weight_gram_rows(index).squeeze(0))
        n, device = self.num_groups, energy_m.device
        # +inf on groups that cannot leave: the increase of a dropped (or protected) group is never the minimum
        blocked = torch.full((n,), torch.inf, dtype=energy_m.dtype, device=device)
        blocked[merged] = 0.0
        remaining = len(merged)
        steps = max(remaining - keep, 0)
        drops = torch.empty(steps, dtype=torch.long, device=device)
        start_m = energy_m.clone() if path is not None else None
        run = torch.arange(n, device=device) // (n // partitions)
        counts = torch.bincount(run[merged], minlength=partitions)
        floor = keep // partitions
        minus_one = torch.full((1,), -1, dtype=counts.dtype, device=device)

        def step(out: torch.Tensor, slot: int) -> None:
            increase = torch.add(self_energy, energy_m, alpha=2).add_(blocked)
            if partitions > 1:  # a run at its floor keeps what it has
                increase = torch.where(counts[run] > floor, increase, torch.inf)
            drop = torch.argmin(increase)  # first minimum: ties go to the lower index, as on the host
            out[slot] = drop
            blocked.index_fill_(0, drop.view(1), torch.inf)
            add_row(energy_m, drop.view(1))
            if partitions > 1:
                counts.index_add_(0, run[drop].view(1), minus_one)

        done = _replay_steps(step, drops, steps) if device.type == "cuda" else 0
        for index in range(done, steps):
            step(drops, index)
        if path is not None:
            # increase of step s = E_dd + 2 ((E m_0)_d + sum of E[d, d_t] over the earlier drops t), d = d_s
            # a block of rows at a time: never the steps^2 submatrix (18 MB in float64 at BERT-base's FFN width,
            # plus its lower-triangle copy) on top of the energy at the selection's peak
            earlier = torch.empty(steps, dtype=energy_m.dtype, device=device)
            for start in range(0, steps, _ROWS):
                rows = drops[start : start + _ROWS]
                block = block_of(rows, drops[: start + len(rows)])  # columns up to each row's own step
                torch.sum(block.tril_(start - 1), 1, out=earlier[start : start + len(rows)])  # the steps before it
            increases = self_energy[drops] + 2 * (start_m[drops] + earlier)
            outside = torch.ones(n, dtype=start_m.dtype, device=device)
            outside[merged] = 0.0
            residual = float(outside @ start_m)  # m^T E m from E m (per group): no second pass over E
            path.append((remaining, residual))
            for index, value in enumerate(increases.tolist()):
                residual += value
                path.append((remaining - index - 1, residual))
        keep_mask = torch.isfinite(blocked)
        return torch.nonzero(keep_mask).flatten()

    def group_energy(self) -> torch.Tensor:
        """``E`` summed over the column pairs of every pair of groups (groups x groups)."""
        g = self.group_size
        if g == 1:
            return self.energy  # a sum over one column pair is the entry itself: no width^2 copy
        return self.energy.reshape(self.num_groups, g, self.num_groups, g).sum((1, 3))

    def _host_energy(self) -> tuple[np.ndarray, np.ndarray]:
        """Group-level energy (transposed: row j = column j) and its diagonal, on the host, computed once."""
        if self._host is None:
            energy = self.group_energy()
            self._host = (_columns_as_rows(energy).cpu().numpy(), torch.diagonal(energy).cpu().numpy().copy())
        return self._host

    def refit_threshold(
        self, merged: torch.Tensor, keep: int, centered: bool, damping: float, anchored: bool = False,
        partitions: int = 1, path: list[tuple[int, float]] | None = None, steps: int = 16,
        carried: list[CarriedRefit] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Backward elimination on the merged support scored by the residual *after* the least-squares re-fit.

        Removing group ``j`` from a support with inverse covariance ``P`` and re-fitted coefficients ``Z = P Q``
        (``Q`` = cross-covariance with the dense output) costs ``tr(Z_j^T P_jj^{-1} Z_j)`` (the structured
        Optimal Brain Surgeon step); ``P`` and ``Z`` are then downdated in closed form, and the residual grows by
        the chunk's joint cost ``tr(Z_D^T P_DD^-1 Z_D)`` (no cross-covariance is carried along). Groups leave in
        chunks so the work is matrix-matrix. Returns the support and its residual after re-fit (summed over
        tokens).

        ``anchored``: the ridge pulls the re-fit towards the original columns ``W_S`` (see
        :func:`refit_projection`). That is ordinary least squares on an augmented design (``sqrt(ridge) I`` rows
        with targets ``sqrt(ridge) W``) whose objective also charges ``ridge ||W_j||^2`` for every dropped
        group, so the same downdates apply and that charge is subtracted from the cost; the returned value is
        the ridge objective ``||Y - H_S W'^T||^2 + ridge ||W' - W_S||^2`` (summed over tokens). With
        ``partitions``, a chunk takes the cheapest groups whose run stays at ``keep / partitions`` or more.

        ``path``: receives ``(groups kept, residual after re-fit)`` at the start and after every chunk (the
        residual curve of :func:`residual_curve`); ``steps``: the number of chunks. ``carried`` (anchored only):
        receives the returned support's re-fit (:class:`CarriedRefit`), the downdated coefficients.
        """
        g, n = self.group_size, max(self.stats.rows, 1.0)
        cov = _moments(self.stats, centered)[1]
        support = torch.sort(merged).values
        cols = group_columns(support, g)
        ridge = _ridge(cov, cols, damping, anchored)
        everything = len(cols) == cov.shape[0]  # cols is sorted: the whole block, no gathers needed
        column_sq = self.weight.pow(2).sum(0)  # ||W_c||^2 per column
        if everything and anchored:
            # The whole block re-fits to W itself: Z = (C + ridge I)^-1 (C W^T + ridge W^T) = W^T, and the ridge
            # objective is 0; neither the cross-covariance nor tr(W C W^T) is needed.
            coef = self.weight.T.to(cov).clone(memory_format=torch.contiguous_format)
            augmented = torch.zeros((), dtype=cov.dtype, device=cov.device)
        else:
            cross = (cov if everything else cov[cols]) @ self.weight.T  # Q: (m g) x d
            # tr(W C W^T) = <C, W^T W>
            total = float(torch.dot(cov.reshape(-1), self.weight_gram.to(cov).reshape(-1)))
            if anchored:
                cross = cross + ridge * self.weight[:, cols].T
                total += ridge * float(column_sq.sum())
        def system(moment: torch.Tensor) -> torch.Tensor:  # C_SS + ridge I (the whole block: in place)
            kept_block = moment if everything else _submatrix(moment, cols, cols)
            kept_block.diagonal().add_(ridge)
            return kept_block

        held = [system(cov)]
        del cov  # what follows needs only the kept block: at most two width^2 matrices live at once
        # the LU fallback forms the system again (the first was inverted in place)
        inv = _spd_inverse(held, lambda: system(_moments(self.stats, centered)[1]))
        if not (everything and anchored):
            coef = inv @ cross  # Z
            augmented = total - (cross * coef).sum()  # the (augmented) objective at the merged support (on device)
            del cross

        def objective(kept: torch.Tensor, augmented: torch.Tensor) -> float:
            if not anchored:
                return max(float(augmented), 0.0) * n
            dropped = float(column_sq.sum() - column_sq[group_columns(kept, g)].sum())
            return max(float(augmented) - ridge * dropped, 0.0) * n

        start = len(path) if path is not None else 0
        # a rerun in place starts from the same coefficients (W^T itself on the whole block, anchored: no copy)
        first = None if everything and anchored else coef.clone()
        augmented_start = augmented
        kept, positions, augmented, failed = self._eliminate(inv, coef, augmented, support, keep, ridge, column_sq,
                                                             anchored, partitions, steps, path, objective)
        if failed:  # rounding made a pivot block indefinite for the factors: downdate P itself (as LU allows)
            logger.debug("refit_threshold: a factored downdate's pivot block is not positive definite; "
                         "eliminating again with in-place downdates")
            if path is not None:
                del path[start:]
            del inv  # its dropped rows hold the factors: inverted again (a rare path)
            inv = _spd_inverse([system(_moments(self.stats, centered)[1])],
                               lambda: system(_moments(self.stats, centered)[1]))
            coef = self.weight.T.to(inv).clone(memory_format=torch.contiguous_format) if first is None else first
            kept, positions, augmented, failed = self._eliminate(inv, coef, augmented_start, support, keep, ridge,
                                                                 column_sq, anchored, partitions, steps, path,
                                                                 objective, factored=False)
        if failed:
            raise torch.linalg.LinAlgError(
                "refit_threshold: a downdate's pivot block is singular (the kept covariance is numerically "
                "rank-deficient in this precision)"
            )
        value = objective(kept, augmented)
        if carried is not None and anchored:
            carried.append(CarriedRefit(coef[group_columns(positions, g)], damping, ridge, centered, value))
        return kept, value

    def _eliminate(
        self, inv: torch.Tensor, coef: torch.Tensor, augmented: torch.Tensor, support: torch.Tensor, keep: int,
        ridge: float, column_sq: torch.Tensor, anchored: bool, partitions: int, steps: int,
        path: list[tuple[int, float]] | None, objective: Callable[[torch.Tensor, torch.Tensor], float],
        factored: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """The OBS elimination of :meth:`refit_threshold` from ``P = inv`` and ``Z = coef`` (downdated in place) down
        to ``keep`` groups. Returns the kept groups, their positions in ``inv`` and ``coef``, the augmented objective
        and whether a solve failed (read once, at the end: not a wait per chunk).

        ``factored``: ``P`` is not downdated; its downdates are kept as factors, ``P_t = P_0 - F^T F`` with
        ``F = [u_1; ..; u_t]``, ``u_t = L^-1 P_{t-1}[D, :]`` and ``L L^T = P_{t-1}[D, D]``, and a chunk reads
        ``P_t``'s rows ``D`` and its diagonal (blocks) from them: width x rank work per chunk instead of a width^2
        update of ``P`` (in place those cost as much as the inverse itself). ``u_t`` is stored in ``P``'s rows
        ``D``, which nothing reads once ``D`` has left (columns are never mixed: row ``j`` of ``Z`` and entry ``j`` of
        the diagonal read column ``j`` of ``P`` and the factors only), so the factors take no memory of their own;
        ``inv`` is spent. A pivot block that rounding made indefinite fails its Cholesky factorisation; in place
        (``factored`` False), ``P`` itself is downdated through an LU solve of the pivot block, which fails only on
        an exactly singular one.
        """
        g = self.group_size
        chunk = max(1, (len(support) - keep) // steps)  # 16 downdates: matrix-matrix work, near-greedy quality
        # inv and coef keep the merged support's size: rows and columns of the groups that left are stale and never
        # read again (positions: where the kept groups sit in them), so no downdate gathers a kept x kept copy
        kept = support
        positions = torch.arange(len(support), device=support.device)
        failures: list[torch.Tensor] = []  # solver status per chunk

        def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            solution, info = torch.linalg.solve_ex(a, b)
            failures.append(info.reshape(-1))
            return solution

        blocks, rank = len(support), 0
        written = torch.empty((blocks - keep) * g if factored else 0, dtype=torch.long, device=inv.device)
        if g == 1:
            diagonal = torch.diagonal(inv)
        else:  # blocks x g x g
            diagonal = torch.diagonal(inv.reshape(blocks, g, blocks, g), dim1=0, dim2=2).permute(2, 0, 1)
        if factored:
            diagonal = diagonal.clone()
        if path is not None:
            path.append((len(kept), objective(kept, augmented)))
        while len(kept) > keep:
            m = len(kept)
            live = group_columns(positions, g)
            zb = coef[live].reshape(m, g, -1)
            if g == 1:
                cost = zb.pow(2).sum((1, 2)) / diagonal[live].clamp_min(torch.finfo(inv.dtype).tiny)
            else:
                cost = (zb * solve(diagonal[positions], zb)).sum((1, 2))
            if anchored:  # the augmented objective charges ridge ||W_j||^2 for a dropped group; the true one not
                cost = cost - ridge * _group_sum(column_sq[group_columns(kept, g)], g)
            order = torch.argsort(cost, stable=True)
            if partitions > 1:  # the cheapest groups whose runs stay at keep / partitions or more
                runs = (kept // (self.num_groups // partitions)).cpu().numpy()
                chosen = drops_above_floor(runs[order.cpu().numpy()], np.bincount(runs, minlength=partitions),
                                           keep // partitions, min(chunk, m - keep))
                leaving = torch.zeros(m, dtype=torch.bool, device=order.device)
                leaving[torch.from_numpy(chosen).to(order.device)] = True
                drop, stay = order[leaving], torch.sort(order[~leaving]).values
            else:
                drop, stay = order[: min(chunk, m - keep)], torch.sort(order[min(chunk, m - keep) :]).values
            idx = group_columns(positions[drop], g)
            # P_t[D, :] (whole rows: a strided gather of columns P[:, D] was about a tenth of the re-fit threshold
            # on a CPU); its transpose serves as P[:, D], equal up to the rounding of the downdates
            rows = inv.index_select(0, idx)
            if factored:
                for begin in range(0, rank, _ROWS):  # P_0[D, :] - F[:, D]^T F, F a block of its rows at a time
                    factor_rows = inv.index_select(0, written[begin : min(begin + _ROWS, rank)])
                    rows.addmm_(factor_rows[:, idx].T, factor_rows, alpha=-1)
                pivot, info = torch.linalg.cholesky_ex(rows[:, idx])
                failures.append(info.reshape(-1))
                u = torch.linalg.solve_triangular(pivot, rows, upper=False)  # L^-1 P_t[D, :]
                leaving_coef = torch.linalg.solve_triangular(pivot, coef[idx], upper=False)  # L^-1 Z_D
                # The objective grows by exactly tr(Z_D^T P_DD^-1 Z_D) (the joint OBS cost of the chunk).
                augmented = augmented + leaving_coef.pow(2).sum()  # no host read per chunk
                # Z -= P[:, D] P_DD^-1 Z_D; the diagonal (blocks) of P less u u^T's: exact on what stays
                coef.addmm_(u.T, leaving_coef, alpha=-1)
                if g == 1:
                    diagonal.sub_(u.pow(2).sum(0))
                else:
                    ub = u.reshape(len(idx), blocks, g).permute(1, 2, 0)  # blocks x g x |D|
                    diagonal.baddbmm_(ub, ub.transpose(1, 2), alpha=-1)
                inv.index_copy_(0, idx, u)  # rows that left hold the factors
                written[rank : rank + len(idx)] = idx
                rank += len(idx)
            else:
                leaving_coef = coef[idx]
                solved = solve(rows[:, idx], torch.cat([rows, leaving_coef], 1))
                augmented = augmented + (leaving_coef * solved[:, inv.shape[0] :]).sum()
                # Schur downdate in place, one fused multiply-subtract each: exact on the rows and columns that stay
                inv.addmm_(rows.T, solved[:, : inv.shape[0]], alpha=-1)
                coef.addmm_(rows.T, solved[:, inv.shape[0] :], alpha=-1)
            kept, positions = kept[stay], positions[stay]
            if path is not None:
                path.append((len(kept), objective(kept, augmented)))
        failed = bool(torch.cat(failures).any()) if failures else False
        return kept, positions, augmented, failed


_GRAPH_STEPS = 64  # elimination steps per captured CUDA graph


def _replay_steps(step: Callable[[torch.Tensor, int], None], drops: torch.Tensor, steps: int) -> int:
    """Run elimination steps as replays of one captured CUDA graph of :data:`_GRAPH_STEPS` steps; returns how
    many ran. A step is a few tiny kernels whose launch (about 10 us of Python and dispatch each) costs far more
    than their work; a replay launches them all at once. The first steps run eagerly on a side stream (the
    warm-up CUDA graphs need); a capture that fails leaves everything to the eager loop."""
    size = _GRAPH_STEPS
    if steps < 4 * size:
        return 0
    warm = 3
    side = torch.cuda.Stream(drops.device)
    side.wait_stream(torch.cuda.current_stream(drops.device))
    with torch.cuda.stream(side):
        for index in range(warm):
            step(drops, index)
    torch.cuda.current_stream(drops.device).wait_stream(side)
    chunk = torch.empty(size, dtype=drops.dtype, device=drops.device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for slot in range(size):
                step(chunk, slot)
    except RuntimeError as error:  # capture unsupported here: the eager loop takes over where the warm-up ended
        logger.debug("elimination runs eagerly: CUDA graph capture failed (%s)", error)
        return warm
    done = warm
    while steps - done >= size:
        graph.replay()
        drops[done:done + size].copy_(chunk)
        done += size
    return done


def residual_curve(
    stats: BlockStatistics,
    weight: torch.Tensor,
    group_size: int,
    *,
    refit: bool = True,
    centered: bool = True,
    damping: float = 1e-4,
    anchored: bool = False,
    partitions: int = 1,
    steps: int = 32,
) -> tuple[list[int], list[float]]:
    """How the block's output error grows as groups leave: ``(groups kept, residual)`` from all groups down to one
    per run (summed over tokens, as :attr:`SelectionResult.residual`).

    Backward elimination from the full support by the residual after the least-squares re-fit (``refit``; in
    ``steps`` chunks of matrix-matrix downdates) or by the exact residual without re-fit (one group per step).
    A budget allocation reads where width is cheap to remove from these curves (:mod:`hf_ispasp.allocation`).
    """
    if stats.width % group_size:
        raise ValueError(f"width {stats.width} is not a multiple of the group size {group_size}")
    problem = _Problem(stats, weight, group_size)
    n = problem.num_groups
    check_partitions(n, partitions, partitions)
    everything = torch.arange(n, device=problem.gram.device)
    path: list[tuple[int, float]] = []
    if refit:
        problem.refit_threshold(everything, partitions, centered, damping, anchored, partitions, path, steps)
    else:
        problem.residual_threshold(everything, partitions, partitions, path)
    counts, residuals = zip(*path, strict=True)
    return list(counts), list(residuals)


def select_groups(
    stats: BlockStatistics,
    weight: torch.Tensor,
    group_size: int,
    keep: int,
    *,
    selection: str = "ispasp",
    proxy: str = "l2",
    threshold: str = "output",
    num_iterations: int = 20,
    weight_scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    centered: bool = True,
    damping: float = 1e-4,
    anchored: bool = False,
    partitions: int = 1,
    weight_gram: torch.Tensor | None = None,
    output_energy: float | None = None,
) -> SelectionResult:
    """Choose ``keep`` groups of a block.

    Args:
        stats: Statistics of the dense hidden representation on the calibration inputs.
        weight: The output projection ``W`` (out_features x width); columns are grouped consecutively.
        group_size: Columns per group (1 for neurons, head_dim for attention heads).
        keep: Number of groups to keep, ``1 <= keep <= num_groups``.
        selection: ``ispasp`` or a baseline (``random``, ``weight_magnitude``, ``activation``,
            ``output_energy``, ``taylor``, ``wanda_sp``, ``flap``, ``llm_pruner``; see :mod:`hf_ispasp.baselines`).
        proxy: ``sum`` (signed sum over samples, as the reference code) or ``l2`` over samples.
        threshold: ``sum``, ``l2``, ``output`` (static scores), ``residual`` (exact residual elimination) or
            ``refit`` (elimination by the residual after the least-squares re-fit).
        num_iterations: Maximum iterations; stops when the support repeats.
        weight_scores: Per-group scores, required by ``weight_magnitude``, ``taylor`` and ``llm_pruner``.
        generator: Random generator for ``random``.
        centered: The re-fit has a bias (use centred statistics); only for ``threshold="refit"``.
        damping: Relative ridge of the re-fit; only for ``threshold="refit"``.
        anchored: The ridge pulls the re-fit towards the original columns instead of zero (see
            :func:`refit_projection`); only for ``threshold="refit"``.
        partitions: The groups fall into this many equal contiguous runs and every run keeps ``keep / partitions``
            (see :mod:`hf_ispasp.partitions`): ranking rules take the top of every run, ``random`` draws per run,
            i-SpaSP's candidate step takes the top ``2 keep / partitions`` of every run and its thresholds never
            take a run below ``keep / partitions``.
        weight_gram: ``W^T W`` from :func:`weight_gram`, when the caller already has it.
        output_energy: ``tr(W G W^T)`` (a :class:`SelectionResult`'s ``output_energy``), when the caller already has
            it: a rule that never formed ``E = G * W^T W`` (the re-fit threshold) then measures its residual on the
            dropped columns instead of forming ``E`` for it.
    """
    if stats.width % group_size:
        raise ValueError(f"width {stats.width} is not a multiple of the group size {group_size}")
    problem = _Problem(stats, weight, group_size, weight_gram)
    n = problem.num_groups
    if not 1 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} groups")
    check_partitions(n, keep, partitions)
    p = partitions
    history: list[float] = []
    iterations = 0
    best_refit: CarriedRefit | None = None  # the anchored re-fit threshold's re-fit of the support it returns
    device = problem.gram.device
    if keep == n:
        support = torch.arange(n, device=device)
    elif selection == "random" and p == 1:
        support = torch.randperm(n, generator=generator)[:keep].to(device)
    elif selection == "random":
        support = random_per_run(n, keep // p, p, generator).to(device)
    elif selection in ("weight_magnitude", "taylor", "llm_pruner"):
        if weight_scores is None:
            raise ValueError(f"{selection} selection needs weight_scores (precomputed per-group scores)")
        support = _topk_groups(weight_scores.to(device=device, dtype=problem.gram.dtype), keep, partitions=p)
    elif selection == "activation":
        support = _topk_groups(problem.static_score("l2"), keep, partitions=p)
    elif selection == "output_energy":
        support = _topk_groups(problem.static_score("output"), keep, partitions=p)
    elif selection == "wanda_sp":
        support = _topk_groups(wanda_sp_scores(torch.diagonal(stats.gram), problem.weight, group_size), keep,
                               partitions=p)
    elif selection == "flap":
        scores = flap_scores(stats.rows, stats.total, torch.diagonal(stats.gram), problem.weight, group_size)
        support = _topk_groups(scores, keep, partitions=p)
    elif selection == "ispasp":
        static = None if threshold in ("residual", "refit") else problem.static_score(threshold)
        support = torch.zeros(0, dtype=torch.long, device=device)
        best, best_residual = support, float("inf")
        previous = None
        for iterations in range(1, num_iterations + 1):  # noqa: B007 (reported after the loop)
            merged = torch.zeros(n, dtype=torch.bool, device=device)
            if 2 * keep >= n:  # the candidates are every group whatever the proxy says: skip computing it
                merged[:] = True
            else:
                merged[_topk_groups(problem.proxy(support, proxy), 2 * keep, partitions=p)] = True
            merged[support] = True
            if previous is not None and torch.equal(merged, previous):
                break  # the threshold is a function of the merged set: the support cannot change any more
            previous = merged
            candidates = torch.nonzero(merged).flatten()
            carried: list[CarriedRefit] = []
            if threshold == "refit":
                new_support, residual = problem.refit_threshold(candidates, keep, centered, damping, anchored, p,
                                                                carried=carried)
            elif threshold == "residual":
                new_support = problem.residual_threshold(candidates, keep, p)
            else:
                new_support = _topk_groups(static, keep, candidates=merged, partitions=p)
            new_support = torch.sort(new_support).values
            if threshold != "refit":  # the re-fit threshold tracks the residual after re-fit instead
                residual = problem.residual(new_support)
            history.append(residual)
            # The costly re-fit threshold also halts once an iteration gains less than 1% of the residual.
            significant = threshold != "refit" or residual < 0.99 * best_residual
            if residual < best_residual:
                best, best_residual, best_refit = new_support, residual, (carried[0] if carried else None)
            if torch.equal(new_support, support) or not significant:
                break  # CoSaMP-style halting
            support = new_support
        support = best
    else:
        raise ValueError(f"unknown selection rule {selection!r}")
    support = torch.sort(support).values
    if output_energy is not None and not problem.energy_formed:  # E was not needed: do not form it now
        residual, full = problem.dropped_residual(support), output_energy
    else:
        residual, full = problem.residual(support), problem.full_energy
    residual = max(residual, 0.0)  # a quadratic form of PSD matrices: only rounding is negative
    relative = residual / full if full > 0 else 0.0
    return SelectionResult(support.cpu(), residual, relative, iterations, history, full, best_refit)


def _matching(tensor: torch.Tensor, stats: BlockStatistics) -> torch.Tensor:
    """``tensor`` (a weight or bias) on the statistics' device and in their dtype: the selection runs there."""
    return tensor.detach().to(device=stats.gram.device, dtype=stats.gram.dtype)


def output_energy(stats: BlockStatistics, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``sum ||H W^T + b||^2`` over the tokens of ``stats``: the energy of the block's dense output."""
    w = _matching(weight, stats)
    value = (w @ stats.gram * w).sum()  # tr(W G W^T)
    if bias is not None:
        b = _matching(bias, stats)
        value = value + 2 * (b @ (w @ stats.total)) + stats.count * b.pow(2).sum()
    return max(float(value), 0.0)


_ROWS = 256  # rows per chunk of an in-place width^2 update


def _moments(stats: BlockStatistics, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and second moment per token (centred when the projection has a bias to absorb the mean).

    The mean's outer product is subtracted a block of rows at a time, in place: one width^2 matrix is formed, not
    three (the same values as ``gram / n - outer(mean, mean)``).
    """
    n = max(stats.rows, 1.0)
    mean = stats.total / n
    moment = stats.gram / n
    if centered:
        for start in range(0, moment.shape[0], _ROWS):
            moment[start : start + _ROWS] -= torch.outer(mean[start : start + _ROWS], mean)
    return mean, moment


def _ridge(moment: torch.Tensor, cols: torch.Tensor, damping: float, anchored: bool) -> float:
    """Absolute ridge from a relative one.

    Towards zero (the historical re-fit) it is relative to the mean variance of the kept columns; anchored, to
    the mean variance of all the block's columns, so the threshold (whose candidate set changes) and the final
    re-fit use one ridge for one block.
    """
    diagonal = torch.diagonal(moment) if anchored else torch.diagonal(moment)[cols]
    return damping * float(diagonal.mean().clamp_min(0)) + 1e-12


def refit_projection(
    stats: BlockStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: torch.Tensor,
    group_size: int,
    damping: float = 1e-4,
    anchored: bool = False,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares output projection on the kept groups: ``min ||H W^T + b - H_S W'^T - b'||``.

    With a bias the problem is solved on centred statistics (the bias absorbs the mean of the dropped
    columns); without one, on raw second moments. The ridge ``damping`` is relative (see :func:`_ridge`);
    ``anchored`` pulls ``W'`` towards the original columns ``W_S`` rather than towards zero, so a large ridge
    degrades gracefully to plain selection (``damping=inf``: ``W' = W_S``, only the bias is re-fitted) instead
    of to a zero projection. Returns ``(W', b')`` on the statistics' device and in their dtype. ``moments``: the
    ``(mean, second moment)`` of ``stats`` as :func:`_moments` forms them, where the caller has them already.
    """
    w = _matching(weight, stats)
    cols = group_columns(groups, group_size, stats.gram.device)
    if stats.rows <= 0:
        raise ValueError("cannot re-fit without calibration tokens")
    mean, moment = _moments(stats, centered=bias is not None) if moments is None else moments
    if anchored and math.isinf(damping):
        new_weight = w[:, cols].clone()
    else:
        system, rhs, _ = _normal_equations(moment, w, cols, damping, anchored, moment[cols] @ w.T)
        new_weight = torch.linalg.solve(system, rhs).T.contiguous()
    return new_weight, _absorbed_bias(stats, w, bias, new_weight, mean, cols)


def _normal_equations(moment: torch.Tensor, w: torch.Tensor, cols: torch.Tensor, damping: float, anchored: bool,
                      cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(C_SS + ridge I, cross + ridge W_S^T (anchored), ridge)``: the re-fit's system, from ``cross`` = ``M[S, :]
    W^T`` (updated in place where anchored) and the relative ``damping`` (see :func:`_ridge`)."""
    ridge = _ridge(moment, cols, damping, anchored)
    system = _submatrix(moment, cols, cols)
    system.diagonal().add_(ridge)
    if anchored:
        cross += ridge * w[:, cols].T
    return system, cross, ridge


def _absorbed_bias(stats: BlockStatistics, w: torch.Tensor, bias: torch.Tensor | None, new_weight: torch.Tensor,
                   mean: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
    """The re-fitted bias: it absorbs the mean output of what the re-fit changed (``None`` without a bias)."""
    return None if bias is None else _matching(bias, stats) + w @ mean - new_weight @ mean[cols]


def residual_after_refit(
    stats: BlockStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: torch.Tensor,
    group_size: int,
    new_weight: torch.Tensor,
    new_bias: torch.Tensor | None,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """``sum_b ||H_b W^T + b - H_{b,S} W'^T - b'||^2`` from the statistics (of any data: all, or one fold).

    Computed as ``n (tr(D C D^T) + ||D mean + shift||^2)`` with the centred covariance ``C``: both terms are
    non-negative in exact arithmetic and nothing large cancels (the raw form subtracts mean terms of the size
    of the signal), so only rounding noise is clamped. ``moments``: the centred ``(mean, covariance)`` of
    ``stats`` where the caller has them already.
    """
    w = _matching(weight, stats)
    cols = group_columns(groups, group_size, stats.gram.device)
    n = stats.rows
    if n <= 0:
        return 0.0
    diff = w.clone()
    diff[:, cols] -= new_weight.to(w)
    shift = torch.zeros_like(w[:, 0])
    if bias is not None and new_bias is not None:
        shift = _matching(bias, stats) - new_bias.to(w)
    mean, cov = _moments(stats, centered=True) if moments is None else moments
    spread = max(float((diff @ cov * diff).sum()), 0.0)
    offset = float((diff @ mean + shift).pow(2).sum())
    return n * (spread + offset)


def refit_with_residual(
    stats: BlockStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: torch.Tensor,
    group_size: int,
    damping: float = 1e-4,
    anchored: bool = False,
    carried: CarriedRefit | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """:func:`refit_projection` and its :func:`residual_after_refit`: ``(W', b', residual)``. With a bias both use
    the centred moments, formed once here instead of once each (a width^2 copy of the sums and its centring).

    ``carried``: the re-fit threshold's own re-fit of ``groups`` (:attr:`SelectionResult.refit`). Where it is this
    re-fit (anchored, the same relative ridge and centring, selected from these statistics in their precision) its
    coefficients are ``W'`` and the residual is its ridge objective less the ridge term, so neither the solve nor
    the ``out x width^2`` residual product runs (about 40% of a MiniLM FFN block's selection after the threshold).
    The downdated coefficients equal a fresh solve to rounding (measured: relative difference below 1e-9).
    """
    if _carries(carried, stats, groups, group_size, damping, anchored, bias is not None):
        return _carried_refit(carried, stats, weight, bias, groups, group_size)
    if stats.rows > 0 and not (anchored and math.isinf(damping)):
        return _solved_refit(stats, weight, bias, groups, group_size, damping, anchored)
    moments = _moments(stats, centered=True) if bias is not None else None
    fitted = refit_projection(stats, weight, bias, groups, group_size, damping, anchored, moments)
    return (*fitted, residual_after_refit(stats, weight, bias, groups, group_size, *fitted, moments))


def _solved_refit(stats: BlockStatistics, weight: torch.Tensor, bias: torch.Tensor | None, groups: torch.Tensor,
                  group_size: int, damping: float, anchored: bool) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """:func:`refit_projection` and :func:`residual_after_refit` from one product ``M W^T`` (``M``: the moments the
    re-fit solves with): its kept rows are the right-hand side, its inner product with ``W^T`` is ``tr(W M W^T)``,
    and the residual is the ridge objective at the solution less the ridge term (as :func:`_carried_refit`), with
    no ``out x width^2`` residual product; the system is solved through its Cholesky factor (LU where rounding
    made it indefinite). The same ``(W', b', residual)`` to rounding in about 70% of the time (on 2 CPU threads
    0.042 against 0.054 s at MiniLM's FFN width, 0.28 against 0.41 s at BERT-base's; ``selection_profile``'s
    ``refit_solved``): the final re-fit of every block whose re-fit the threshold did not carry (a float32
    selection, a support another rule chose).

    Without a bias ``M`` is the raw second moment, whose ``tr(D M D^T)`` is the residual's spread plus its mean
    offset; with one, the centred covariance, and the absorbed bias leaves no offset.
    """
    w = _matching(weight, stats)
    cols = group_columns(groups, group_size, stats.gram.device)
    mean, moment = _moments(stats, centered=bias is not None)
    product = moment @ w.T  # M W^T: width x out
    total = torch.dot(product.reshape(-1), w.T.reshape(-1))  # tr(W M W^T)
    system, rhs, ridge = _normal_equations(moment, w, cols, damping, anchored, product[cols])
    del moment, product
    kept = w[:, cols].T
    if anchored:
        total = total + ridge * kept.pow(2).sum()
    factor, info = torch.linalg.cholesky_ex(system)
    coef = torch.linalg.solve(system, rhs) if bool(info) else torch.cholesky_solve(rhs, factor)
    pull = (coef - kept if anchored else coef).pow(2).sum()
    objective = total - torch.dot(rhs.reshape(-1), coef.reshape(-1)) - ridge * pull
    new_weight = coef.T.contiguous()
    return new_weight, _absorbed_bias(stats, w, bias, new_weight, mean, cols), stats.rows * max(float(objective), 0.0)


def _carries(carried: CarriedRefit | None, stats: BlockStatistics, groups: torch.Tensor, group_size: int,
             damping: float, anchored: bool, centered: bool) -> bool:
    """Whether ``carried`` is the anchored re-fit of ``groups`` that :func:`refit_projection` would solve here."""
    if carried is None or not anchored or math.isinf(damping) or carried.damping != damping:
        return False
    coefficients = carried.coefficients
    return (carried.centered == centered and coefficients.dtype == stats.dtype
            and coefficients.device == stats.gram.device and len(coefficients) == len(groups) * group_size)


def _carried_refit(carried: CarriedRefit, stats: BlockStatistics, weight: torch.Tensor, bias: torch.Tensor | None,
                   groups: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(W', b', residual)`` from the re-fit threshold's coefficients: the bias as :func:`refit_projection` sets it
    (it absorbs the mean of what changed), the residual as the objective less ``n ridge ||W' - W_S||^2``."""
    w = _matching(weight, stats)
    cols = group_columns(groups, group_size, stats.gram.device)
    new_weight = carried.coefficients.T.contiguous()
    n = max(stats.rows, 1.0)
    new_bias = _absorbed_bias(stats, w, bias, new_weight, stats.total / n, cols)
    pull = float((new_weight - w[:, cols]).pow(2).sum())
    return new_weight, new_bias, max(carried.objective - n * carried.ridge * pull, 0.0)


# Relative ridges tried by the held-out validation of the re-fit (anchored at the original columns, relative to
# the mean variance of the block's columns, on the scale of the whole calibration set). 1e-4 is the historical
# default; inf keeps W_S and re-fits only the bias.
REFIT_RIDGES: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, math.inf)


@dataclass
class RefitChoice:
    """The re-fit of one block chosen on held-out data.

    ``ridge`` is the relative ridge to re-fit with (``inf``: keep ``W_S``, re-fit the bias), or ``None`` when no
    candidate beat plain selection on held-out data, or when the halves were unavailable (``validated`` False).
    Residuals are summed over tokens: ``heldout`` of the choice, ``plain`` of no re-fit (which fits nothing, so
    its held-out residual is its residual on all the data), ``scores`` per candidate ridge.
    """

    ridge: float | None
    heldout: float
    plain: float
    scores: dict[float, float] = field(default_factory=dict)
    validated: bool = True
    # False where the chosen support is not the one validated: on a well-posed block (:func:`validated_selection`)
    # the re-fit threshold's support is kept with the ridge validated on the exact-residual support, whose
    # residuals ``heldout``, ``plain`` and ``scores`` are.
    support_validated: bool = True


WeightGramRows = torch.Tensor | Callable[[slice], torch.Tensor]  # W^T W, or a block of its rows on demand


class HeldOutHalves:
    """Both halves of a block's calibration sums as :func:`validate_refit` reads them (fold 1 = the sums less fold
    0), without a width^2 matrix of either: the parts every support shares (mean, count, ``tr(W C W^T)``, the
    ridges' scale) are formed once, a block of rows at a time; a support then reads only its rows of each half's
    covariance and its k x k block, gathered from the sums and centred as gathered. The validations of one block
    share one (:func:`validated_selection`).

    In ``dtype`` with the values of ``stats.to(dtype=dtype).halves()``'s moments entry for entry (each sum cast,
    then fold 1's difference taken in ``dtype``); only the order in which ``tr(W C W^T)`` is summed differs. A
    half's covariance formed whole cost the validation two width^2 matrices of its precision at once (a cast or
    difference of the sums, then its centred moments in that copy): 75 MB in float32 at BERT-base's FFN width.
    """

    def __init__(self, stats: BlockStatistics, w: torch.Tensor, gram_w: WeightGramRows, centered: bool,
                 dtype: torch.dtype, both_ways: bool | None = None) -> None:
        # gram_w (W^T W, or a function giving a block of its rows) is read here only, a block of rows at a time in
        # ``dtype``: it may be in another precision (the selection's), and nothing holds it afterwards. Built by
        # of(), which finishes the sums.
        count, fold_count, _ = stats.host_counts()
        self.stats, self.w, self.centered, self.dtype = stats, w, centered, dtype
        self.counts = (fold_count, count - fold_count)
        first = stats.fold_total.to(dtype)
        self.means = tuple(t / max(n, 1.0) for t, n in zip((first, stats.total.to(dtype) - first), self.counts,
                                                            strict=True))
        diagonal = torch.diagonal(stats.fold_gram).to(dtype)
        diagonals = (diagonal, torch.diagonal(stats.gram).to(dtype) - diagonal)
        # the mean variance of the columns (the diagonal of each half's moments), the scale of the relative ridges
        variances = [d / max(n, 1.0) for d, n in zip(diagonals, self.counts, strict=True)]
        if centered:
            variances = [v - m * m for v, m in zip(variances, self.means, strict=True)]
        self.units = tuple(v.mean().clamp_min(0) for v in variances)
        self.directions = _directions(stats, self.counts, both_ways)
        tested = {test for _, test in self.directions}  # a half that only fits never needs its tr(W C W^T)
        self.totals = tuple(self._total(h, gram_w) if h in tested else None for h in (0, 1))

    @classmethod
    def of(cls, stats: BlockStatistics, w: torch.Tensor, gram_w: WeightGramRows, centered: bool,
           dtype: torch.dtype, both_ways: bool | None = None) -> HeldOutHalves | None:
        """The halves of ``stats``, or ``None`` where one is empty or some rows have no fold (as
        :meth:`BlockStatistics.has_halves`). ``both_ways``: validate in both directions (``True``) or once
        (``False``) whatever the rows per column (default: :func:`_directions`' rule)."""
        return cls(stats, w, gram_w, centered, dtype, both_ways) if stats.has_halves() else None

    def _raw(self, half: int, rows: slice | torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (and, with ``cols``, columns) of half ``half``'s Gram sums in the validation's precision."""
        def gather(matrix: torch.Tensor) -> torch.Tensor:
            picked = matrix[rows] if cols is None else _submatrix(matrix, rows, cols)
            return picked.to(self.dtype)

        first = gather(self.stats.fold_gram)
        return first if half == 0 else gather(self.stats.gram) - first

    def _centred(self, half: int, raw: torch.Tensor, rows: slice | torch.Tensor,
                 cols: torch.Tensor | None = None) -> torch.Tensor:
        """``raw / n`` less the mean's outer product where the re-fit has a bias (a new tensor: ``raw`` may be the
        sums themselves)."""
        moment = raw / max(self.counts[half], 1.0)
        if self.centered:
            mean = self.means[half]
            moment -= torch.outer(mean[rows], mean if cols is None else mean[cols])
        return moment

    def _total(self, half: int, gram_w: WeightGramRows) -> torch.Tensor:
        """``tr(W C W^T) = sum(C * W^T W)`` over this half, a block of rows of ``C`` at a time."""
        parts = []
        for start in range(0, self.stats.width, _ROWS):
            rows = slice(start, start + _ROWS)
            block = gram_w(rows) if callable(gram_w) else gram_w[rows]
            parts.append(self._centred(half, self._raw(half, rows), rows).mul_(block.to(self.dtype)).sum())
        return torch.stack(parts).sum()

    def fold(self, half: int, cols: torch.Tensor) -> Fold:
        """What the cross-validation needs of half ``half`` for the kept columns ``cols``: ``C[S, :] W^T`` and
        ``C[S, S]``, from :data:`_ROWS` of ``C``'s rows at a time (a k x width gather of float64 sums, its cast and
        centring would be several width^2 / 2 matrices at once)."""
        k, device = len(cols), self.w.device
        cov_w = torch.empty(k, self.w.shape[0], dtype=self.dtype, device=device)
        cov_ss = torch.empty(k, k, dtype=self.dtype, device=device)
        for start in range(0, k, _ROWS):
            part = cols[start : start + _ROWS]
            rows = self._centred(half, self._raw(half, part), part)
            torch.mm(rows, self.w.T, out=cov_w[start : start + _ROWS])
            torch.index_select(rows, 1, cols, out=cov_ss[start : start + _ROWS])
        return Fold(self.means[half], self.counts[half], cov_w, cov_ss, self.totals[half], self.units[half])


def _directions(stats: BlockStatistics, counts: tuple[float, float],
                both_ways: bool | None = None) -> tuple[tuple[int, int], ...]:
    """The ``(fit, test)`` halves :func:`validate_refit` validates on: both ways below
    :data:`ONE_WAY_ROWS_PER_COLUMN` rows per column, else once, fitting on the larger half (the first on a tie)."""
    if both_ways if both_ways is not None else not well_posed(stats, ONE_WAY_ROWS_PER_COLUMN):
        return ((0, 1), (1, 0))
    return ((0, 1),) if counts[0] >= counts[1] else ((1, 0),)


def validate_refit(
    stats: BlockStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: torch.Tensor,
    group_size: int,
    ridges: tuple[float, ...] = REFIT_RIDGES,
    weight_gram: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    halves: HeldOutHalves | None = None,
    plain: float | None = None,
) -> RefitChoice:
    """Choose the re-fit ridge on the two halves of the calibration statistics.

    Fit on one half, measure the residual on the other: both ways (2-fold cross-validation) below
    :data:`ONE_WAY_ROWS_PER_COLUMN` rows per column, once from there (fit on the larger half; the test half's
    residual scaled by ``n / n_test`` to compare with no re-fit on all the data); a ridge is kept only if its
    held-out residual is below that of no re-fit. On fold ``f`` the ridge is scaled by ``n / n_f`` so that the
    value chosen applies to the whole set (a fixed prior weighs more against fewer tokens). Small calibration sets
    (fewer tokens than columns) make the plain least-squares re-fit interpolate the calibration tokens: its
    training residual is then ~0 while held-out outputs are destroyed; this is the guard. Each direction costs
    one eigendecomposition of the kept covariance; every further ridge costs O(k^2).

    ``dtype``: the precision of the validation (default: the statistics'), with the values of a validation of
    ``stats.to(dtype=dtype)`` but without that copy of the sums (``weight_gram``, if given, is in ``dtype``).
    ``halves``: the :class:`HeldOutHalves` of ``stats`` for this weight, bias and precision, where the caller
    validates the block more than once (the parts every support shares are then formed once). ``plain``: the
    residual of ``groups`` without re-fit on all the data, where the caller has it (a selection's
    :attr:`SelectionResult.residual`); with both, ``W^T W`` is neither read nor formed.
    """
    dtype = stats.dtype if dtype is None else dtype
    cols = group_columns(groups, group_size, stats.gram.device)
    w = weight.detach().to(device=stats.gram.device, dtype=dtype)
    centered = bias is not None
    if plain is None or halves is None:  # both read W^T W (tr(W C W^T) = sum(C * W^T W)); the folds' scores do not
        gram_w = _weight_gram(w) if weight_gram is None else weight_gram
        if plain is None:
            plain = _plain_residual(stats, gram_w, cols, dtype)
        if halves is None:
            halves = HeldOutHalves.of(stats, w, gram_w, centered, dtype)
        del gram_w  # one formed here goes back before the folds
    if halves is None:
        return RefitChoice(None, plain, plain, validated=False)
    n = stats.rows
    folds = {half: halves.fold(half, cols) for half in sorted({h for pair in halves.directions for h in pair})}
    scores = dict.fromkeys(ridges, 0.0)
    single = ridges[0] if len(ridges) == 1 and not math.isinf(ridges[0]) else None
    for fit, test in ((folds[a], folds[b]) for a, b in halves.directions):
        # one finite ridge: a Cholesky solve per fold, not an eigendecomposition (validated_selection's second
        # validation); where it fails, the eigendecomposition as for a grid
        one = None if single is None else fold_score(fit, test, w, centered, cols, single, n / fit.count)
        if one is not None:
            scores[single] += one
            continue
        for ridge, value in fold_scores(fit, test, w, centered, cols, ridges, n / fit.count).items():
            scores[ridge] += value
    tested = sum(folds[b].count for _, b in halves.directions)
    if tested != n:  # one way: the residual on the test half, scaled to all n tokens to compare with ``plain``
        scores = {ridge: value * n / tested for ridge, value in scores.items()}
    best = min(scores, key=lambda r: scores[r])  # ties: the first (smallest) ridge of the grid
    if scores[best] < plain:
        return RefitChoice(best, scores[best], plain, scores)
    return RefitChoice(None, plain, plain, scores)


def _plain_residual(stats: BlockStatistics, gram_w: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> float:
    """``sum_b ||W_D H_{b,D}||^2`` on all the data (``D``: the columns not in ``cols``), in ``dtype``: the residual
    of no re-fit, which fits nothing, so it is also its held-out residual."""
    dropped = torch.ones(stats.width, dtype=torch.bool, device=gram_w.device)
    dropped[cols] = False
    rest = torch.nonzero(dropped).flatten()
    parts = []  # a block of rows at a time: no |D|^2 gather of the sums (and its cast) at once
    for start in range(0, len(rest), _ROWS):
        rows = rest[start : start + _ROWS]
        parts.append((_submatrix(stats.gram, rows, rest).to(dtype) * _submatrix(gram_w, rows, rest)).sum())
    return max(float(torch.stack(parts).sum()), 0.0) if parts else 0.0


Phase = Callable[[str, Callable[[], Any]], Any]


def _run(name: str, step: Callable[[], Any]) -> Any:
    return step()


def validated_selection(
    stats: BlockStatistics,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    select: Callable[[str, float | None, bool, torch.Tensor | None, float | None], SelectionResult],
    *,
    threshold: str,
    refit_threshold: bool,
    refit: bool,
    ridges: tuple[float, ...] = REFIT_RIDGES,
    phase: Phase = _run,
    validation_dtype: torch.dtype | None = None,
    release_folds: bool = False,
) -> tuple[SelectionResult, RefitChoice]:
    """Selection and re-fit ridge chosen on held-out halves of the calibration data (the pruner's default path).

    ``select(threshold, damping, anchored, weight_gram, output_energy)`` runs one selection of the block
    (``damping=None``: the caller's; ``weight_gram`` and ``output_energy`` as in :func:`select_groups`). With the
    re-fit-aware threshold (``refit_threshold``), the ridge is first validated on the support of the exact-residual
    threshold (which needs no ridge); the re-fit threshold then runs with that ridge. From
    :data:`TRUSTED_SUPPORT_ROWS_PER_COLUMN` tokens per column, with ``refit``, its support is kept with that ridge
    (``support_validated`` False); otherwise it is kept only if it does better on held-out data (with ``refit``,
    its re-fit's held-out residual at that ridge, the one its support was selected with: a second validation at
    one ridge, one Cholesky solve per fold instead of an eigendecomposition; without ``refit``, plain selection's
    residual, which needs no validation: the choice then has no ridge and no scores). Without ``refit_threshold``
    the support of ``threshold`` is validated alone. Where no re-fit beats plain selection on held-out data, or the
    halves are unavailable, the choice's ridge is ``None``.

    Measured on MiniLM-L6 polarity (FFN 0.5 / heads 0.75, mean KL to dense on the test set): keeping the better
    support on held-out data gave KL 0.0090 at 32 calibration sentences (0.2 tokens per FFN column), against 0.0103
    for always the re-fit threshold's support and 0.0109 for always the exact-residual one. From 128 sentences
    (2.2 tokens per FFN column) always the re-fit threshold's support with the first validation's ridge gave the
    same KL as the second validation (0.00655 at 128, 0.00593 at 256, 0.00556 vs 0.00558 at 512) and saves about
    a quarter of the selection time where it applies. Validating the re-fit threshold's support at the first
    validation's ridge only, instead of over the whole grid, gave KL 0.01252 / 0.00905 / 0.00655 at 8 / 32 / 128
    sentences against 0.01243 / 0.00896 / 0.00655 (accuracy 77.1 / 77.2 / 78.9 against 77.1 / 77.0 / 78.9): near-
    equal supports flip, as the grid's eigenbasis scores differ from the re-fit's own residual by up to 3e-7.

    ``phase(name, step)`` runs every step (``weight_gram``, ``select_residual``, ``validate_1``, ``select_refit``,
    ``validate_2``) and returns its result: a benchmark times them through it. ``validation_dtype``: the
    precision of the validations (default: the statistics'; see :func:`selection_precision`). ``release_folds``:
    ``stats`` may free its fold sums once no validation is left (:meth:`BlockStatistics.release_folds`: on the
    trusted path, before the re-fit threshold forms its workspace), where the caller reads them no more.
    """
    # Where the elimination reads the energy from its factors (accelerators, groups of one column) and W is small
    # enough (_weight_gram_on_demand), W^T W is not formed: the elimination and the validation read the rows they
    # need from W (no width^2 matrix: 72 MB in float64 at BERT-base's FFN width).
    on_demand = group_size == 1 and _weight_gram_on_demand(weight, stats.gram)
    gram_w: torch.Tensor | None = phase("weight_gram", lambda: None if on_demand else weight_gram(weight, stats))
    dtype = stats.dtype if validation_dtype is None else validation_dtype
    # The re-fit threshold shares W^T W where the validations run in the selection's precision; otherwise no
    # width^2 matrix of the selection's precision outlives the first validation (the threshold forms its own
    # where it needs one, at the end, after its width^2 matrices are gone).
    selecting_gram_w = gram_w if gram_w is not None and dtype == gram_w.dtype else None
    shared: list[HeldOutHalves | None] = []  # the halves' support-independent parts, formed by the first validation

    def validate(selected: SelectionResult, grid: tuple[float, ...] = ridges) -> RefitChoice:
        # plain selection's residual is the selection's own (it fits nothing); W^T W is read once, by the halves
        nonlocal gram_w
        if not shared:
            w = weight.detach().to(device=stats.gram.device, dtype=dtype)
            if gram_w is None:  # rows of W^T W in the selection's precision, a block at a time
                selecting_w = _matching(weight, stats)
                shared.append(HeldOutHalves.of(stats, w, lambda rows: selecting_w[:, rows].T @ selecting_w,
                                               bias is not None, dtype))
                del selecting_w
            else:
                shared.append(HeldOutHalves.of(stats, w, gram_w, bias is not None, dtype))
            if selecting_gram_w is None:  # nothing else reads it: it goes back before the folds' scores
                gram_w = None
        if shared[0] is None:
            return RefitChoice(None, selected.residual, selected.residual, validated=False)
        return validate_refit(stats, weight, bias, selected.groups, group_size, grid, dtype=dtype,
                              halves=shared[0], plain=selected.residual)

    first = "residual" if refit_threshold else threshold
    result = phase("select_residual", lambda: select(first, None, False, gram_w, None))
    choice = phase("validate_1", lambda: validate(result))
    if refit_threshold and choice.ridge is not None and not math.isinf(choice.ridge):
        ridge = choice.ridge
        trusted = refit and well_posed(stats, TRUSTED_SUPPORT_ROWS_PER_COLUMN)
        if trusted and release_folds:  # no second validation on this path: the fold sums' width^2 matrix goes back
            shared.clear()
            stats.release_folds()
        other = phase("select_refit", lambda: select("refit", ridge, True, selecting_gram_w, result.output_energy))
        if torch.equal(other.groups, result.groups):  # the same support validates the same way
            return dataclasses.replace(result, refit=other.refit), choice  # and its re-fit is at hand
        if not refit:  # plain selection's residual decides, and it needs no held-out halves
            plain = other.residual
            return (other, RefitChoice(None, plain, plain)) if plain <= choice.plain else (result, choice)
        if trusted:  # too many tokens to overfit
            return other, dataclasses.replace(choice, support_validated=False)
        # at the ridge its support was selected with: one Cholesky solve per fold, not an eigendecomposition
        other_choice = phase("validate_2", lambda: validate(other, (ridge,)))
        if other_choice.ridge is not None and other_choice.heldout <= choice.heldout:
            result, choice = other, other_choice
    return result, choice
