"""Prunable groups as data: one :class:`GroupSpec` per kind of group in a layer, everything else derived once.

A spec answers, for one kind of group (attention heads, FFN neurons, CNN inner channels) in one layer:

- ``down``: the module whose input is the hidden representation ``H``; it loses input columns;
- ``outputs``: the modules that lose output rows with the group (projections, norms, depthwise convs, the expand
  conv of a squeeze-excitation);
- ``inputs``: further modules that lose input columns (the reduce conv of a squeeze-excitation);
- ``attrs``: attributes that follow the group count (head counts, BERT's ``all_head_size``, timm's ``attn_dim``);
- ``down_norm`` and ``im2col``: a BatchNorm after ``down`` that absorbs the re-fitted bias, and a k x k ``down``
  read as im2col rows.

Every sliced dimension has a row map (:attr:`Cut.sizes`): the dimension is a concatenation of segments, and
segment ``s`` holds one run of ``sizes[s]`` consecutive units per group, in group order. With ``d`` the head size
and ``r`` the query heads per key/value head:

- heads of a separate q, k or v projection (and of the output projection's input): ``Cut("query", d)``;
- timm's fused ``qkv`` (``[q | k | v]``): ``Cut.fused("qkv", d, 3)``, i.e. sizes ``(d, d, d)``;
- grouped-query attention, a group being one KV head: ``Cut("q_proj", r * d)`` (the query rows of the ``r`` heads
  that share KV head ``j``), ``Cut("k_proj", d)``, ``Cut("v_proj", d)``, ``Cut("o_proj", r * d)`` as ``down``;
- a fused grouped-query ``qkv_proj`` (Phi-3): ``Cut("qkv_proj", (r * d, d, d))``;
- a gated MLP: ``Cut("gate_proj")`` and ``Cut("up_proj")`` (sizes ``(1,)``); fused ``gate_up_proj``:
  ``Cut.fused("gate_up_proj", 1, 2)``;
- conv channels and what is cut along with them (BatchNorm, depthwise conv, squeeze-excitation convs): ``(1,)``.

:func:`compact_groups`, :func:`group_scores` and :func:`group_count` work on a spec and the layer module alone
(no adapter); :class:`SpecAdapter` derives the adapter hooks and the width record from ``group_specs(layer)``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..surgery import group_rows, slice_in, slice_out
from .base import ModelAdapter, PrunableBlock

__all__ = [
    "Attr",
    "Cut",
    "GroupSpec",
    "SpecAdapter",
    "attention_heads",
    "check_group_spec",
    "compact_groups",
    "fused_attention_heads",
    "get_module",
    "group_count",
    "group_scores",
    "neurons",
    "set_module",
    "units",
]

KINDS = ("heads", "ffn")


@dataclass(frozen=True)
class Cut:
    """A module sliced with the groups: ``path`` relative to the layer, ``sizes`` its row map (see the module doc).

    ``whole``: units after the grouped segments that every group shares and no cut removes (the key and value
    rows of Phi-3's fused ``qkv_proj`` when only query heads are pruned).
    """

    path: str
    sizes: tuple[int, ...] = (1,)
    whole: int = 0

    def __post_init__(self) -> None:
        sizes = (self.sizes,) if isinstance(self.sizes, int) else tuple(int(s) for s in self.sizes)
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"Cut({self.path!r}): sizes must be positive run lengths, got {self.sizes!r}")
        if self.whole < 0:
            raise ValueError(f"Cut({self.path!r}): whole must be >= 0, got {self.whole}")
        object.__setattr__(self, "sizes", sizes)

    def rows(self, groups: torch.Tensor, count: int) -> torch.Tensor:
        """Indices kept along the sliced dimension when ``groups`` of ``count`` stay."""
        index = group_rows(groups, count, self.sizes)
        if not self.whole:
            return index
        start = count * sum(self.sizes)
        return torch.cat([index, torch.arange(start, start + self.whole, dtype=index.dtype)])

    @classmethod
    def fused(cls, path: str, size: int, parts: int) -> Cut:
        """``parts`` equal segments, e.g. ``[q | k | v]`` (3) or ``[gate | up]`` (2)."""
        return cls(path, (size,) * parts)


@dataclass(frozen=True)
class Attr:
    """``module(path).name = count * per_group``; a string ``per_group`` names an attribute of the same module."""

    path: str
    name: str
    per_group: int | str = 1


def _cut(value: Cut | str) -> Cut:
    return value if isinstance(value, Cut) else Cut(value)


@dataclass(frozen=True)
class GroupSpec:
    """One kind of prunable group in one layer; paths are relative to the layer module.

    Args:
        name: Block name in reports and ``layer_overrides`` (``"layer.3.attention"``).
        kind: ``"heads"`` (budget ``head_keep_ratio``) or ``"ffn"`` (``ffn_keep_ratio``).
        down: The module whose input is ``H``, cut on its input side; ``sum(down.sizes)`` units per group.
        outputs: Modules cut on their output side (strings mean ``Cut(path)``).
        inputs: Modules other than ``down`` cut on their input side.
        attrs: Attributes set from the kept count.
        down_norm: A BatchNorm right after a bias-free ``down``: the re-fitted bias folds into its running mean.
        im2col: ``down`` is a k x k conv read as im2col rows (a group is ``k * k`` columns of ``H`` per channel).
        partitions: The groups fall into this many equal contiguous runs, each keeping as many groups as the
            others (query heads inside each key/value head); the selection enforces it.
    """

    name: str
    kind: str
    down: Cut
    outputs: tuple[Cut, ...] = ()
    inputs: tuple[Cut, ...] = ()
    attrs: tuple[Attr, ...] = ()
    down_norm: str | None = None
    im2col: bool = False
    partitions: int = 1

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"GroupSpec {self.name!r}: partitions must be >= 1, got {self.partitions}")
        if self.kind not in KINDS:
            raise ValueError(f"GroupSpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "down", _cut(self.down))
        object.__setattr__(self, "outputs", tuple(_cut(c) for c in self.outputs))
        object.__setattr__(self, "inputs", tuple(_cut(c) for c in self.inputs))
        object.__setattr__(self, "attrs", tuple(self.attrs))

    @property
    def group_size(self) -> int:
        """Input units of ``down`` per group (the block's columns of ``H``; with ``im2col`` times ``k * k``)."""
        return sum(self.down.sizes)


# Common shapes ------------------------------------------------------------------------------------------------
def attention_heads(
    name: str, out: str, q: str, k: str, v: str, head_dim: int, q_per_kv: int = 1, attrs: tuple[Attr, ...] = ()
) -> GroupSpec:
    """Heads of separate q/k/v projections; with ``q_per_kv > 1`` (grouped-query) a group is one KV head.

    Removing KV group ``j`` removes its ``q_per_kv`` query heads (rows of ``q`` and columns of ``out``) and its
    key and value head.
    """
    width = q_per_kv * head_dim
    return GroupSpec(name, "heads", Cut(out, width), (Cut(q, width), Cut(k, head_dim), Cut(v, head_dim)),
                     attrs=attrs)


def fused_attention_heads(
    name: str, out: str, qkv: str, head_dim: int, q_per_kv: int = 1, attrs: tuple[Attr, ...] = ()
) -> GroupSpec:
    """Heads of one fused ``[q | k | v]`` projection (timm ``qkv``; Phi-3 ``qkv_proj`` with ``q_per_kv``)."""
    width = q_per_kv * head_dim
    return GroupSpec(name, "heads", Cut(out, width), (Cut(qkv, (width, head_dim, head_dim)),), attrs=attrs)


def neurons(name: str, down: str, *ups: Cut | str, attrs: tuple[Attr, ...] = ()) -> GroupSpec:
    """FFN neurons: ``ups`` produce the hidden units (``fc1``; ``gate_proj, up_proj``; a fused ``gate_up_proj``)."""
    return GroupSpec(name, "ffn", Cut(down), tuple(ups), attrs=attrs)


# Modules by path ----------------------------------------------------------------------------------------------
def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root`` followed along a dotted path (digits index ``ModuleList`` / ``Sequential``); ``""`` is ``root``."""
    module = root
    for part in path.split(".") if path else ():
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, value)


def units(module: nn.Module, output: bool) -> int:
    """Size of the dimension a cut slices: output or input features / channels."""
    if isinstance(module, nn.Linear):
        return module.out_features if output else module.in_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1 if output else 0]
    if isinstance(module, nn.Conv2d):
        return module.out_channels if output else module.in_channels
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    vectors = [t for t in tensors if t.dim() == 1]
    if not output or not vectors:
        raise TypeError(f"cannot slice the {'outputs' if output else 'inputs'} of a {type(module).__name__}")
    return vectors[0].shape[0]


def _unit_scores(module: nn.Module, output: bool) -> torch.Tensor | None:
    """Squared L2 per unit of every weight removed with it (bias included); ``None`` for norms (no projection)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    squares = weight.detach().float().pow(2)
    if isinstance(module, Conv1D):
        squares = squares.t()
    if output:
        scores = squares.reshape(squares.shape[0], -1).sum(1)
        bias = getattr(module, "bias", None)
        return scores if bias is None else scores + bias.detach().float().pow(2)
    return squares.transpose(0, 1).reshape(squares.shape[1], -1).sum(1)


def _per_group(scores: torch.Tensor, count: int, sizes: tuple[int, ...]) -> torch.Tensor:
    total, offset = torch.zeros(count, dtype=scores.dtype, device=scores.device), 0
    for size in sizes:
        total += scores[offset : offset + count * size].reshape(count, size).sum(-1)
        offset += count * size
    return total


def _checked(root: nn.Module, spec: GroupSpec, cut: Cut, count: int, output: bool) -> nn.Module:
    """The module of ``cut``, after checking that its sliced dimension has ``count`` groups of its row map."""
    module = get_module(root, cut.path)
    found, expected = units(module, output), count * sum(cut.sizes) + cut.whole
    if found != expected:
        side = "output" if output else "input"
        raise ValueError(
            f"{spec.name}: {cut.path} has {found} {side} units but {count} groups of {cut.sizes} make {expected}; "
            "the group spec does not describe this module"
        )
    return module


# Derived once -------------------------------------------------------------------------------------------------
def group_count(root: nn.Module, spec: GroupSpec) -> int:
    """Current number of groups: ``down``'s input units over the units per group."""
    found = units(get_module(root, spec.down.path), output=False)
    if found % spec.group_size:
        raise ValueError(f"{spec.name}: {spec.down.path} has {found} inputs, not a multiple of {spec.group_size}")
    return found // spec.group_size


def _cuts(spec: GroupSpec) -> list[tuple[Cut, bool]]:
    """Every cut with its side (``True``: output rows), ``down`` last."""
    return [(cut, True) for cut in spec.outputs] + [(cut, False) for cut in (*spec.inputs, spec.down)]


def check_group_spec(root: nn.Module, spec: GroupSpec) -> int:
    """The number of groups, after checking that every cut of ``spec`` has that many groups of its row map."""
    count = group_count(root, spec)
    for cut, output in _cuts(spec):
        _checked(root, spec, cut, count, output)
    return count


def compact_groups(root: nn.Module, spec: GroupSpec, groups: torch.Tensor) -> None:
    """Keep only ``groups`` (sorted group indices) of ``spec`` in the layer ``root``, in place."""
    count = check_group_spec(root, spec)  # every shape checked before the first slice
    groups = torch.as_tensor(groups, dtype=torch.long).cpu()
    if groups.numel() == 0 or int(groups.min()) < 0 or int(groups.max()) >= count:
        raise ValueError(f"{spec.name}: kept groups must be a non-empty subset of 0..{count - 1}, got {groups}")
    for cut, output in _cuts(spec):
        module, index = get_module(root, cut.path), cut.rows(groups, count)
        new = slice_out(module, index) if output else slice_in(module, index)
        if new is not module:
            set_module(root, cut.path, new)
    for attr in spec.attrs:
        module = get_module(root, attr.path)
        per_group = getattr(module, attr.per_group) if isinstance(attr.per_group, str) else attr.per_group
        setattr(module, attr.name, len(groups) * int(per_group))


def group_scores(root: nn.Module, spec: GroupSpec) -> torch.Tensor:
    """Per-group squared L2 of every projection weight (and output-side bias) removed with the group."""
    count = group_count(root, spec)
    total = None
    for cut, output in _cuts(spec):
        scores = _unit_scores(_checked(root, spec, cut, count, output), output)
        if scores is not None:
            part = _per_group(scores, count, cut.sizes)
            total = part if total is None else total + part.to(total.device)
    return total


def _is_batch_norm(module: nn.Module | None) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None


class SpecAdapter(ModelAdapter):
    """An adapter whose layers are described by :class:`GroupSpec` lists; subclasses add ``group_specs``.

    The width record: with ``RECORD_KINDS`` (one group of each kind per layer) it is
    ``{"format", <kind>: [count per layer], ...}``, otherwise ``{"format", "layers": [[count per block]]}``;
    ``record_extras`` adds informative fields.
    """

    WIDTHS_FORMAT: ClassVar[str]
    RECORD_KINDS: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def group_specs(self, layer: int) -> list[GroupSpec]:
        """Specs of ``layer``'s prunable groups in forward order."""

    def spec(self, block: PrunableBlock) -> GroupSpec:
        for spec in self.group_specs(block.layer):
            if spec.name == block.name:
                return spec
        raise KeyError(f"no prunable block {block.name!r} in layer {block.layer}")

    def blocks(self, layer: int) -> list[PrunableBlock]:
        root, result = self.layers()[layer], []
        for spec in self.group_specs(layer):
            down = get_module(root, spec.down.path)
            columns = spec.group_size
            if isinstance(down, nn.Conv2d) and tuple(down.kernel_size) != (1, 1):
                if not spec.im2col:
                    raise ValueError(f"{spec.name}: a {down.kernel_size} conv as down needs im2col=True")
                columns *= down.kernel_size[0] * down.kernel_size[1]
            count = group_count(root, spec)
            if count % spec.partitions:
                raise ValueError(f"{spec.name}: {count} groups do not split into {spec.partitions} equal runs")
            result.append(PrunableBlock(spec.name, spec.kind, layer, down, columns, count, spec.partitions))
        return result

    def current_down(self, block: PrunableBlock) -> nn.Module:
        return get_module(self.layers()[block.layer], self.spec(block).down.path)

    def compact(self, block: PrunableBlock, groups: torch.Tensor) -> None:
        compact_groups(self.layers()[block.layer], self.spec(block), groups)
        self.after_compact(block.layer)

    def after_compact(self, layer: int) -> None:
        """Update what follows several group counts at once (an ``Attr`` follows one); called after every cut."""

    def record_specs(self, layer: int) -> list[GroupSpec]:
        """The specs whose counts the width record holds (``group_specs`` unless an option changes those)."""
        return self.group_specs(layer)

    def apply_record_extras(self, layer: int, record: Mapping[str, Any]) -> None:
        """Reshape ``layer`` to what the record holds beyond the spec counts (before the counts are applied)."""

    def weight_scores(self, block: PrunableBlock) -> torch.Tensor:
        return group_scores(self.layers()[block.layer], self.spec(block))

    # Statistics ---------------------------------------------------------------------------------------------
    def hidden_rows(
        self, block: PrunableBlock, hidden: torch.Tensor, token_mask: torch.Tensor | None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        down = self.current_down(block)
        if not isinstance(down, nn.Conv2d):
            return super().hidden_rows(block, hidden, token_mask, index)
        if self.spec(block).im2col:
            cols = F.unfold(hidden, down.kernel_size, dilation=down.dilation, padding=down.padding, stride=down.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])

    def output_weight(self, block: PrunableBlock) -> torch.Tensor:
        weight = self.current_down(block).weight
        if isinstance(self.current_down(block), Conv1D):
            return weight.t()
        return weight.reshape(weight.shape[0], -1)

    def _down_norm(self, block: PrunableBlock) -> nn.Module | None:
        path = self.spec(block).down_norm
        norm = get_module(self.layers()[block.layer], path) if path else None
        return norm if _is_batch_norm(norm) else None

    def output_bias(self, block: PrunableBlock) -> torch.Tensor | None:
        down = self.current_down(block)
        if down.bias is None and self._down_norm(block) is not None:
            rows = self.output_weight(block).shape[0]
            return torch.zeros(rows, dtype=down.weight.dtype, device=down.weight.device)
        return down.bias

    def set_output_projection(self, block: PrunableBlock, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        down = self.current_down(block)
        with torch.no_grad():
            target = down.weight.t() if isinstance(down, Conv1D) else down.weight
            target.copy_(weight.reshape(target.shape).to(target.dtype))
            if bias is None:
                return
            if down.bias is not None:
                down.bias.copy_(bias.to(down.bias.dtype))
            elif (norm := self._down_norm(block)) is not None:
                # BN(x + b) == BN with running_mean - b (eval mode): the projection keeps no bias.
                norm.running_mean.sub_(bias.to(norm.running_mean.device, norm.running_mean.dtype))

    # Width record -------------------------------------------------------------------------------------------
    def record_extras(self) -> dict[str, Any]:
        """Informative fields of the width record (not read back)."""
        return {}

    def widths(self) -> dict[str, Any]:
        layers = self.layers()
        counts = [[(s.kind, group_count(layers[i], s)) for s in self.record_specs(i)] for i in range(len(layers))]
        record: dict[str, Any] = {"format": self.WIDTHS_FORMAT, **self.record_extras()}
        if not self.RECORD_KINDS:
            return {**record, "layers": [[n for _, n in layer] for layer in counts]}
        for layer, blocks in enumerate(counts):
            if [k for k, _ in blocks] != list(self.RECORD_KINDS):
                raise ValueError(f"layer {layer} has blocks {blocks}, not one of each of {self.RECORD_KINDS}")
        for position, kind in enumerate(self.RECORD_KINDS):
            record[kind] = [blocks[position][1] for blocks in counts]
        return record

    def record_counts(self, record: Mapping[str, Any]) -> list[list[int]]:
        """Per layer, the recorded count of each block in ``blocks()`` order."""
        if record.get("format") != self.WIDTHS_FORMAT:
            raise ValueError(f"width record format {record.get('format')!r} is not {self.WIDTHS_FORMAT!r}")
        count = len(self.layers())
        if self.RECORD_KINDS:
            missing = [kind for kind in self.RECORD_KINDS if not isinstance(record.get(kind), list)]
            if missing:
                raise ValueError(f"width record {self.WIDTHS_FORMAT!r} has no per-layer list for {missing}")
            lengths = {len(record[kind]) for kind in self.RECORD_KINDS}
            layers = [[record[kind][i] for kind in self.RECORD_KINDS] for i in range(min(lengths))]
        else:
            layers, lengths = list(record.get("layers") or []), {len(record.get("layers") or [])}
        if lengths != {count}:
            raise ValueError(
                f"width record covers {'/'.join(map(str, sorted(lengths)))} layers but the model has {count}: "
                "the checkpoint's config does not match its pruning metadata"
            )
        return layers

    def apply_widths(self, record: Mapping[str, Any]) -> None:
        for index, widths in enumerate(self.record_counts(record)):
            self.apply_record_extras(index, record)
            root, specs = self.layers()[index], self.record_specs(index)
            if len(widths) != len(specs):
                raise ValueError(f"layer {index}: record has {len(widths)} prunable blocks, the model {len(specs)}")
            for spec, width in zip(specs, widths, strict=True):
                count = group_count(root, spec)
                if not 1 <= int(width) <= count:
                    raise ValueError(f"{spec.name}: recorded width {width} is outside 1..{count}")
                if int(width) != count:
                    compact_groups(root, spec, torch.arange(int(width)))
                    self.after_compact(index)
