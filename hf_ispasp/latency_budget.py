"""Latency targets: what a block's width costs in measured time on the current device.

A layer is timed on its own input from the reference forward (``adapter.example_inputs()``), dense and with
one block at a time cut to each width of a grid (its first groups; which groups does not change the time), the
two interleaved (:func:`hf_ispasp.metrics.latency_ratio`, median of the pairs). The layer's time is then modelled
as the dense time plus every block's own change, interpolated between the grid widths; the model's time as the
measured dense forward minus the dense layers plus the modelled ones.

The grid and the allocation use widths that run fast on the device: multiples of :func:`fast_multiple` neurons
or channels (kernels tile by 8 on CPUs and by 64 on GPUs' tensor cores). Tables are measured once per layer
shape, input shape, dtype and device and cached in the process and on disk (``$HF_ISPASP_CACHE/latency``,
default ``~/.cache/hf_ispasp/latency``), so identical layers (every layer of most transformers) share one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters.base import adapter_for
from .atomic import _write_json_atomic
from .budget import _layer_paths, capture_layer_calls, cut_layer, reference_inputs
from .metrics import latency_ratio, measure_latency

__all__ = ["LatencyCosts", "fast_multiple", "latency_costs"]

logger = logging.getLogger(__name__)

_TABLES: dict[str, dict[str, list[list[float]]]] = {}  # signature -> block position -> [[width, seconds], ...]


def fast_multiple(device: torch.device | str) -> int:
    """Neurons / channels per kernel tile on ``device``: widths that are multiples of it waste no lanes."""
    return 64 if torch.device(device).type == "cuda" else 8


@dataclass
class _LayerTable:
    names: list[str]
    dense_seconds: float
    curves: list[tuple[list[int], list[float]]]  # per block: widths and the layer's seconds at that width

    def value(self, widths: Mapping[str, int]) -> float:
        total = self.dense_seconds
        for name, (counts, seconds) in zip(self.names, self.curves, strict=True):
            if name in widths:
                total += float(np.interp(widths[name], counts, seconds)) - self.dense_seconds
        return total


@dataclass
class LatencyCosts:
    """Measured seconds of the model at the reference input as a function of the kept groups (a ``Pricing``)."""

    dense: float
    layers: list[_LayerTable]
    num_groups: dict[str, int]

    def __post_init__(self) -> None:
        self._layer_of = {name: layer for layer in self.layers for name in layer.names}
        self._fixed = self.dense - sum(layer.dense_seconds for layer in self.layers)

    def total(self, widths: Mapping[str, int]) -> float:
        return self._fixed + sum(layer.value(widths) for layer in self.layers)

    def change(self, widths: Mapping[str, int], name: str, new: int) -> float:
        layer = self._layer_of.get(name)
        return 0.0 if layer is None else layer.value({**widths, name: new}) - layer.value(widths)

    def partners(self, name: str) -> Sequence[str]:
        return ()  # the model is additive over a layer's blocks


def _grid(num_groups: int, floor: int, step: int, points: int) -> list[int]:
    """About ``points`` widths from ``floor`` to ``num_groups``, multiples of ``step`` (and both ends)."""
    raw = np.linspace(floor, num_groups, max(points, 2))
    return sorted({floor, num_groups, *(max(floor, int(round(x / step)) * step) for x in raw if x < num_groups)})


def _signature(layer: nn.Module, args: tuple, kwargs: dict[str, Any], device: torch.device, extra: str) -> str:
    def shapes(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return [list(value.shape), str(value.dtype)]
        if isinstance(value, (tuple, list)):
            return [shapes(v) for v in value]
        if isinstance(value, dict):
            return {k: shapes(v) for k, v in sorted(value.items())}
        return type(value).__name__
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    text = json.dumps([type(layer).__qualname__, [(n, list(p.shape), str(p.dtype)) for n, p in
                      layer.named_parameters()], shapes(args), shapes(kwargs), device.type, device_name,
                      torch.__version__, torch.get_num_threads(), extra], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cache_dir() -> Path:
    root = os.environ.get("HF_ISPASP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_ispasp")
    return Path(root) / "latency"


@torch.no_grad()
def latency_costs(
    model: nn.Module, inputs: Any = None, options: Any = None, *, round_to: int = 1, points: int = 6,
    repeats: int = 8, clock: Callable[[], float] = time.perf_counter, cache_dir: str | os.PathLike | None = None,
) -> LatencyCosts:
    """Time the model and a table per layer shape (see the module doc); ``clock`` is injectable for tests.

    ``round_to``: FFN widths are multiples of ``max(round_to, fast_multiple(device))``; ``cache_dir``: where
    tables persist (``None``: the default cache; ``""``: in the process only).
    """
    adapter = adapter_for(model)
    if options is not None:
        adapter.configure(options)
    device = next(model.parameters()).device
    inputs = reference_inputs(model, adapter, inputs)
    model.eval()
    dense = measure_latency(model, inputs, repeats=repeats, clock=clock)
    calls = capture_layer_calls(model, adapter, inputs)
    layers, paths = list(adapter.layers()), _layer_paths(model, adapter)
    folder = None if cache_dir == "" else Path(cache_dir) if cache_dir is not None else _cache_dir()
    multiple = fast_multiple(device)
    tables, num_groups = [], {}
    for index, (layer, path) in enumerate(zip(layers, paths, strict=True)):
        args, kwargs = calls[index]
        blocks = adapter.blocks(index)
        num_groups.update({block.name: block.num_groups for block in blocks})
        steps = [block.partitions * (max(round_to, multiple) if block.kind == "ffn" else 1) for block in blocks]
        extra = json.dumps([[b.num_groups, b.partitions, s] for b, s in zip(blocks, steps, strict=True)] + [points])
        key = _signature(layer, args, kwargs, device, extra)
        table = _TABLES.get(key) or _read(folder, key)
        if table is None:
            table = _measure(model, adapter, index, path, layer, args, kwargs, blocks, steps, points, repeats,
                             clock)
            _write(folder, key, table)
        _TABLES[key] = table
        curves = [([int(w) for w, _ in table[str(p)]], [float(s) for _, s in table[str(p)]])
                  for p in range(len(blocks))]
        tables.append(_LayerTable([b.name for b in blocks], float(table["dense"][0][1]), curves))
    return LatencyCosts(dense, tables, num_groups)


def _measure(model: nn.Module, adapter: Any, index: int, path: str, layer: nn.Module, args: tuple,
             kwargs: dict[str, Any], blocks: list[Any], steps: list[int], points: int, repeats: int,
             clock: Callable[[], float]) -> dict[str, list[list[float]]]:
    def run(module: nn.Module) -> Callable[[], Any]:
        return lambda: module(*args, **kwargs)

    dense = measure_latency(run(layer), (), repeats=repeats, clock=clock)
    table: dict[str, list[list[float]]] = {"dense": [[0, dense]]}
    for position, (block, step) in enumerate(zip(blocks, steps, strict=True)):
        rows = []
        for width in _grid(block.num_groups, block.partitions, step, points):
            if width == block.num_groups:
                rows.append([width, dense])
                continue
            candidate = cut_layer(model, adapter, index, path, {position: width})
            comparison = latency_ratio(run(layer), run(candidate), (), repeats=repeats, rounds=1, warmup=1,
                                       clock=clock)
            rows.append([width, dense / max(comparison.speedup, 1e-12)])
        table[str(position)] = rows
    return table


def _read(folder: Path | None, key: str) -> dict[str, list[list[float]]] | None:
    if folder is None or not (folder / f"{key}.json").is_file():
        return None
    try:
        return json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(folder: Path | None, key: str, table: dict[str, list[list[float]]]) -> None:
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(str(folder / f"{key}.json"), table)
    except OSError as err:  # a read-only home must not stop a prune
        logger.warning("hf_ispasp: latency table not cached in %s: %s", folder, err)
