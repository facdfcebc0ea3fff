"""`ISpaSPPruner`: calibrate -> select -> compact, block by block in forward order."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import ModelAdapter, PrunableBlock, adapter_for
from .adapters.base import Resume
from .algorithm import (
    REFIT_RIDGES,
    BlockStatistics,
    RefitChoice,
    SelectionResult,
    all_finite,
    group_columns,
    ieee_float32,
    output_energy,
    refit_with_residual,
    residual_after_refit,
    select_groups,
    selection_precision,
    validated_selection,
)
from .baselines import mean_compensation
from .budget import block_costs, error_curves, widths_for_target
from .config import PrunerConfig, kept_count
from .importance import llm_pruner_scores, taylor_scores
from .latency_budget import fast_multiple, latency_costs
from .metrics import count_flops, count_parameters, latency_ratio
from .offload import execution_device, has_offload, materialized_copy, offload
from .packing import group_by_length
from .portable import attach_portable_save
from .record import BASE_MODEL_KEY, METADATA_KEY, SUMMARY_KEY, summarize_prune
from .serialization import ADDED_BIASES_KEY, add_zero_bias, looks_like_hub_id
from .statistics import (
    ActivationCache,
    calibration_batches,
    capture_layer_inputs,
    collect_block_statistics,
    propagate,
    skip_entry_input,
    to_device,
)
from .version import __version__

__all__ = ["BlockReport", "ISpaSPPruner", "PruningReport", "kept_count"]

logger = logging.getLogger(__name__)

@dataclass
class BlockReport:
    name: str
    kind: str
    layer: int
    groups_before: int
    groups_after: int
    relative_residual: float
    relative_residual_refit: float | None
    iterations: int
    kept: list[int] = field(default_factory=list)
    # Relative ridge of the installed re-fit (inf: only the bias was re-fitted; None: no re-fit), and the relative
    # residual of the installed projection on held-out calibration data (one half or both; None when not
    # validated, which includes the re-fit threshold's support kept on a well-posed block with the ridge of the
    # exact-residual one).
    refit_ridge: float | None = None
    relative_residual_heldout: float | None = None


@dataclass
class PruningReport:
    """What a prune did: per-block widths and residuals, size and FLOPs before/after, wall time."""

    blocks: list[BlockReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    layer_params_before: int = 0
    layer_params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    calibration_batches: int = 0
    calibration_tokens: int = 0
    seconds: float = 0.0
    seconds_calibration: float = 0.0
    seconds_selection: float = 0.0
    # Bytes of calibration activations held per cache tier (device / cpu / disk) at the end of the prune.
    activation_cache_bytes: dict[str, int] = field(default_factory=dict)
    # With a target: {"target", "allocation", "widths", "predicted", "achieved"} and, for latency, the timing.
    budget: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for strict JSON: a non-finite float (``refit_ridge=inf``: bias-only re-fit) becomes "inf"."""
        return _finite_json(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = ["| block | kept | residual (rel.) | after re-fit | held-out |", "|---|---|---|---|---|"]
        for b in self.blocks:
            refit = "-" if b.relative_residual_refit is None else f"{b.relative_residual_refit:.4f}"
            held = "-" if b.relative_residual_heldout is None else f"{b.relative_residual_heldout:.4f}"
            lines.append(f"| {b.name} | {b.groups_after}/{b.groups_before} | {b.relative_residual:.4f} | {refit} "
                         f"| {held} |")
        return "\n".join(lines)


class ISpaSPPruner:
    """Structured pruning of a model with i-SpaSP (Wolfe & Kyrillidis, arXiv:2112.04905).

    Blocks are pruned greedily in forward order: each block's statistics are computed on inputs produced by
    the already-pruned earlier blocks, with the dense block's own output as the target, so later blocks
    correct the error of earlier ones. Only one layer is copied at a time (see :meth:`prune`).

    Args:
        model: A supported model (see :func:`hf_ispasp.supported_model_types`).
        config: Budgets and algorithm settings.
        accelerator: Optional ``accelerate.Accelerator``; with several processes, each process calibrates on
            its own shard and statistics are summed across processes before selection.
    """

    def __init__(self, model: nn.Module, config: PrunerConfig | None = None, accelerator: Any = None) -> None:
        self.config = config or PrunerConfig()
        if not isinstance(self.config, PrunerConfig):
            raise TypeError(f"config must be a PrunerConfig, got {type(self.config).__name__}")
        self.model = model
        adapter_for(model)  # fail early on an unsupported architecture
        self.accelerator = accelerator
        self.report: PruningReport | None = None

    # ------------------------------------------------------------------------------------------------
    def prune(self, calibration_data: Iterable[Any], inplace: bool = False) -> nn.Module:
        """Prune the model on ``calibration_data`` and return it, physically compacted.

        Layers are pruned one at a time on a copy of that layer, which is swapped into the model while the prune
        walks on; the model is never copied whole. With ``inplace=False`` (the default) the caller's model gets
        its own layers back at the end and a new model is returned (the pruned layers plus a copy of the rest:
        embeddings, heads); with ``inplace=True`` the caller's model itself becomes the pruned one and nothing
        else is allocated. If the prune fails, the caller's model is left exactly as it was in both cases.

        Args:
            calibration_data: A DataLoader or iterable of dict batches (``input_ids``, ``attention_mask``, ...),
                or a tokenized ``datasets.Dataset`` (batched with ``config.calibration_batch_size``). Labels are
                ignored; padding tokens (``attention_mask == 0``) never enter the statistics.
            inplace: Prune the given model instead of returning a pruned copy.
        """
        _check_model(self.model)
        model = self.model
        offloaded = has_offload(model)
        if offloaded and not inplace:
            raise ValueError(
                "the model is dispatched with CPU or disk offload (device_map); a pruned copy next to it would not "
                "fit either: call pruner.prune(data, inplace=True), which prunes it layer by layer in place"
            )
        adapter = adapter_for(model)
        adapter.configure(self.config)  # options that change the groups (e.g. gqa_groups) before any block is read
        _check_overrides(self.config, adapter)
        start = time.perf_counter()
        device = _device(model)
        report = PruningReport()
        example = adapter.example_inputs()
        report.params_before = count_parameters(model)
        report.layer_params_before = count_parameters(list(adapter.layers()))
        report.flops_before = count_flops(model, to_device(example, device))
        dense_widths = adapter.widths()  # for the model card's dense-vs-pruned widths
        originals = list(adapter.layers())
        paths = _module_paths(model, originals)
        was_training = model.training
        swapped: dict[int, nn.Module] = {}
        cache = ActivationCache(self.config.activation_cache, device)
        restore = True
        try:
            model.eval()
            with torch.no_grad():
                self._prune(model, adapter, originals, paths, swapped, calibration_data, cache, device, report)
            report.activation_cache_bytes = cache.summary()
            cache.close()  # free the activations before the rest of the model is copied
            if inplace:
                result, restore = model, False
            else:  # the rest of the model is copied; the pruned layers are taken as they are
                result = copy.deepcopy(model, {id(layer): layer for layer in swapped.values()})
                _share_config(list(swapped.values()), getattr(model, "config", None), getattr(result, "config", None))
        finally:
            cache.close()
            if restore:
                for index, original in enumerate(originals):
                    if index in swapped:
                        model.set_submodule(paths[index], original)
            model.train(was_training)
        result_adapter = adapter_for(result)
        report.params_after = count_parameters(result)
        report.layer_params_after = count_parameters(list(result_adapter.layers()))
        report.flops_after = count_flops(result, to_device(example, device))
        if report.budget:
            report.budget["achieved"] = {"flops": report.flops_after / max(report.flops_before, 1),
                                         "params": report.params_after / max(report.params_before, 1)}
            if "latency" in report.budget["target"] and not inplace:  # the dense model is still there to time
                timing = latency_ratio(model, result, to_device(example, device))
                report.budget["achieved"]["latency"] = 1.0 / timing.speedup
                report.budget["latency"] = timing.to_dict()
        report.seconds = time.perf_counter() - start
        shapes = example.items() if isinstance(example, dict) else [("input", example)]
        _record_metadata(result, result_adapter, self.config, self._added_biases, report, dense_widths,
                         {k: list(v.shape) for k, v in shapes if isinstance(v, torch.Tensor)})
        result.train(was_training)
        self.report = report
        logger.info(
            "i-SpaSP: parameters %d -> %d (%.1f%%), FLOPs %.3g -> %.3g in %.1fs",
            report.params_before, report.params_after, 100 * report.params_after / max(report.params_before, 1),
            report.flops_before, report.flops_after, report.seconds,
        )
        return result

    def _prune(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        originals: list[nn.Module],
        paths: list[str],
        swapped: dict[int, nn.Module],
        data: Iterable[Any],
        cache: ActivationCache,
        device: torch.device,
        report: PruningReport,
    ) -> None:
        config = self.config
        pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        batches = calibration_batches(data, config.calibration_batch_size, config.max_calibration_samples, pad)
        t0 = time.perf_counter()
        self._scores: dict[str, torch.Tensor] = {}
        self._added_biases: list[str] = []
        self._paths = paths
        if config.selection in ("taylor", "llm_pruner"):  # scores of the dense model, before any compaction
            batches = list(batches)
            scorer = taylor_scores if config.selection == "taylor" else llm_pruner_scores
            self._scores = scorer(model, adapter, batches, device, reduce=self._sum_across_processes)
        if config.group_by_length:  # after the gradient scores, whose per-batch loss weighting is the user's
            batches = group_by_length(batches, pad)
        self._widths: dict[str, int] | None = None
        if config.budget_target is not None:
            batches = list(batches)  # read twice: error curves of the dense model, then the prune
            self._widths, report.budget = self._allocate(model, adapter, batches, device)
        self._warned: set[str] = set()
        self._widest = max(((int(adapter.output_weight(b).shape[1]), b.name) for b in adapter.iter_blocks()),
                           default=(0, ""))
        report.calibration_tokens = capture_layer_inputs(model, adapter, batches, cache, device, seed=config.seed)
        report.calibration_batches = len(cache)
        num_layers = len(originals)
        num_blocks = sum(len(adapter.blocks(i)) for i in range(num_layers))
        stats_dtype = getattr(torch, config.stats_dtype)
        generator = torch.Generator().manual_seed(config.seed)
        selection_seconds = 0.0
        resumable = skipping = True
        skip_checked = False
        bar = tqdm(total=num_blocks, desc="i-SpaSP", unit="block", disable=not config.show_progress)
        try:
            for index in range(num_layers):
                original = originals[index]
                offloaded = has_offload(original)
                layer_device = execution_device(original, device)
                # One dense layer at a time, never the whole model; an offloaded layer's weights are loaded first.
                # The copy keeps reading the model's config (e.g. its attention implementation), not a frozen copy.
                shared = {id(model.config): model.config} if getattr(model, "config", None) is not None else {}
                layer = (materialized_copy(original, layer_device, shared) if offloaded
                         else copy.deepcopy(original, shared))
                model.set_submodule(paths[index], layer)
                swapped[index] = layer
                blocks = adapter.blocks(index)
                last_layer = index + 1 == num_layers
                point = adapter.resume(index) if resumable else None
                if point is not None and index == 0 and not _resume_matches(layer, adapter, point, cache,
                                                                            layer_device):
                    resumable, point = False, None
                resume = None if last_layer else point
                # two blocks (attention, then FFN): the FFN's pass starts at the attention's down (Resume.skip)
                skippable = skipping and point is not None and point.skip is not None and len(blocks) == 2
                for position, block in enumerate(blocks):
                    is_last = position + 1 == len(blocks)
                    skip = None
                    if skippable and position == 1:
                        skip = _skip_from(adapter, index, blocks[0], report.blocks[-1], point)
                        if skip is not None and not skip_checked:
                            skip_checked = True
                            if not _skip_matches(layer, adapter, skip, cache, layer_device):
                                skipping, skip = False, None
                    stats = collect_block_statistics(layer, adapter, block, cache, layer_device, stats_dtype,
                                                     resume=resume if is_last else None,
                                                     capture=skippable and position == 0, skip=skip)
                    self._reduce(stats)
                    t_sel = time.perf_counter()
                    report.blocks.append(self._prune_block(adapter, block, stats, generator))
                    selection_seconds += time.perf_counter() - t_sel
                    bar.update(1)
                    bar.set_postfix_str(block.name)
                if not last_layer:
                    propagate(layer, adapter, cache, layer_device, resume)
                if offloaded:  # back to CPU memory: the device holds one layer at a time
                    offload(layer, layer_device)
                    _note_offload(model, paths[index])
        finally:
            bar.close()
        report.seconds_selection = selection_seconds
        report.seconds_calibration = time.perf_counter() - t0 - selection_seconds

    def _allocate(self, model: nn.Module, adapter: ModelAdapter, batches: list[Any], device: torch.device
                  ) -> tuple[dict[str, int], dict[str, Any]]:
        """Kept groups per block for the config's FLOPs/params/latency target, and what the report says of them."""
        config = self.config
        metric, ratio = config.budget_target
        allocation = config.budget_allocation
        example = to_device(adapter.example_inputs(), device)
        costs = block_costs(model, example, config)
        if metric == "latency":
            pricing: Any = latency_costs(model, example, config, round_to=config.round_to)
            dense, multiple = pricing.dense, fast_multiple(device)
        else:
            pricing, dense, multiple = costs.pricing(metric), costs.dense[metric], 1
        curves = None
        if allocation == "global":
            curves = error_curves(model, adapter, batches, device, config, self._sum_across_processes)
        widths = widths_for_target(model, pricing, dense, ratio, allocation, config.round_to, curves, config,
                                   multiple)
        if metric == "latency" and getattr(self.accelerator, "num_processes", 1) > 1:
            # timings differ from process to process: every process prunes to the main process's widths
            from accelerate.utils import broadcast_object_list

            widths = broadcast_object_list([widths], from_process=0)[0]
        predicted = {m: costs.predict(m, widths) / costs.dense[m] for m in ("flops", "params")}
        if metric == "latency":
            predicted["latency"] = pricing.total(widths) / dense
        logger.info("i-SpaSP: %s allocation of %s keep %.3f: predicted %s of dense", allocation, metric, ratio,
                    ", ".join(f"{k} {v:.4f}" for k, v in predicted.items()))
        return widths, {"target": {metric: ratio}, "allocation": allocation, "widths": dict(widths),
                        "predicted": predicted}

    def _reduce(self, stats: BlockStatistics) -> None:
        """Sum statistics across processes (each calibrated on its shard) so every process selects alike."""
        for tensor in stats.tensors():
            self._sum_across_processes(tensor)

    def _sum_across_processes(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its sum over the processes (nothing to do in a single process)."""
        acc = self.accelerator
        if acc is None or getattr(acc, "num_processes", 1) <= 1:
            return
        tensor.copy_(acc.reduce(tensor.to(acc.device), reduction="sum").to(tensor.device))

    def _prune_block(
        self, adapter: ModelAdapter, block: PrunableBlock, stats: BlockStatistics, generator: torch.Generator
    ) -> BlockReport:
        config = self.config
        if self._widths is not None:  # allocated for a FLOPs/params target
            keep = self._widths[block.name]
        else:
            ratio = config.keep_ratio(block.layer, block.kind)
            keep = kept_count(block.num_groups, ratio, config.round_to if block.kind == "ffn" else 1,
                              block.partitions)
        weight = adapter.output_weight(block)
        bias = adapter.output_bias(block)
        # FLAP compensates the cut through the bias: a bias-free projection is treated as one with a zero bias
        # (centred statistics for any re-fit), and gets a real one when the block is compacted.
        compensate = config.selection == "flap"
        needs_bias = compensate and bias is None
        if needs_bias:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        pruning = keep < block.num_groups
        uses_refit = config.refit or (config.threshold == "refit" and config.selection == "ispasp")
        self._warn_small_calibration(block, stats)
        validate = config.refit_validation and pruning and uses_refit
        with ieee_float32():  # a float32 selection or validation must not run in TF32 where the user allows it
            result, choice = self._selection(adapter, block, stats, generator, keep, weight, bias, validate)
        full = _output_energy(stats, weight, result)
        refit_rel = heldout_rel = ridge = None
        fitted = None
        if config.refit and pruning:
            ridge = choice.ridge if choice is not None else config.refit_damping
            if ridge is not None:
                new_weight, new_bias, after = refit_with_residual(stats, weight, bias, result.groups,
                                                                  block.group_size, ridge, anchored=choice is not None,
                                                                  carried=result.refit)
                fitted = (new_weight, new_bias)
                refit_rel = after / full if full > 0 else 0.0
                if choice is None and after > result.residual:  # fixed ridge can, in degenerate cases, do worse
                    fitted, refit_rel, ridge = None, result.relative_residual, None
        heldout = None if choice is None else (choice.heldout if fitted is not None else choice.plain)
        if compensate and pruning and fitted is None:
            # FLAP's baseline bias: W_S kept, the dropped columns' mean output added to the bias (the anchored
            # re-fit at an infinite ridge, hence reported with ridge inf).
            mean = stats.total / max(stats.rows, 1.0)
            columns = group_columns(result.groups, block.group_size, mean.device)
            fitted = mean_compensation(_like_stats(weight, stats), _like_stats(bias, stats), mean, columns)
            after = residual_after_refit(stats, weight, bias, result.groups, block.group_size, *fitted)
            ridge, refit_rel = math.inf, (after / full if full > 0 else 0.0)
            heldout = None if choice is None else choice.scores.get(math.inf, choice.plain)
        if choice is not None and choice.validated and choice.support_validated and full > 0:
            heldout_rel = heldout / full
        if pruning:
            adapter.compact(block, result.groups)
            if fitted is not None:
                if needs_bias:
                    self._add_bias(adapter, block)
                adapter.set_output_projection(block, *fitted)
        logger.debug("%s: kept %d/%d, relative residual %.4g, re-fit ridge %s", block.name, keep, block.num_groups,
                     result.relative_residual, ridge)
        return BlockReport(
            block.name, block.kind, block.layer, block.num_groups, keep, result.relative_residual, refit_rel,
            result.iterations, result.groups.tolist(), ridge if fitted is not None else None, heldout_rel,
        )

    def _selection(
        self, adapter: ModelAdapter, block: PrunableBlock, stats: BlockStatistics, generator: torch.Generator,
        keep: int, weight: torch.Tensor, bias: torch.Tensor | None, validate: bool,
    ) -> tuple[SelectionResult, RefitChoice | None]:
        """The block's selection (and re-fit choice, ``validate``) in the precisions ``selection_dtype`` picks.

        Where a float32 factorisation fails (an eigendecomposition that does not converge on an ill-conditioned
        kept covariance), everything runs again in the accumulation precision from the same random state.
        Whatever writes weights (re-fit, mean compensation) reads the accumulated statistics, so an equal
        selection gives the same pruned block in any precision.
        """
        selection, validation = selection_precision(stats, self.config.selection_dtype)
        state = generator.get_state()
        try:
            return self._select_in(adapter, block, stats, generator, keep, weight, bias, validate, selection,
                                   validation)
        except torch.linalg.LinAlgError as err:
            # released fold sums (after the last validation, see validated_selection): the failure was in the
            # accumulation precision's re-fit threshold, which a rerun would repeat
            if selection == validation == stats.dtype or stats.folds_released:
                raise
            full = str(stats.dtype).removeprefix("torch.")
            logger.info("i-SpaSP: %s: a float32 factorisation failed (%s); selecting in %s", block.name,
                        str(err).splitlines()[0], full)
            generator.set_state(state)
            return self._select_in(adapter, block, stats, generator, keep, weight, bias, validate, stats.dtype,
                                   stats.dtype)

    def _select_in(
        self, adapter: ModelAdapter, block: PrunableBlock, stats: BlockStatistics, generator: torch.Generator,
        keep: int, weight: torch.Tensor, bias: torch.Tensor | None, validate: bool, selection: torch.dtype,
        validation: torch.dtype,
    ) -> tuple[SelectionResult, RefitChoice | None]:
        selecting = stats.to(dtype=selection)
        if validate:
            return self._validated_selection(adapter, block, selecting, generator, keep, weight, bias, validation)
        return self._select(adapter, block, selecting, generator, keep, weight, bias, self.config.threshold), None

    def _add_bias(self, adapter: ModelAdapter, block: PrunableBlock) -> None:
        """Give the block's (compacted) bias-free ``down`` a bias and note its path for the width record."""
        down = adapter.current_down(block)
        layer = adapter.layers()[block.layer]
        relative = next(name for name, module in layer.named_modules() if module is down)
        add_zero_bias(down)
        self._added_biases.append(f"{self._paths[block.layer]}.{relative}" if relative else self._paths[block.layer])

    def _select(
        self, adapter: ModelAdapter, block: PrunableBlock, stats: BlockStatistics, generator: torch.Generator,
        keep: int, weight: torch.Tensor, bias: torch.Tensor | None, threshold: str, damping: float | None = None,
        anchored: bool = False, gram_w: torch.Tensor | None = None, output_energy: float | None = None,
    ) -> SelectionResult:
        config = self.config
        return select_groups(
            stats,
            weight,
            block.group_size,
            keep,
            selection=config.selection,
            proxy=config.proxy,
            threshold=threshold,
            num_iterations=config.num_iterations,
            weight_scores=adapter.weight_scores(block) if config.selection == "weight_magnitude"
            else self._scores.get(block.name),
            generator=generator,
            centered=bias is not None,
            damping=config.refit_damping if damping is None else damping,
            anchored=anchored,
            partitions=block.partitions,
            weight_gram=gram_w,
            output_energy=output_energy,
        )

    def _validated_selection(
        self, adapter: ModelAdapter, block: PrunableBlock, stats: BlockStatistics, generator: torch.Generator,
        keep: int, weight: torch.Tensor, bias: torch.Tensor | None, validation_dtype: torch.dtype | None = None,
    ) -> tuple[SelectionResult, RefitChoice]:
        """Selection and re-fit ridge chosen on held-out halves of the calibration data
        (:func:`hf_ispasp.algorithm.validated_selection`). Where no re-fit beats plain selection on held-out data,
        or the halves are unavailable, the support is the exact-residual one and nothing is re-fitted (the
        exact-residual threshold is the better no-re-fit rule: KL 0.047 vs 0.104 for `output` at 32 sequences,
        0.052 vs 0.097 at 512). Costs one validation and one extra selection per block (a second validation at
        one ridge, with `refit`, where the block has fewer than 4 tokens per column)."""
        config = self.config

        def select(threshold: str, damping: float | None, anchored: bool, gram_w: torch.Tensor | None,
                   energy: float | None) -> SelectionResult:
            return self._select(adapter, block, stats, generator, keep, weight, bias, threshold, damping, anchored,
                                gram_w, energy)

        result, choice = validated_selection(
            stats, weight, bias, block.group_size, select, threshold=config.threshold,
            refit_threshold=config.threshold == "refit" and config.selection == "ispasp", refit=config.refit,
            ridges=tuple(sorted(set(REFIT_RIDGES) | {float(config.refit_damping)})), validation_dtype=validation_dtype,
            release_folds=True,  # the block's statistics are its own; nothing reads their halves after selection
        )
        if not choice.validated:
            self._warn_unvalidated(block, stats)
        return result, choice

    def _warn_small_calibration(self, block: PrunableBlock, stats: BlockStatistics) -> None:
        """Once per prune: fewer calibration tokens than a block has columns (the re-fit is underdetermined).

        Checked per block (rows are summed over processes; a CNN block has one row per pixel position).
        """
        tokens, columns = int(stats.rows), int(stats.width)
        if tokens >= columns or "small" in self._warned:
            return
        self._warned.add("small")
        widest = max(self._widest, (columns, block.name))
        guard = (
            "the re-fit is validated on held-out halves of the data and skipped where it does not help"
            if self.config.refit_validation else "with refit_validation=False the re-fit will overfit them"
        )
        logger.warning(
            "i-SpaSP: the calibration data has %d tokens, fewer than the %d columns of %s (the widest block, %s, "
            "has %d): the statistics are rank-deficient and a least-squares re-fit can interpolate the calibration "
            "tokens (%s). Pass more calibration data (several times %d tokens).",
            tokens, columns, block.name, widest[1], widest[0], guard, max(columns, widest[0]),
        )

    def _warn_unvalidated(self, block: PrunableBlock, stats: BlockStatistics) -> None:
        """Once per prune: the re-fit could not be validated, so it is skipped."""
        if "unvalidated" in self._warned:
            return
        self._warned.add("unvalidated")
        if stats.host_counts()[2] > 0:
            why = f"the input of {block.name} does not keep the batch in dimension 0, so it cannot be split"
        else:
            why = (f"all {int(stats.rows)} calibration tokens come from sequences of one half (e.g. a single "
                   "sequence), so there is no held-out data")
        logger.warning(
            "i-SpaSP: the re-fit cannot be validated: %s. Such blocks are pruned without re-fit (and the `refit` "
            "threshold is replaced by `residual`). Pass more calibration data (at least a few distinct sequences, "
            "ideally hundreds).", why,
        )


def _output_energy(stats: BlockStatistics, weight: torch.Tensor, result: SelectionResult) -> float:
    """``sum_b ||W H_b||^2``, the scale of the relative residuals (every selection reports it)."""
    return result.output_energy if result.output_energy is not None else output_energy(stats, weight, None)


def _like_stats(tensor: torch.Tensor, stats: BlockStatistics) -> torch.Tensor:
    """A weight or bias on the statistics' device, in their dtype (where selection and re-fit compute)."""
    return tensor.detach().to(device=stats.gram.device, dtype=stats.gram.dtype)


def _check_model(model: nn.Module) -> None:
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters")
    if has_offload(model):
        return  # weights live in accelerate's offload maps; they are checked as each layer is loaded
    if any(p.device.type == "meta" for p in params):
        raise ValueError("the model has weights on the 'meta' device; load real weights before pruning")
    named = [(n, p.detach()) for n, p in model.named_parameters() if p.is_floating_point()]
    if all_finite(*(p for _, p in named)):  # one host read per device, not one per parameter
        return
    bad = [n for n, p in named if not all_finite(p)]
    if bad:
        raise ValueError(f"the model has NaN/inf weights in {bad[:5]}; it cannot be calibrated")


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value


def _check_overrides(config: PrunerConfig, adapter: ModelAdapter) -> None:
    """A ``layer_overrides`` index the model does not have is a mistake, not something to ignore."""
    num_layers = len(adapter.layers())
    beyond = sorted(layer for layer in config.layer_overrides if layer >= num_layers)
    if beyond:
        raise ValueError(
            f"layer_overrides names layer(s) {beyond}, but the model has {num_layers} prunable layers "
            f"(indices 0..{num_layers - 1}); fix the indices in PrunerConfig(layer_overrides=...)"
        )


def _device(model: nn.Module) -> torch.device:
    """Where calibration inputs go: the main device of a dispatched model, else the first parameter's device."""
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and device_map:
        accelerators = [d for d in device_map.values() if d not in ("cpu", "disk")]
        return torch.device(accelerators[0]) if accelerators else torch.device("cpu")
    return next(model.parameters()).device


def _note_offload(model: nn.Module, path: str) -> None:
    """A disk-offloaded layer comes back CPU-offloaded (its pruned weights are in memory, not in the folder)."""
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and device_map.get(path) == "disk":
        device_map[path] = "cpu"


def _module_paths(model: nn.Module, layers: list[nn.Module]) -> list[str]:
    """Dotted path of every layer inside ``model`` (where a pruned copy is swapped in)."""
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    missing = [i for i, layer in enumerate(layers) if id(layer) not in names]
    if missing:
        raise RuntimeError(f"layers {missing} returned by the adapter are not submodules of the model")
    return [names[id(layer)] for layer in layers]


def _run_capturing(
    layer: nn.Module, point: Resume, entry: dict[str, Any], device: torch.device
) -> tuple[tuple, dict[str, Any], Any, torch.Tensor | None]:
    """Run ``layer`` whole on a cached entry: its args, kwargs and output, and the input ``point.entry`` saw (``None``
    unless it saw exactly one tensor)."""
    captured: list[torch.Tensor] = []
    handle = point.entry.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        args, kwargs = to_device(entry["args"], device), to_device(entry["kwargs"], device)
        output = layer(*args, **kwargs)
    finally:
        handle.remove()
    seen = captured[0] if len(captured) == 1 and isinstance(captured[0], torch.Tensor) else None
    return args, kwargs, output, seen


def _close(candidate: torch.Tensor, reference: torch.Tensor) -> bool:
    tolerance = 1e-4 if reference.dtype in (torch.float32, torch.float64) else 2e-2
    return candidate.shape == reference.shape and torch.allclose(candidate, reference, rtol=tolerance, atol=tolerance)


def _resume_matches(
    layer: nn.Module, adapter: ModelAdapter, resume: Resume, cache: ActivationCache, device: torch.device
) -> bool:
    """Check once (first batch, first layer) that the adapter's resume tail reproduces the layer's output.

    A wrong tail would silently corrupt every later layer's calibration; a mismatch (e.g. a custom adapter, or a
    model whose layer forward differs from what the adapter assumes) falls back to running each layer whole.
    """
    _, _, output, seen = _run_capturing(layer, resume, cache[0], device)
    if seen is not None and _close(resume.tail(seen), adapter.layer_output(output)):
        return True
    logger.warning(
        "i-SpaSP: %s.resume() does not reproduce the layer's output on the first calibration batch; every layer "
        "is run whole for propagation instead (correct, but slower).", type(adapter).__name__,
    )
    return False


def _skip_from(
    adapter: ModelAdapter, index: int, first: PrunableBlock, pruned: BlockReport, point: Resume
) -> tuple[Resume, torch.Tensor] | None:
    """``(point, columns)`` for starting a layer's last block at its first block's ``down``: the columns of the
    captured ``down`` input that the compacted first block still reads, or ``None`` when they do not match its
    width (e.g. an adapter whose compaction is not the kept groups' columns)."""
    columns = group_columns(torch.tensor(pruned.kept, dtype=torch.long), first.group_size)
    current = next((b for b in adapter.blocks(index) if b.name == first.name), None)
    if current is None or int(adapter.output_weight(current).shape[1]) != len(columns):
        return None
    return point, columns


def _skip_matches(
    layer: nn.Module, adapter: ModelAdapter, skip: tuple[Resume, torch.Tensor], cache: ActivationCache,
    device: torch.device,
) -> bool:
    """Check once (first batch, first layer that skips) that ``Resume.skip`` gives what the layer feeds ``entry``.

    As with :func:`_resume_matches`, a mismatch falls back to running every layer from its start.
    """
    entry = cache[0]
    start = entry.get("skip_input")
    args, kwargs, _, seen = _run_capturing(layer, skip[0], entry, device)
    if seen is not None and start is not None and _close(
            skip_entry_input(adapter, (skip[0], skip[1].to(device)), start, args, kwargs, device), seen):
        return True
    logger.warning(
        "i-SpaSP: %s.resume().skip does not reproduce the input of the layer's last block on the first calibration "
        "batch; every layer runs from its start for its last block instead (correct, but slower).",
        type(adapter).__name__,
    )
    return False


def _share_config(modules: list[nn.Module], old: Any, new: Any) -> None:
    """Point the pruned layers of a returned copy at the copy's config instead of the caller's model's."""
    if old is None or new is None or old is new:
        return
    for root in modules:
        for module in root.modules():
            config = getattr(module, "config", None)
            if config is old:
                module.config = new
            elif getattr(config, "__dict__", {}).get("_config") is old:  # a per-layer view (Phi-3 head counts)
                config.__dict__["_config"] = new


def _record_metadata(
    model: nn.Module, adapter: ModelAdapter, config: PrunerConfig, added_biases: list[str] | None = None,
    report: PruningReport | None = None, dense_widths: dict[str, Any] | None = None,
    flops_input: dict[str, list[int]] | None = None,
) -> None:
    """Write the width record (and how it was obtained) into ``model.config`` so ``save_pretrained`` keeps it.

    ``added_biases``: modules that the prune gave a bias (FLAP's compensation); ``load_pruned`` recreates them.
    ``report``, ``dense_widths`` (the adapter's widths before the prune), ``flops_input`` (input shapes of the FLOPs
    count): summarised for the model card (:func:`~hf_ispasp.record.summarize_prune`, merged with an earlier
    prune's), with the dense model's Hub id. Card fields set by the user are dropped: they described the
    model before this prune.
    """
    target = getattr(model, "config", None)
    previous = getattr(target, METADATA_KEY, None) if target is not None else getattr(model, "ispasp_metadata", None)
    previous = previous if isinstance(previous, dict) else {}
    record = {"version": __version__, "widths": adapter.widths(), "pruner_config": config.to_dict()}
    if added_biases:
        record[ADDED_BIASES_KEY] = sorted(added_biases)
    base_model = previous.get(BASE_MODEL_KEY) or _hub_id(model)
    if base_model:
        record[BASE_MODEL_KEY] = base_model
    if report is not None and report.budget:
        record["budget"] = {k: v for k, v in report.budget.items() if k != "widths"}  # widths: the record's own
    if report is not None:
        record[SUMMARY_KEY] = summarize_prune(report, dense_widths or {}, flops_input or {},
                                              previous.get(SUMMARY_KEY))
    if target is not None and hasattr(target, "to_dict"):
        setattr(target, METADATA_KEY, record)
        attach_portable_save(model)  # the plain save_pretrained writes a checkpoint loadable without hf_ispasp
    else:
        model.ispasp_metadata = record


def _hub_id(model: nn.Module) -> str | None:
    """The Hub id the dense model was loaded from (transformers ``_name_or_path``, timm ``hf_hub_id``), if any."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
    if not isinstance(name, str) or not looks_like_hub_id(name) or os.path.exists(os.path.expanduser(name)):
        return None
    return name
