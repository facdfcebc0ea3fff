"""`PrunerConfig`: every knob of a prune, validated up front and serialisable to JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

SELECTIONS = (
    "ispasp", "random", "weight_magnitude", "activation", "output_energy", "taylor", "wanda_sp", "flap", "llm_pruner",
)
PROXIES = ("sum", "l2")
THRESHOLDS = ("sum", "l2", "output", "residual", "refit")
CACHES = ("auto", "device", "cpu", "disk", "memory")
SELECTION_DTYPES = ("auto", "float64", "float32")
STATS_DTYPES = ("float32", "float64")
GQA_GROUPS = ("kv", "query")
ALLOCATIONS = ("uniform", "global")  # as hf_ispasp.allocation.ALLOCATIONS (config imports nothing of the engine)
TARGETS = ("flops_keep_ratio", "params_keep_ratio", "latency_keep_ratio")
_OVERRIDE_KEYS = ("ffn_keep_ratio", "head_keep_ratio")


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ValueError(
            f"{name}={value!r} is out of range: a keep ratio is the fraction of groups to keep, 0 < ratio <= 1 "
            f"(1.0 keeps everything). Pass e.g. {name}=0.5."
        )


def _plain(value: Any) -> Any:
    """numpy / other numeric scalars as Python ``int`` / ``float`` (so checks and JSON treat them alike)."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, numbers.Integral) and type(value) is not int:
        return int(value)
    if isinstance(value, numbers.Real) and type(value) is not float and not isinstance(value, numbers.Integral):
        return float(value)
    return value


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}.")


@dataclass
class PrunerConfig:
    """Settings of an i-SpaSP prune (Wolfe & Kyrillidis, "i-SpaSP: Structured Neural Pruning via Sparse
    Signal Recovery", arXiv:2112.04905).

    The defaults (`proxy="l2"`, `threshold="refit"`, `refit=True`) were chosen by measurement on MiniLM-L6
    fine-tuned for sentence polarity (see BENCHMARKS.md, "Default rule"): the re-fit-aware threshold gave the
    lowest KL to the dense model at both budgets measured, for about 1 s of extra selection per FFN block.
    `threshold="output"` is the fast alternative; `proxy="sum"`, `threshold="sum"`, `refit=False` is the
    paper-faithful variant.

    Args:
        ffn_keep_ratio: Fraction of FFN neurons (CNN inner channels) kept in every layer.
        head_keep_ratio: Fraction of attention heads kept in every layer.
        num_iterations: Maximum i-SpaSP iterations per block; stops early once the support is stable.
        selection: Selection rule. `ispasp` is the algorithm; the others are baselines sharing the engine:
            `random`, `weight_magnitude`, `activation` (L2 norm of the group's hidden units), `output_energy`,
            `taylor` (Molchanov et al., first-order Taylor of the task loss on the hidden units), and the LLM
            baselines `wanda_sp` (structured Wanda, as evaluated by An et al., AAAI 2024), `flap` (FLAP's
            fluctuation metric with its bias compensation; An et al., AAAI 2024) and `llm_pruner` (LLM-Pruner's
            first-order Taylor importance of the group's weights; Ma et al., NeurIPS 2023); see
            `hf_ispasp.baselines` and `hf_ispasp.importance`. `taylor` and `llm_pruner` run one backward pass of
            the dense model per calibration batch and need labels, except on a causal language model, where
            the labels are the input ids (padding ignored). `flap` adds a bias to a bias-free output projection
            (recorded in the checkpoint, recreated by `load_pruned`); with `refit=True` the (validated) re-fit,
            which re-fits that bias too, replaces FLAP's compensation wherever a re-fit is installed. Compare the
            baselines with `refit=False` to measure the published rules.
        proxy: How the residual gradient is aggregated per group: `sum` (paper) or `l2` over samples.
        threshold: Score used to cut the merged support back to `s` groups: `sum` of activations (paper),
            `l2` norm of activations, `output` energy of the group's contribution to the block output, or
            `residual`: backward elimination on the merged support with the exact residual, or `refit`:
            elimination scored by the residual after the least-squares re-fit (structured OBS step).
        refit: Re-fit the output projection on the kept groups by (ridge) least squares from the
            calibration statistics, bias included.
        refit_damping: Ridge term of the re-fit when `refit_validation=False`, relative to the mean variance of
            the kept hidden units (pulls the re-fit towards zero). With validation (the default) it is one more
            candidate of the held-out grid (`hf_ispasp.algorithm.REFIT_RIDGES`, then relative to the mean
            variance of all the block's columns and pulling towards the original weights).
        refit_validation: Choose the re-fit ridge on two halves of the calibration data (each sequence goes to a
            half by a hash of its content: fit on one, measure on the other, both ways below 2 tokens per column
            of the block and once from there) and skip the re-fit of a block where no ridge beats plain
            selection on held-out data. Without it, small calibration sets (fewer tokens than
            a block has columns) make the least-squares re-fit interpolate them and destroy the model. The
            `refit` threshold then uses the validated ridge, or the `residual` threshold where the re-fit does
            not help; with `refit` its support must also beat the `residual` one on held-out data where the block
            has fewer than 4 tokens per column (`hf_ispasp.algorithm.TRUSTED_SUPPORT_ROWS_PER_COLUMN`), a second
            validation. `False` restores the fixed-ridge re-fit of earlier versions.
        layer_overrides: Per-layer keep ratios, e.g. `{0: {"ffn_keep_ratio": 0.8}}`.
        round_to: Round kept FFN widths to a multiple of this (e.g. 8) for fast kernels.
        calibration_batch_size: Batch size used when calibration data is a `datasets.Dataset`.
        group_by_length: Sort right-padded token sequences by length and re-batch them (as many per batch as the
            largest batch given) before calibrating, so the layers replay little padding: the statistics count
            real tokens only, so only their rounding changes, while the layer replays of data padded per batch
            can cost half as much (`hf_ispasp.packing`). Left-padded or otherwise unusual batches are used as
            given.
        max_calibration_samples: Use at most this many calibration sequences (None: all). Applied to the data
            each process sees; under several processes cap before sharding (`hf_ispasp.distributed`).
        stats_dtype: Dtype of the per-batch statistic products (float32 products run in IEEE precision, never
            TF32). They are accumulated on the layer's device in float64 (Kahan-compensated float32 where the
            device has no float64).
        activation_cache: Where layer inputs wait between layers: `auto` uses device memory (up to half of what
            is free), then pinned CPU memory, then disk, and logs each choice; `device` (alias `memory`), `cpu`
            and `disk` force one.
        selection_dtype: Precision of the selection and its held-out validation, run on the statistics' device.
            `auto` (default): the selection in float64 and the held-out validation of the re-fit (about half the
            selection time) in float32 for a block calibrated on at least 2 rows (tokens, pixel positions) per
            column, in float64 below; measured to keep the groups of an all-float64 selection on every well-posed
            test model (`hf_ispasp.algorithm.selection_precision`). `float64`: everything as the CPU reference;
            `float32`: everything in float32 (fastest; may order near-equal groups differently). A float32
            factorisation that fails is redone in float64. The re-fitted weights come from the float64
            statistics whatever this says, so an equal selection gives the same pruned model: bit for bit where
            the selection runs in float64 (`auto` included), to rounding with `float32` (a fresh float64 solve
            instead of the float64 elimination's own coefficients).
        seed: Seed for the `random` rule and any tie-breaking.
        show_progress: Show tqdm progress bars.
        gqa_groups: What a group of a grouped-query attention layer is. `kv` (default): one key/value head together
            with its query heads; `head_keep_ratio` is then the fraction of KV heads kept (whole KV groups are
            removed, the query heads per KV head are unchanged). `query`: one query head; every KV head is kept
            and `head_keep_ratio` is the fraction of query heads kept, the same number inside each KV group. On
            multi-head attention (no GQA) both mean heads.
        flops_keep_ratio: Keep this fraction of the model's forward FLOPs instead of fixed keep ratios per kind.
            FLOPs are counted at the adapter's reference input (`adapter.example_inputs()`: one sequence of 128
            tokens for text models, capped by the position embeddings; one image at the model's input size) by
            torch's FlopCounterMode, attention included; the embeddings and the task head count too, so the
            smallest reachable value is above 0 (an unreachable target is an error that names it).
            `ffn_keep_ratio` and `head_keep_ratio` are then not used.
        params_keep_ratio: The same for the number of parameters.
        latency_keep_ratio: The same for the latency of one forward at the reference input, measured on the model's
            device: a latency table per layer shape (each block cut to a grid of widths, timed interleaved with the
            dense layer; cached per device, see `hf_ispasp.latency_budget`), FFN/channel widths in multiples of
            sizes that run fast there (8 on CPUs, 64 on GPUs). At most one of the three targets.
        allocation: How a target is spread over the blocks. `global` (the default with a target): per-block widths
            that minimise the predicted output error under the target, by water-filling on every block's
            residual-versus-kept-groups curve (measured on the dense model's calibration statistics, each error
            relative to the energy of the hidden states the block adds to); `uniform`: the same keep ratio in
            every block, the largest that meets the target.
    """

    ffn_keep_ratio: float = field(default=0.5, metadata={"help": "Fraction of FFN neurons kept per layer."})
    head_keep_ratio: float = field(default=0.75, metadata={"help": "Fraction of attention heads kept per layer."})
    num_iterations: int = field(default=20, metadata={"help": "Maximum i-SpaSP iterations per block."})
    selection: str = field(default="ispasp", metadata={"help": f"Selection rule, one of {SELECTIONS}."})
    proxy: str = field(default="l2", metadata={"help": f"Residual-gradient aggregation, one of {PROXIES}."})
    threshold: str = field(default="refit", metadata={"help": f"Support threshold score, one of {THRESHOLDS}."})
    refit: bool = field(default=True, metadata={"help": "Least-squares re-fit of the output projection."})
    refit_damping: float = field(default=1e-4, metadata={"help": "Relative ridge term of the re-fit."})
    refit_validation: bool = field(
        default=True, metadata={"help": "Choose the re-fit ridge (or no re-fit) on held-out calibration halves."}
    )
    layer_overrides: dict[int, dict[str, float]] = field(
        default_factory=dict, metadata={"help": "Per-layer keep ratios: {layer: {'ffn_keep_ratio': r}}."}
    )
    round_to: int = field(default=1, metadata={"help": "Round kept FFN widths to a multiple of this."})
    calibration_batch_size: int = field(default=16, metadata={"help": "Batch size for a datasets.Dataset."})
    group_by_length: bool = field(
        default=True, metadata={"help": "Regroup right-padded calibration sequences by length (less padding)."}
    )
    max_calibration_samples: int | None = field(default=None, metadata={"help": "Cap on calibration sequences."})
    stats_dtype: str = field(default="float32", metadata={"help": f"Per-batch statistics dtype, {STATS_DTYPES}."})
    activation_cache: str = field(default="auto", metadata={"help": f"Layer-input cache, one of {CACHES}."})
    selection_dtype: str = field(
        default="auto", metadata={"help": f"Precision of the selection, one of {SELECTION_DTYPES}."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for random selection and tie-breaking."})
    show_progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})
    gqa_groups: str = field(
        default="kv",
        metadata={"help": f"Grouped-query attention groups, one of {GQA_GROUPS}: whole KV heads with their query "
                          "heads ('kv'), or query heads, equally many per KV head ('query')."},
    )

    flops_keep_ratio: float | None = field(
        default=None, metadata={"help": "Keep this fraction of the forward FLOPs (at the reference input)."}
    )
    params_keep_ratio: float | None = field(default=None, metadata={"help": "Keep this fraction of the parameters."})
    latency_keep_ratio: float | None = field(
        default=None, metadata={"help": "Keep this fraction of the measured latency on the current device."}
    )
    allocation: str | None = field(
        default=None,
        metadata={"help": f"How a FLOPs/params target is spread over blocks, one of {ALLOCATIONS} (default "
                          "'global' when a target is given)."},
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _plain(getattr(self, f.name)))
        if isinstance(self.layer_overrides, dict):
            self.layer_overrides = {
                _plain(k): ({kk: _plain(v) for kk, v in vals.items()} if isinstance(vals, dict) else vals)
                for k, vals in self.layer_overrides.items()
            }
        for name in ("refit", "show_progress", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**63), e.g. seed=0.")
        _check_ratio("ffn_keep_ratio", self.ffn_keep_ratio)
        _check_ratio("head_keep_ratio", self.head_keep_ratio)
        iterations = self.num_iterations
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations!r} must be an integer >= 1 (the paper uses 20).")
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("proxy", self.proxy, PROXIES)
        _check_choice("threshold", self.threshold, THRESHOLDS)
        _check_choice("stats_dtype", self.stats_dtype, STATS_DTYPES)
        _check_choice("activation_cache", self.activation_cache, CACHES)
        _check_choice("selection_dtype", self.selection_dtype, SELECTION_DTYPES)
        _check_choice("gqa_groups", self.gqa_groups, GQA_GROUPS)
        damping = self.refit_damping
        if isinstance(damping, bool) or not (isinstance(damping, (int, float)) and math.isfinite(damping)) or (
            self.refit_damping < 0
        ):
            raise ValueError(f"refit_damping={self.refit_damping!r} must be a finite number >= 0.")
        if not isinstance(self.refit_validation, bool):
            raise ValueError(f"refit_validation={self.refit_validation!r} must be True or False.")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to={self.round_to!r} must be an integer >= 1 (1 disables rounding).")
        if isinstance(self.calibration_batch_size, bool) or not isinstance(self.calibration_batch_size, int) or (
            self.calibration_batch_size < 1
        ):
            raise ValueError(f"calibration_batch_size={self.calibration_batch_size!r} must be an integer >= 1.")
        if self.max_calibration_samples is not None and (
            isinstance(self.max_calibration_samples, bool) or not isinstance(self.max_calibration_samples, int)
            or self.max_calibration_samples < 1
        ):
            raise ValueError(f"max_calibration_samples={self.max_calibration_samples!r} must be None or >= 1.")
        if not isinstance(self.layer_overrides, dict):
            raise ValueError(f"layer_overrides must be a dict {{layer_index: {{...}}}}, got {self.layer_overrides!r}.")
        overrides: dict[int, dict[str, float]] = {}
        for layer, values in self.layer_overrides.items():
            try:
                index = int(layer)  # JSON turns keys into strings
            except (TypeError, ValueError):
                raise ValueError(f"layer_overrides key {layer!r} must be a layer index (int).") from None
            if index < 0:
                raise ValueError(f"layer_overrides key {layer!r} must be a non-negative layer index.")
            if not isinstance(values, dict):
                raise ValueError(f"layer_overrides[{layer!r}] must be a dict such as {{'ffn_keep_ratio': 0.5}}.")
            for key, value in values.items():
                if key not in _OVERRIDE_KEYS:
                    raise ValueError(f"layer_overrides[{layer!r}] has unknown key {key!r}; allowed: {_OVERRIDE_KEYS}.")
                _check_ratio(f"layer_overrides[{layer!r}][{key!r}]", value)
            overrides[index] = dict(values)
        self.layer_overrides = overrides
        targets = [name for name in TARGETS if getattr(self, name) is not None]
        for name in targets:
            _check_ratio(name, getattr(self, name))
        if len(targets) > 1:
            raise ValueError(f"give one budget target, not {' and '.join(targets)}")
        if self.allocation is not None:
            _check_choice("allocation", self.allocation, ALLOCATIONS)
            if not targets:
                raise ValueError(f"allocation={self.allocation!r} spreads a target over the blocks: also give "
                                 "flops_keep_ratio, params_keep_ratio or latency_keep_ratio (or leave allocation "
                                 "unset)")
        if targets and self.layer_overrides:
            raise ValueError(f"{targets[0]} chooses the width of every layer itself; drop layer_overrides (or the "
                             "target and give per-kind ratios)")

    @property
    def budget_target(self) -> tuple[str, float] | None:
        """``(metric, keep ratio)`` (``flops``, ``params`` or ``latency``) when a target replaces the per-kind
        ratios, else ``None``."""
        for name in TARGETS:
            if getattr(self, name) is not None:
                return name.removesuffix("_keep_ratio"), float(getattr(self, name))
        return None

    @property
    def budget_allocation(self) -> str:
        """The allocation a target uses (``global`` unless set)."""
        return self.allocation or "global"

    def keep_ratio(self, layer: int, kind: str) -> float:
        """Keep ratio of `kind` ("ffn" or "heads") in `layer`, overrides included."""
        key = "ffn_keep_ratio" if kind == "ffn" else "head_keep_ratio"
        return float(self.layer_overrides.get(layer, {}).get(key, getattr(self, key)))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layer_overrides"] = {str(k): v for k, v in self.layer_overrides.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunerConfig:
        """Build from a dict, warning on (and ignoring) keys written by a newer version."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown PrunerConfig keys %s (written by a newer hf_ispasp?).", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PrunerConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def kept_count(num_groups: int, ratio: float, round_to: int = 1, partitions: int = 1) -> int:
    """Groups kept for a ratio: at least one, rounded to a multiple of ``round_to`` when that is possible.

    With ``partitions`` > 1 the groups fall into that many equal runs that must keep equally many (query heads per
    key/value head): ``partitions * kept_count(num_groups // partitions, ratio, round_to)``, at least one per run.
    """
    if partitions > 1:
        if num_groups % partitions:
            raise ValueError(f"{num_groups} groups do not split into {partitions} equal runs")
        return partitions * kept_count(num_groups // partitions, ratio, round_to)
    keep = max(1, round(ratio * num_groups))
    if round_to > 1 and num_groups >= round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return min(num_groups, keep)
