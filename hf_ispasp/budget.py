"""Budgets stated as a cost target: what each block's groups cost, and the widths that meet a FLOPs/params target.

A layer's FLOPs and parameters are multilinear in its blocks' kept groups (linear per block; a conv between two
pruned widths costs their product; the hidden size is never pruned, so layers do not interact). Weight-free cuts
of one layer copy at a time, every block dense or halved, price every width exactly (:func:`block_costs`); the
error curves of the dense model's blocks come from one extra calibration pass (:func:`error_curves`); the
allocation itself is pure arithmetic (:mod:`hf_ispasp.allocation`). FLOPs are counted at the adapter's
reference input (``adapter.example_inputs()``: one sequence of 128 tokens for text models, one image at the
model's input size).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters.base import adapter_for
from .algorithm import ieee_float32, output_energy, residual_curve, selection_precision
from .allocation import BudgetBlock, Pricing, allocate
from .config import kept_count
from .metrics import _call, count_parameters, flop_counter
from .offload import execution_device, has_offload, materialized_copy
from .partitions import first_per_run
from .statistics import (
    ActivationCache,
    capture_layer_inputs,
    collect_block_statistics,
    hidden_energy,
    propagate,
    to_device,
)

__all__ = ["BlockCosts", "LayerPrice", "block_costs", "budget_blocks", "cut_copy", "cut_layer", "error_curves",
           "ffn_ratio_for_flops", "reference_inputs", "uniform_compaction", "widths_for_target"]

METRICS = ("flops", "params")

logger = logging.getLogger(__name__)


def ffn_ratio_for_flops(
    model: nn.Module, fraction: float, head_keep_ratio: float = 1.0, inputs: Any = None, tolerance: float = 0.005
) -> float:
    """Uniform ``ffn_keep_ratio`` whose compacted model costs about ``fraction`` of the dense FLOPs.

    Prices the widths with :func:`block_costs` (no data, no copy of the whole model) and bisects on the ratio.
    Heads, when the model has any, are kept at ``head_keep_ratio``. ``PrunerConfig(flops_keep_ratio=...)`` is
    the full form: it also chooses the heads and, by default, different widths per layer.

    Args:
        model: A supported model.
        fraction: Target FLOPs as a fraction of the dense model's, in (0, 1].
        head_keep_ratio: Keep ratio of attention heads held fixed while the FFN ratio is searched.
        inputs: Inputs for counting (default: the adapter's ``example_inputs()``).
        tolerance: Stop once the bracket on the ratio is this narrow.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    costs = block_costs(model, inputs)
    blocks = list(adapter_for(model).iter_blocks())

    def cost(ratio: float) -> float:
        widths = {b.name: kept_count(b.num_groups, ratio if b.kind == "ffn" else head_keep_ratio,
                                     partitions=b.partitions) for b in blocks}
        return costs.predict("flops", widths) / costs.dense["flops"]

    low, high = 0.0, 1.0
    if cost(1e-6) > fraction:
        logger.warning("even one group per block costs more than %.3f of the dense FLOPs", fraction)
        return 1e-6
    while high - low > tolerance:
        mid = (low + high) / 2
        if cost(mid) > fraction:
            high = mid
        else:
            low = mid
    return max(low, 1e-6)


def uniform_compaction(model: nn.Module, ffn_keep_ratio: float, head_keep_ratio: float, options: Any = None
                       ) -> nn.Module:
    """A copy of ``model`` with every block cut to its budgeted count (its first groups; weights do not matter).

    Any ``k`` groups of a block cost the same FLOPs and parameters, so this prices a budget without data.
    ``options``: a :class:`~hf_ispasp.PrunerConfig` whose group options apply (``gqa_groups``).
    """
    adapter = adapter_for(model)
    if options is not None:
        adapter.configure(options)
    widths = {block.name: kept_count(block.num_groups, ffn_keep_ratio if block.kind == "ffn" else head_keep_ratio,
                                     partitions=block.partitions) for block in adapter.iter_blocks()}
    return cut_copy(model, widths, options)


def cut_copy(model: nn.Module, widths: Mapping[str, int], options: Any = None) -> nn.Module:
    """A copy of ``model`` with every block named in ``widths`` cut to that many groups (its first groups of every
    run: which ones does not change the cost)."""
    candidate = copy.deepcopy(model)
    adapter = adapter_for(candidate)
    if options is not None:
        adapter.configure(options)
    for index in range(len(adapter.layers())):
        for block in adapter.blocks(index):
            keep = widths.get(block.name, block.num_groups)
            if keep < block.num_groups:
                adapter.compact(block, first_per_run(block.num_groups, keep // block.partitions, block.partitions))
    return candidate


def cut_layer(model: nn.Module, adapter: Any, index: int, path: str, cuts: Mapping[int, int]) -> nn.Module:
    """A copy of layer ``index`` (at ``path``) with its blocks at positions ``cuts`` cut to those widths (first
    groups of every run); the model keeps its own layer. The copy shares the model's config; an offloaded layer is
    copied with its weights loaded."""
    layer = model.get_submodule(path)
    shared = {id(model.config): model.config} if getattr(model, "config", None) is not None else {}
    if has_offload(layer):  # accelerate offload: a hook-free copy with the weights on the layer's device
        candidate = materialized_copy(layer, execution_device(layer, torch.device("cpu")), shared)
    else:
        candidate = copy.deepcopy(layer, shared)
    model.set_submodule(path, candidate)
    try:
        for position, width in cuts.items():
            block = adapter.blocks(index)[position]
            runs = block.partitions
            adapter.compact(block, first_per_run(block.num_groups, width // runs, runs))
    finally:
        model.set_submodule(path, layer)
    return candidate


def reference_inputs(model: nn.Module, adapter: Any, inputs: Any = None) -> Any:
    """``inputs``, or the adapter's reference input (``example_inputs()``) on the model's device."""
    if inputs is not None:
        return inputs
    return to_device(adapter.example_inputs(), next(model.parameters()).device)


@dataclass
class LayerPrice:
    """The cost of one layer as a function of its blocks' kept groups, from measurements at every corner (each
    block dense or cut to ``half``): FLOPs and parameters are multilinear in the widths (a conv between two pruned
    widths costs their product), so multilinear interpolation through the corners is exact."""

    names: list[str]
    dense: list[int]
    half: list[int]
    corners: dict[str, np.ndarray]  # metric -> cost at each corner, shape (2,) * len(names); index 1 = cut

    def value(self, metric: str, widths: Mapping[str, int]) -> float:
        table = self.corners[metric]
        for name, dense, half in zip(self.names, self.dense, self.half, strict=True):
            t = (dense - widths.get(name, dense)) / (dense - half)
            table = np.take(table, 0, axis=0) * (1 - t) + np.take(table, 1, axis=0) * t
        return float(table)


@dataclass
class BlockCosts:
    """What a model costs (``dense[metric]``) and, layer by layer, how that changes with the kept groups."""

    dense: dict[str, float]
    layers: list[LayerPrice]
    num_groups: dict[str, int]  # every block, priced or not (a block at one group per run is not)

    def __post_init__(self) -> None:
        self._layer_of = {name: layer for layer in self.layers for name in layer.names}
        full = {name: count for layer in self.layers for name, count in zip(layer.names, layer.dense, strict=True)}
        self._fixed = {m: self.dense[m] - sum(layer.value(m, full) for layer in self.layers) for m in METRICS}

    def predict(self, metric: str, widths: Mapping[str, int]) -> float:
        """The cost of the model with these kept groups per block (the others dense)."""
        return self._fixed[metric] + sum(layer.value(metric, widths) for layer in self.layers)

    def layer_for(self, name: str) -> LayerPrice | None:
        """The priced layer that holds block ``name`` (``None``: a block that cannot be cut)."""
        return self._layer_of.get(name)

    def pricing(self, metric: str) -> MetricPricing:
        """The :class:`~hf_ispasp.allocation.Pricing` of ``metric`` for the allocation."""
        return MetricPricing(self, metric)


@dataclass
class MetricPricing:
    """:class:`BlockCosts` seen through one metric, changes computed on the changed block's layer only."""

    costs: BlockCosts
    metric: str

    def total(self, widths: Mapping[str, int]) -> float:
        return self.costs.predict(self.metric, widths)

    def change(self, widths: Mapping[str, int], name: str, new: int) -> float:
        layer = self.costs.layer_for(name)
        if layer is None:
            return 0.0
        return layer.value(self.metric, {**widths, name: new}) - layer.value(self.metric, widths)

    def partners(self, name: str) -> list[str]:
        layer = self.costs.layer_for(name)
        return [other for other in layer.names if other != name] if layer is not None else []


def _layer_paths(model: nn.Module, adapter: Any) -> list[str]:
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    return [names[id(layer)] for layer in adapter.layers()]


@torch.no_grad()
def capture_layer_calls(model: nn.Module, adapter: Any, inputs: Any, context: Any = None
                        ) -> dict[int, tuple[tuple, dict[str, Any]]]:
    """Run the reference forward (inside ``context``, e.g. a FLOP counter) and keep every layer's call arguments,
    so a copy of one layer can be run alone on exactly its input."""
    calls: dict[int, tuple[tuple, dict[str, Any]]] = {}

    def keep_call(index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            calls.setdefault(index, (args, kwargs))
        return hook

    layers = list(adapter.layers())
    handles = [layer.register_forward_pre_hook(keep_call(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with context if context is not None else contextlib.nullcontext():
            _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [i for i in range(len(layers)) if i not in calls]
    if missing:
        raise RuntimeError(f"layers {missing} did not run in the reference forward")
    return calls


@torch.no_grad()
def block_costs(model: nn.Module, inputs: Any = None, options: Any = None) -> BlockCosts:
    """Price the blocks one layer at a time: for every subset of a layer's blocks, a copy of the layer with those
    blocks cut to half (their first groups: any ``k`` groups cost the same) runs on the layer's own input from
    the reference forward, counting FLOPs, and its parameters are counted.

    Only one layer is ever copied (``2^blocks - 1`` small forwards per layer). ``inputs``: the reference input
    (default ``adapter.example_inputs()`` on the model's device); ``options``: a
    :class:`~hf_ispasp.PrunerConfig` whose group options apply (``gqa_groups``).
    """
    adapter = adapter_for(model)
    if options is not None:
        adapter.configure(options)
    inputs = reference_inputs(model, adapter, inputs)
    layers = list(adapter.layers())
    paths = _layer_paths(model, adapter)
    counter = flop_counter(depth=None)
    calls = capture_layer_calls(model, adapter, inputs, counter)
    dense = {"flops": float(counter.get_total_flops()), "params": float(count_parameters(model))}
    prices, num_groups = [], {}
    for index, (layer, path) in enumerate(zip(layers, paths, strict=True)):
        args, kwargs = calls[index]
        blocks = adapter.blocks(index)
        num_groups.update({block.name: block.num_groups for block in blocks})
        halves = {p: max(1, b.num_groups // b.partitions // 2) * b.partitions for p, b in enumerate(blocks)}
        cuttable = [p for p, b in enumerate(blocks) if halves[p] < b.num_groups]  # one group per run: fixed
        corners = {metric: np.zeros((2,) * len(cuttable)) for metric in METRICS}
        for corner in itertools.product((0, 1), repeat=len(cuttable)):
            cuts = {position: halves[position] for position, cut in zip(cuttable, corner, strict=True) if cut}
            candidate = cut_layer(model, adapter, index, path, cuts) if cuts else layer
            with flop_counter(depth=None) as layer_counter:
                candidate(*args, **kwargs)
            corners["flops"][corner] = layer_counter.get_total_flops()
            corners["params"][corner] = count_parameters(candidate)
        prices.append(LayerPrice([blocks[p].name for p in cuttable], [blocks[p].num_groups for p in cuttable],
                                 [halves[p] for p in cuttable], corners))
    return BlockCosts(dense, prices, num_groups)


def budget_blocks(model: nn.Module, round_to: int = 1,
                  curves: Mapping[str, tuple[list[int], list[float]]] | None = None, options: Any = None,
                  multiple: int = 1) -> list[BudgetBlock]:
    """The allocation's view of every block: groups, floor and step and its error curve.

    A step is one group per run (``partitions``); FFN / channel widths also move in multiples of ``round_to`` and
    of ``multiple`` (sizes that run fast, for latency targets).
    """
    adapter = adapter_for(model)
    if options is not None:
        adapter.configure(options)
    result = []
    for block in adapter.iter_blocks():
        width_step = math.lcm(round_to, multiple) if block.kind == "ffn" else 1
        step = block.partitions * (width_step if block.num_groups >= width_step else 1)
        counts, errors = (curves or {}).get(block.name, ([], []))
        result.append(BudgetBlock(block.name, block.num_groups, floor=block.partitions, step=step,
                                  counts=list(counts), errors=list(errors)))
    return result


def widths_for_target(model: nn.Module, pricing: Pricing, dense_cost: float, keep_ratio: float, allocation: str,
                      round_to: int = 1, curves: Mapping[str, tuple[list[int], list[float]]] | None = None,
                      options: Any = None, multiple: int = 1) -> dict[str, int]:
    """Kept groups per block that bring the priced cost to ``keep_ratio`` of ``dense_cost`` under ``allocation``."""
    blocks = budget_blocks(model, round_to, curves, options, multiple)

    def count(block: BudgetBlock, ratio: float) -> int:  # as the pruner rounds a ratio (step = runs x round_to)
        return kept_count(block.num_groups, ratio, block.step // block.floor, block.floor)

    return allocate(blocks, pricing, keep_ratio * dense_cost, allocation, count)


Curves = dict[str, tuple[list[int], list[float]]]


@torch.no_grad()
def error_curves(model: nn.Module, adapter: Any, batches: list[Any], device: torch.device, config: Any,
                 reduce: Callable[[torch.Tensor], None] | None = None) -> Curves:
    """Every block's output error against its kept groups, on the dense model (one extra calibration pass).

    A block's curve is :func:`~hf_ispasp.algorithm.residual_curve` (after the re-fit when ``config.refit``)
    divided by the energy of the hidden states the block adds to (real tokens only): the layer input plus the dense
    outputs of the layer's blocks up to this one, or the layer input alone in post-norm layers (see
    ``ModelAdapter.post_norm``). An error counts by how much it moves the residual stream that the next layers
    read, which makes blocks of different layers and kinds comparable. ``reduce`` sums a tensor across processes
    (every process gets equal curves).
    """
    cache = ActivationCache(config.activation_cache, device)
    curves: Curves = {}
    shared = {id(model.config): model.config} if getattr(model, "config", None) is not None else {}
    try:
        capture_layer_inputs(model, adapter, batches, cache, device, seed=config.seed)
        layers, paths = list(adapter.layers()), _layer_paths(model, adapter)
        for index, original in enumerate(layers):
            layer_device = execution_device(original, device)
            layer = original
            if has_offload(original):  # its weights on the execution device for this pass, then back as they were
                layer = materialized_copy(original, layer_device, dict(shared))
                model.set_submodule(paths[index], layer)
            try:
                curves.update(_layer_curves(adapter, index, layer, cache, layer_device, config, reduce))
                if index + 1 < len(layers):
                    propagate(layer, adapter, cache, layer_device)
            finally:
                if layer is not original:
                    model.set_submodule(paths[index], original)
    finally:
        cache.close()
    return curves


def _layer_curves(adapter: Any, index: int, layer: nn.Module, cache: ActivationCache, device: torch.device,
                  config: Any, reduce: Callable[[torch.Tensor], None] | None) -> Curves:
    energy = hidden_energy(adapter, cache, device)
    if reduce is not None:
        reduce(energy)
    per_position = float(energy[0]) / max(float(energy[1]), 1.0)
    stats_dtype = getattr(torch, config.stats_dtype)
    curves: Curves = {}
    for block in adapter.blocks(index):
        stats = collect_block_statistics(layer, adapter, block, cache, device, stats_dtype)
        for tensor in stats.tensors() if reduce is not None else ():
            reduce(tensor)
        stats = stats.to(dtype=selection_precision(stats, config.selection_dtype)[0])  # curves: no validation
        weight, bias = adapter.output_weight(block), adapter.output_bias(block)
        with ieee_float32():  # as the prune's own selection (selection_dtype="float32": no TF32)
            counts, residuals = residual_curve(
                stats, weight, block.group_size, refit=config.refit, centered=bias is not None,
                damping=config.refit_damping, partitions=block.partitions,
            )
        # Pre-norm and residual CNNs: the stream this block's error lands in is the layer input plus what this
        # layer's blocks up to this one write into it (their dense outputs, taken as orthogonal to it). In a
        # decoder whose first layer writes 10^5 times the energy of the embeddings, the layer input alone would
        # make that layer's FFN look 10^5 times costlier than everything after it. Post-norm: the layer input
        # (the previous layer's normalised output) is the scale; chosen by measurement (BENCHMARKS.md, budgets).
        positions = max(stats.rows, 1.0)
        if not adapter.post_norm:
            per_position += output_energy(stats, weight, bias) / positions
        scale = per_position * positions
        curves[block.name] = (counts, [r / scale if scale > 0 else r for r in residuals])
    return curves
