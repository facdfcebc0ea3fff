"""Calibration across processes: each process reads its shard, statistics are summed through accelerate.

Under ``accelerate launch`` (or ``torchrun``) with N processes, :func:`shard_calibration_data` gives each process
whole batches of the single-process batching (batch ``i`` goes to process ``i % N``; with
``PrunerConfig.group_by_length``, of the batches regrouped by length), with no sample duplicated
or dropped: accelerate's default ``even_batches=True`` pads the last round by repeating samples, which would
change the statistics, so it is turned off here. :class:`~hf_ispasp.ISpaSPPruner` sums the statistics
(count, column sums, Gram) across processes with ``Accelerator.reduce`` before every selection, so all
processes select the same groups as one process on the whole data. Keeping the batch composition equal to
the single-process run also keeps every per-batch product bit-identical (with the same number of threads:
float32 CPU kernels round differently with another thread count); only the order of the float64 sums across
processes differs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from torch.utils.data import DataLoader

from .config import PrunerConfig
from .packing import group_by_length
from .statistics import CalibrationError, calibration_batches

__all__ = ["destroy_process_group", "num_processes", "shard_calibration_data"]

logger = logging.getLogger(__name__)


def num_processes(accelerator: Any = None) -> int:
    """Number of processes of ``accelerator`` (or of accelerate's ``PartialState`` when none is given)."""
    if accelerator is not None:
        return int(getattr(accelerator, "num_processes", 1))
    from accelerate import PartialState

    return int(PartialState().num_processes)


def _collate(pad_token_id: int) -> Any:
    """Pad a list of tokenized examples the way the pruner pads a ``datasets.Dataset``."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return next(iter(calibration_batches(rows, len(rows), None, pad_token_id)))

    return collate


def _only(items: list[Any]) -> Any:
    """Collate a 'batch' of one ready-made batch: the batch itself."""
    return items[0]


def shard_calibration_data(
    data: Any,
    accelerator: Any = None,
    config: PrunerConfig | None = None,
    pad_token_id: int = 0,
) -> Iterable[Any]:
    """This process's share of the calibration data: whole batches, none repeated, none dropped.

    The cap ``config.max_calibration_samples`` is applied to the whole data *before* sharding, so N processes
    see the same samples as one process (the pruner's own cap then never binds).

    Args:
        data: A ``DataLoader`` (its batches are distributed as they are) or a tokenized ``datasets.Dataset`` /
            list of examples (batched with ``config.calibration_batch_size`` and padded on the right).
        accelerator: An ``accelerate.Accelerator`` (default: accelerate's ``PartialState``); with one process
            the data is returned unchanged.
        config: The pruner settings (batch size and sample cap).
        pad_token_id: Padding value of ``input_ids`` when ``data`` is a dataset.

    Returns:
        An iterable of batches to pass to ``ISpaSPPruner(model, config, accelerator).prune``.
    """
    config = config or PrunerConfig()
    from accelerate import PartialState
    from accelerate.data_loader import prepare_data_loader

    state = PartialState()
    world = num_processes(accelerator)
    index = int(getattr(accelerator, "process_index", state.process_index))
    if isinstance(data, DataLoader):
        loader = data
        if config.max_calibration_samples is not None:
            logger.warning(
                "max_calibration_samples=%s is applied per process to a sharded DataLoader; cap the DataLoader "
                "itself (or pass a Dataset) to calibrate on the same samples as one process",
                config.max_calibration_samples,
            )
    else:
        if data is None or len(data) == 0:
            raise CalibrationError("the calibration data is empty: pass at least one example per process")
        if config.max_calibration_samples is not None and len(data) > config.max_calibration_samples:
            data = data.select(range(config.max_calibration_samples)) if hasattr(data, "select") else (
                data[: config.max_calibration_samples]
            )
        loader = DataLoader(data, batch_size=config.calibration_batch_size, collate_fn=_collate(pad_token_id))
    if world <= 1:
        return loader
    if config.group_by_length:
        # Sorted by length before sharding (the pruner's own regrouping, done once for all processes): each
        # process then holds every N-th of the batches one process would prune, already sorted, which its
        # pruner leaves as they are, so per-batch products stay bit-identical to the single-process run.
        grouped = group_by_length(loader, pad_token_id)
        if isinstance(grouped, list):  # token batches (otherwise the loader is sharded as it is)
            loader = DataLoader(grouped, batch_size=1, collate_fn=_only)
    try:
        num_batches = len(loader)
    except TypeError:
        num_batches = None
    if num_batches is not None and num_batches < world:
        raise CalibrationError(
            f"the calibration data has {num_batches} batch(es) for {world} processes: every process needs at "
            "least one batch; use more samples or a smaller calibration batch size"
        )
    return prepare_data_loader(
        loader, num_processes=world, process_index=index, put_on_device=False, even_batches=False,
        split_batches=False,
    )


def destroy_process_group() -> None:
    """Tear down torch.distributed at the end of a script (gloo workers abort at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
