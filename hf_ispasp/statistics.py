"""Streaming calibration: batching, the layer-input cache and the hooks that accumulate block statistics."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .adapters.base import ModelAdapter, PrunableBlock, Resume
from .algorithm import BlockStatistics, accumulation_dtype, all_finite

__all__ = ["ActivationCache", "CalibrationError", "calibration_batches", "collect_block_statistics", "hidden_energy",
           "sequence_folds"]

logger = logging.getLogger(__name__)

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")


class CalibrationError(ValueError):
    """The calibration data cannot be used (empty, malformed, or producing non-finite activations)."""


class _StopForward(Exception):
    """Raised by a hook once it has what it needs, so the rest of the layer is not computed."""


def _pad(rows: list[Any], value: int) -> torch.Tensor:
    tensors = [torch.as_tensor(r) for r in rows]
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    length = max(t.shape[0] for t in tensors)
    out = torch.full((len(tensors), length, *tensors[0].shape[1:]), value, dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out


def _dataset_batches(dataset: Any, batch_size: int, pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a (tokenized) ``datasets.Dataset`` or a list of dict examples, padded on the right."""
    columns = [c for c in _MODEL_INPUTS if c in getattr(dataset, "column_names", dataset[0].keys())]
    if not columns:
        names = getattr(dataset, "column_names", sorted(dataset[0].keys()))
        raise CalibrationError(
            f"the calibration dataset has no model input columns (found {names}); tokenize it first, e.g. "
            "dataset.map(lambda x: tokenizer(x['text'], truncation=True), batched=True)"
        )
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {}
        for column in columns:
            batch[column] = _pad([r[column] for r in rows], pad_token_id if column == "input_ids" else 0)
        if "input_ids" in batch and "attention_mask" not in batch:
            lengths = [len(r["input_ids"]) for r in rows]
            positions = torch.arange(batch["input_ids"].shape[1])[None]
            batch["attention_mask"] = (positions < torch.tensor(lengths)[:, None]).long()
        yield batch


def _truncate(batch: Any, keep: int) -> Any:
    if isinstance(batch, Mapping):
        return {k: (v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch[:keep]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_truncate(b, keep) for b in batch)
    return batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
            if isinstance(value, (list, tuple)):
                return len(value)
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    return 1


def calibration_batches(
    data: Iterable[Any], batch_size: int, max_samples: int | None, pad_token_id: int = 0
) -> Iterator[Any]:
    """Batches from a DataLoader / iterable of batches, or from an indexable dataset of examples."""
    if data is None:
        raise CalibrationError("calibration data is None; pass a DataLoader, an iterable of batches or a Dataset")
    is_dataset = hasattr(data, "column_names") or (
        isinstance(data, (list, tuple)) and len(data) > 0 and isinstance(data[0], Mapping) and _is_example(data[0])
    )
    if isinstance(data, Mapping):
        raise CalibrationError(
            "calibration data is a single dict (one batch or one tokenized example); wrap it in a list: "
            "prune([batch])"
        )
    if isinstance(data, (str, bytes)):
        raise CalibrationError("calibration data is a string; tokenize it first and pass a list of batches")
    source = _dataset_batches(data, batch_size, pad_token_id) if is_dataset else _guarded(data)
    seen = 0
    for batch in source:
        if max_samples is not None and seen >= max_samples:
            break
        size = _batch_size(batch)
        if max_samples is not None and seen + size > max_samples:
            batch = _truncate(batch, max_samples - seen)
            size = max_samples - seen
        seen += size
        yield batch


def _guarded(data: Iterable[Any]) -> Iterator[Any]:
    """Iterate a user's loader; torch's default collate on unpadded token lists gets a hint instead of a raw error."""
    try:
        iterator = iter(data)
    except TypeError:
        raise CalibrationError(
            f"calibration data of type {type(data).__name__} is not iterable; pass a DataLoader, a list of dict "
            "batches or a tokenized datasets.Dataset"
        ) from None
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as err:
            if "equal size" not in str(err) and "stack expects" not in str(err):
                raise
            raise CalibrationError(
                f"the calibration DataLoader could not batch its examples ({err}); sequences of different lengths "
                "need padding: DataLoader(dataset, collate_fn=DataCollatorWithPadding(tokenizer)), or pass the "
                "tokenized Dataset itself"
            ) from None
        yield batch


def _is_example(row: Mapping) -> bool:
    """A single example (1-D token ids) rather than a batch (2-D)."""
    ids = row.get("input_ids")
    if ids is None:
        return False
    if isinstance(ids, (list, tuple)):  # ragged rows cannot become a tensor, but they are still a batch
        return not (ids and isinstance(ids[0], (list, tuple, torch.Tensor, np.ndarray)))
    return torch.as_tensor(ids).dim() == 1


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """``fn`` applied to every tensor inside nested dicts / lists / tuples (layer args and kwargs, cache entries)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple takes its fields positionally
        return type(value)(*(_map_tensors(fn, v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(fn, v) for v in value)
    return value


def _nbytes(value: Any) -> int:
    total = 0

    def count(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    _map_tensors(count, value)
    return total


def _pinned(value: Any) -> Any:
    """A CPU copy of every tensor, page-locked so that the copy back to the accelerator is fast."""
    return _map_tensors(lambda t: t.detach().to("cpu").pin_memory(), value)


def _available_host_bytes() -> int:
    """Memory the OS can still give this process (``MemAvailable``; the physical size where that is unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 33


def _free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return _available_host_bytes()
    return 0  # unknown accelerator: do not hold the cache there


class ActivationCache:
    """Layer inputs of every calibration batch while the prune walks the layers: in device memory, then pinned
    CPU memory, then disk.

    ``mode="auto"`` places each entry in the first tier with room: the device (up to ``DEVICE_SHARE`` of the
    memory free when the prune starts, leaving the rest for the layer and its statistics), then page-locked CPU
    memory (up to ``HOST_SHARE`` of the available host memory; only for an accelerator), then files in a
    temporary folder that is removed at :meth:`close`. ``"device"``, ``"cpu"`` and ``"disk"`` force a tier
    (``"memory"`` is the former name of ``"device"``). The first entry of each tier is logged.
    """

    DEVICE_SHARE = 0.5
    HOST_SHARE = 0.5
    TIERS = ("device", "cpu", "disk")

    def __init__(self, mode: str = "auto", device: torch.device | str = "cpu") -> None:
        mode = "device" if mode == "memory" else mode
        if mode not in ("auto", *self.TIERS):
            raise ValueError(f"activation_cache must be one of auto, device, cpu, disk (or memory), got {mode!r}")
        self.mode = mode
        self.device = torch.device(device)
        accelerator = self.device.type != "cpu"
        if mode == "auto":
            self._budget = {
                "device": int(self.DEVICE_SHARE * _free_device_bytes(self.device)),
                "cpu": int(self.HOST_SHARE * _available_host_bytes()) if accelerator else 0,
                "disk": None,
            }
        else:
            self._budget = {tier: (None if tier == mode else 0) for tier in self.TIERS}
        self._used = dict.fromkeys(self.TIERS, 0)
        self._items: list[tuple[str, Any, int]] = []
        self._dir: str | None = None
        self._logged: set[str] = set()

    def __len__(self) -> int:
        return len(self._items)

    def append(self, entry: dict[str, Any]) -> None:
        self._items.append(("device", None, 0))
        self[len(self._items) - 1] = entry

    def _tier(self, size: int) -> str:
        for tier in self.TIERS:
            budget = self._budget[tier]
            if budget is None or self._used[tier] + size <= budget:
                return tier
        return "disk"

    def __setitem__(self, index: int, entry: dict[str, Any]) -> None:
        old_tier, old_payload, old_size = self._items[index]
        self._used[old_tier] -= old_size
        if old_tier == "disk" and isinstance(old_payload, str):
            os.remove(old_payload)
        size = _nbytes(entry)
        tier = self._tier(size)
        if tier == "device":
            payload: Any = entry
        elif tier == "cpu":
            payload = _pinned(entry) if self.device.type != "cpu" else to_device(entry, "cpu")
        else:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="hf_ispasp_cache_")
            payload = os.path.join(self._dir, f"{index}.pt")
            torch.save(to_device(entry, "cpu"), payload)
        self._used[tier] += size
        self._items[index] = (tier, payload, size)
        if tier not in self._logged:
            self._logged.add(tier)
            where = {"device": f"{self.device} memory", "cpu": "pinned CPU memory", "disk": f"disk ({self._dir})"}
            logger.info("i-SpaSP: activation cache (%s) holds calibration batches in %s from batch %d on",
                        self.mode, where[tier], index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tier, payload, _ = self._items[index]
        if tier == "disk":
            return torch.load(payload, weights_only=False)  # our own temporary file
        return payload

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]

    def summary(self) -> dict[str, int]:
        """Bytes held per tier now."""
        return dict(self._used)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._items = []
        self._used = dict.fromkeys(self.TIERS, 0)


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested dicts / lists / tuples (layer args and kwargs) to ``device``."""
    return _map_tensors(lambda t: t.detach().to(device), value)


def sequence_folds(args: tuple, kwargs: dict[str, Any], mask: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    """Fold (0 or 1) of every sequence of a batch, from a hash of its own content (padding removed).

    The re-fit is validated on two halves of the calibration data. Hashing each sequence's token ids (or pixel
    values) with the seed puts it in the same half whatever batch it is in, however the data is sharded across
    processes and whatever the padding, so one and N processes validate on the same halves; duplicated
    sequences land in the same half and cannot leak into the held-out one.
    """
    source = next((kwargs[k] for k in ("input_ids", "pixel_values", "inputs_embeds") if k in kwargs), None)
    if source is None:
        source = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if source is None:
        raise CalibrationError("cannot identify the calibration sequences (no input_ids / pixel_values)")
    source = source.detach().cpu()
    source = source.to(torch.int64) if not source.is_floating_point() else source.to(torch.float32)
    mask = mask.detach().cpu() if mask is not None else None
    key = int(seed).to_bytes(8, "little", signed=True)
    folds = []
    for i in range(source.shape[0]):
        row = source[i]
        if mask is not None and row.dim() >= 1 and row.shape[0] == mask.shape[1]:
            row = row[mask[i]]
        digest = hashlib.blake2b(row.contiguous().numpy().tobytes(), digest_size=8, key=key).digest()
        folds.append(digest[0] & 1)
    return torch.tensor(folds, dtype=torch.int8)


def capture_layer_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: Iterable[Any],
    cache: ActivationCache,
    device: torch.device,
    seed: int = 0,
) -> int:
    """Run the model up to its first layer on every batch and cache that layer's inputs; returns tokens seen.

    Each entry also records the validation fold of every sequence (:func:`sequence_folds`, seeded by ``seed``).
    """
    first = adapter.layers()[0]
    captured: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    tokens = 0
    try:
        for batch in batches:
            args, kwargs, mask = adapter.prepare_batch(batch, device)
            captured.clear()
            try:
                model(*args, **kwargs)
            except _StopForward:
                pass
            if not captured:
                raise CalibrationError(f"the model never reached its first prunable layer ({type(first).__name__})")
            hidden = adapter.layer_hidden_states(captured["args"], captured["kwargs"])
            if not all_finite(hidden):
                raise CalibrationError("the embeddings of a calibration batch are not finite (NaN/inf)")
            tokens += int(mask.sum()) if mask is not None else math.prod(hidden.shape[:-1])
            folds = sequence_folds(args, kwargs, mask, seed)
            cache.append({"args": captured["args"], "kwargs": captured["kwargs"], "mask": mask, "folds": folds,
                          "plan": _fold_plan(folds, mask)})
    finally:
        handle.remove()
    if len(cache) == 0:
        raise CalibrationError(
            "the calibration data is empty: pass at least one batch (e.g. a DataLoader over a few hundred examples)"
        )
    return tokens


class _FoldRows(NamedTuple):
    """The part of a batch in one validation fold: its sequences, and with a token mask, the mask of its real
    tokens (batch x sequence) and their flat row indices (a tuple, so the cache moves it with the entry)."""

    fold: int
    sequences: torch.Tensor
    mask: torch.Tensor | None
    index: torch.Tensor | None


def _fold_plan(folds: torch.Tensor, mask: torch.Tensor | None) -> list[_FoldRows]:
    """The folds present in a batch, computed once when the batch is captured.

    The statistics hooks then take every later layer's rows with precomputed indices: no data-dependent shapes,
    hence no device-to-host synchronisation per block.
    """
    plan = []
    device = mask.device if mask is not None else torch.device("cpu")
    for fold in (0, 1):
        chosen = (folds == fold).cpu()
        if not bool(chosen.any()):
            continue
        fold_mask = index = None
        if mask is not None:
            fold_mask = mask.bool() & chosen.to(mask.device)[:, None]
            index = torch.nonzero(fold_mask.flatten()).flatten()
        plan.append(_FoldRows(fold, torch.nonzero(chosen).flatten().to(device), fold_mask, index))
    return plan


# Rows per fold multiplied at once on a CPU (BlockStatistics.deferred_rows): 1.45x faster sums than one product per
# batch and fold at width 1536 (370-row batches; 1024 rows: 1.3x, 4096: no faster), 12 MB per fold at that width.
DEFERRED_ROWS = 2048


def skip_entry_input(
    adapter: ModelAdapter, skip: tuple[Resume, torch.Tensor], start: torch.Tensor, args: tuple,
    kwargs: dict[str, Any], device: torch.device,
) -> torch.Tensor:
    """The input of ``point.entry`` from ``start``, the captured input of the first block's ``down``, and the
    layer's input hidden states (``skip = (point, columns)``, see :class:`~hf_ispasp.adapters.base.Resume`)."""
    point, columns = skip
    return point.skip(start.to(device).index_select(-1, columns), adapter.layer_hidden_states(args, kwargs))


def collect_block_statistics(
    layer: nn.Module,
    adapter: ModelAdapter,
    block: PrunableBlock,
    cache: ActivationCache,
    device: torch.device,
    dtype: torch.dtype,
    progress: Any = None,
    resume: Resume | None = None,
    accumulate: torch.dtype | None = None,
    capture: bool = False,
    skip: tuple[Resume, torch.Tensor] | None = None,
) -> BlockStatistics:
    """One pass of ``layer`` over the cached inputs, stopping at ``block.down``: accumulate ``n, sum H, H^T H``.

    The sums stay on ``device`` (in ``accumulate``, by default :func:`accumulation_dtype`) and are kept per
    validation fold as well: the sequences of each fold are sliced out of the batch (dimension 0 of the block's
    input) before their rows are taken. A block whose input does not keep the batch in dimension 0 has its rows
    counted as unassigned (the re-fit then cannot be validated).

    ``resume`` (the layer's last block only): the input of ``resume.entry``, seen on the way to ``down``, replaces
    the layer input in the cache, so :func:`propagate` finishes the layer from there with ``resume.tail`` instead
    of running it whole a second time.

    ``capture`` (a layer's first block): the input of ``down`` is kept in each cache entry (``"skip_input"``);
    ``skip = (point, columns)`` (the layer's last block): entries holding it start from there, as
    ``point.tail(point.skip(input[..., columns], x))``, instead of running the layer from its start (see
    :class:`~hf_ispasp.adapters.base.Resume`).
    """
    down = adapter.current_down(block)
    width = down.weight.shape[1] if isinstance(down, nn.Linear) else None
    accumulate = accumulation_dtype(device) if accumulate is None else accumulate
    if skip is not None:
        skip = (skip[0], skip[1].to(device))  # once, not per batch
    state: dict[str, Any] = {}

    def add(rows: torch.Tensor, fold: int | None) -> None:
        if "stats" not in state:
            state["stats"] = BlockStatistics(width or rows.shape[-1], device=device, dtype=accumulate, panels=True,
                                             deferred_rows=DEFERRED_ROWS)
        state["stats"].update(rows, dtype, fold)

    def hook(module: nn.Module, args: tuple) -> None:
        hidden, mask, folds, plan = args[0], state["mask"], state["folds"], state["plan"]
        if capture:
            state["captured"] = hidden.detach()
        if folds is None or plan is None or hidden.dim() == 0 or hidden.shape[0] != folds.shape[0]:
            add(adapter.hidden_rows(block, hidden, mask), None)
            raise _StopForward
        token_major = mask is not None and hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(mask.shape)
        for part in plan:
            if token_major:  # the fold's tokens, by mask and by precomputed index, in the whole batch
                add(adapter.hidden_rows(block, hidden, part.mask, index=part.index), part.fold)
            else:  # the fold's sequences first (e.g. image feature maps), then the adapter's rows
                sequences = part.sequences.to(hidden.device)
                part_mask = mask.index_select(0, sequences.to(mask.device)) if mask is not None else None
                add(adapter.hidden_rows(block, hidden.index_select(0, sequences), part_mask), part.fold)
        raise _StopForward

    def entry_hook(module: nn.Module, args: tuple) -> None:
        state["entries"].append(args[0] if args else None)

    handles = [down.register_forward_pre_hook(hook)]
    if resume is not None:
        handles.append(resume.entry.register_forward_pre_hook(entry_hook))
    try:
        for index in range(len(cache)):
            entry = cache[index]
            state["mask"], state["folds"], state["entries"] = entry["mask"], entry.get("folds"), []
            state["plan"] = entry.get("plan")
            state["mask"] = state["mask"].to(device) if state["mask"] is not None else None
            start = entry.pop("skip_input", None)  # a captured input is used once, or dropped
            args, kwargs = to_device(entry["args"], device), to_device(entry["kwargs"], device)
            try:
                if skip is not None and start is not None:
                    skip[0].tail(skip_entry_input(adapter, skip, start, args, kwargs, device))
                else:
                    layer(*args, **kwargs)
            except _StopForward:
                pass
            if capture and "captured" in state:
                entry["skip_input"] = state.pop("captured")
                cache[index] = entry
            captured = state["entries"]
            # Resume only from exactly one call with a tensor (a chunked feed-forward calls its entry per chunk).
            if resume is not None and len(captured) == 1 and isinstance(captured[0], torch.Tensor):
                entry["args"], entry["kwargs"] = adapter.replace_hidden_states(
                    entry["args"], entry["kwargs"], captured[0].detach()
                )
                entry["resumed"] = True
                cache[index] = entry
            if progress is not None:
                progress.update(1)
    finally:
        for handle in handles:
            handle.remove()
    stats = state.get("stats")
    if stats is None:
        raise CalibrationError(f"{block.name}: the block was never executed on the calibration data")
    if not stats.is_finite():
        raise CalibrationError(
            f"{block.name}: activations contain NaN/inf on the calibration data; check the inputs and the model "
            "dtype (float16 on CPU overflows easily: load the model in float32 or bfloat16)"
        )
    return stats


def propagate(
    layer: nn.Module, adapter: ModelAdapter, cache: ActivationCache, device: torch.device,
    resume: Resume | None = None,
) -> None:
    """Replace every cached input by the output of ``layer`` (already pruned): the next layer's inputs.

    Entries marked ``resumed`` hold the input of ``resume.entry`` and only run ``resume.tail``. The outputs are
    checked for NaN/inf once the layer has run on every batch, in one host read (per batch, each read would be a
    synchronisation on an accelerator); a batch whose sum is not finite is then checked exactly.
    """
    sums = []
    for index in range(len(cache)):
        entry = cache[index]
        args, kwargs = to_device(entry["args"], device), to_device(entry["kwargs"], device)
        if entry.pop("resumed", False):
            if resume is None:
                raise RuntimeError("a cached entry was captured for resuming but no resume point was given")
            hidden = resume.tail(adapter.layer_hidden_states(args, kwargs))
        else:
            hidden = adapter.layer_output(layer(*args, **kwargs))
        sums.append(hidden.sum().to(device))
        entry["args"], entry["kwargs"] = adapter.replace_hidden_states(entry["args"], entry["kwargs"], hidden)
        cache[index] = entry
    if not sums:
        return
    finite = torch.isfinite(torch.stack(sums)).tolist()
    for index, ok in enumerate(finite):
        if not ok:
            entry = cache[index]
            hidden = adapter.layer_hidden_states(to_device(entry["args"], device), to_device(entry["kwargs"], device))
            if not all_finite(hidden):
                raise CalibrationError("a pruned layer produced NaN/inf on the calibration data")


def hidden_energy(adapter: ModelAdapter, cache: ActivationCache, device: torch.device) -> torch.Tensor:
    """``[sum of ||h||^2, positions]`` over the cached layer inputs, real tokens only (a CNN's positions are its
    pixels, ``h`` the channel vector), in float64 on ``device``: the scale of the hidden states a block adds to."""
    total = torch.zeros(2, dtype=accumulation_dtype(device), device=device)
    for index in range(len(cache)):
        entry = cache[index]
        args, kwargs = to_device(entry["args"], device), to_device(entry["kwargs"], device)
        hidden = adapter.layer_hidden_states(args, kwargs).to(total.dtype)
        squares = hidden.pow(2).sum(1) if hidden.dim() == 4 else hidden.pow(2).sum(-1)
        mask = entry["mask"]
        if mask is not None and tuple(mask.shape) == tuple(squares.shape):
            squares = squares[mask.to(device).bool()]
        total += torch.stack([squares.sum(), torch.tensor(float(squares.numel()), dtype=total.dtype, device=device)])
    return total
