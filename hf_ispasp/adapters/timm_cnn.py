"""Adapters for timm CNNs: inverted residuals (EfficientNet, MobileNetV2/V3), ResNet blocks, ConvNeXt MLPs.

Groups are the inner channels of a block (they play the role of FFN neurons, so ``ffn_keep_ratio`` sets their
budget); the residual stream keeps its width. ``H`` is the input of the block's last projection:

- inverted residual: the output of the depthwise stage (after norm, activation and squeeze-excitation), which
  feeds the 1x1 projection ``conv_pwl``; slicing touches ``conv_pw``, ``bn1``, ``conv_dw``, ``bn2``, the SE
  convs and the input channels of ``conv_pwl``. Blocks without an expansion conv are not prunable.
- ResNet ``BasicBlock``: the input of the 3x3 ``conv2``, read as im2col rows (``F.unfold``), so each channel is
  a group of ``k*k`` columns and ``W = conv2.weight.reshape(out, C*k*k)``: the algorithm applies unchanged,
  as in the paper's ResNet34 experiment. ``Bottleneck``: two blocks, the channels between ``conv1`` and the
  3x3 ``conv2`` (im2col again), then the channels between ``conv2`` and ``conv3`` (1x1).
- ConvNeXt: the hidden channels of each block's MLP (``mlp.fc1`` -> ``mlp.fc2``).

A "layer" (the key of ``PrunerConfig.layer_overrides``) is one timm block in forward order
(``model.blocks`` / ``model.layerN`` flattened) for EfficientNet, MobileNet and ResNet, and one stage for
ConvNeXt (its down-sampling sits between stages, outside the blocks). Projections followed by BatchNorm have no
bias: the re-fit's bias shift is folded into that BatchNorm's ``running_mean`` (exact in eval mode).

Not prunable (skipped, they keep their width): depthwise-separable, edge-residual and CondConv blocks, grouped
convolutions (ResNeXt), blocks with anti-aliasing between the pruned channels and the projection, and ConvNeXt
MLPs with a hidden norm (ConvNeXt-V2's GRN). With squeeze-excitation the gate is recomputed from the kept
channels only, so a compacted SE block deviates slightly from what the statistics predicted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from timm.models.convnext import ConvNeXtBlock
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from ..surgery import slice_conv_in, slice_conv_out, slice_linear_in, slice_linear_out, slice_norm
from .base import ModelAdapter, PrunableBlock, register_adapter

__all__ = ["ConvNeXtAdapter", "EfficientNetAdapter", "ResNetAdapter", "TimmCNNAdapter", "TimmImageMixin"]

WIDTHS_FORMAT = "hf_ispasp.timm_cnn/1"


class TimmImageMixin:
    """Calibration and example inputs of timm image models (images in, hidden states between blocks)."""

    model: nn.Module

    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[tuple, dict[str, Any], torch.Tensor | None]:
        from .inputs import image_tensor

        images = image_tensor(batch, device)
        dtype = next(self.model.parameters()).dtype
        return (images.to(dtype),), {}, None

    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) used for FLOPs counting: timm's ``pretrained_cfg['input_size']`` (set it to change it)."""
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return tuple(cfg.get("input_size", (3, 224, 224)))

    def example_inputs(self, batch_size: int = 1, seq_len: int = 128) -> torch.Tensor:
        channels, height, width = self.input_size()
        generator = torch.Generator().manual_seed(0)
        dtype = next(self.model.parameters()).dtype
        return torch.randn(batch_size, channels, height, width, generator=generator).to(dtype)

    def create_kwargs(self) -> dict[str, Any]:
        """Arguments for ``timm.create_model(architecture, **kwargs)`` that rebuild the dense skeleton."""
        kwargs = dict(getattr(self.model, "ispasp_timm_kwargs", None) or {})
        kwargs["num_classes"] = int(getattr(self.model, "num_classes", 1000))
        return kwargs


@dataclass
class _Unit:
    """One prunable group of channels: modules sliced on their output side, SE, and the projection ``down``."""

    name: str
    parent: nn.Module
    producers: list[str]  # attribute paths (relative to parent) sliced on the output side, in order
    down: str  # attribute path of the projection, sliced on the input side
    se: str | None = None
    next_norm: str | None = None  # BatchNorm right after ``down`` (bias folding)
    im2col: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, path: str) -> nn.Module:
        module = self.parent
        for part in path.split("."):
            module = getattr(module, part)
        return module

    def set(self, path: str, value: nn.Module) -> None:
        owner, _, name = path.rpartition(".")
        setattr(self.get(owner) if owner else self.parent, name, value)


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _is_bn(module: nn.Module | None) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None


class TimmCNNAdapter(TimmImageMixin, ModelAdapter):
    """Shared machinery: subclasses list the units of each layer; slicing, widths and statistics live here."""

    def units(self, layer: int) -> list[_Unit]:
        raise TypeError(f"{type(self).__name__} does not define units()")

    # Structure ---------------------------------------------------------------------------------------
    def blocks(self, layer: int) -> list[PrunableBlock]:
        result = []
        for unit in self.units(layer):
            down = unit.get(unit.down)
            group = down.kernel_size[0] * down.kernel_size[1] if unit.im2col else 1
            width = down.in_features if isinstance(down, nn.Linear) else down.in_channels
            result.append(PrunableBlock(unit.name, "ffn", layer, down, group, width))
        return result

    def _unit(self, block: PrunableBlock) -> _Unit:
        for unit in self.units(block.layer):
            if unit.name == block.name:
                return unit
        raise KeyError(f"no prunable unit {block.name!r} in layer {block.layer}")

    def current_down(self, block: PrunableBlock) -> nn.Module:
        unit = self._unit(block)
        return unit.get(unit.down)

    def compact(self, block: PrunableBlock, groups: torch.Tensor) -> None:
        unit = self._unit(block)
        index = torch.as_tensor(groups, dtype=torch.long)
        for path in unit.producers:
            module = unit.get(path)
            if isinstance(module, nn.Linear):
                unit.set(path, slice_linear_out(module, index))
            elif isinstance(module, nn.Conv2d):
                slice_conv_out(module, index)
            else:
                slice_norm(module, index)
        if unit.se is not None:
            se = unit.get(unit.se)
            slice_conv_in(se.conv_reduce, index)
            slice_conv_out(se.conv_expand, index)
        down = unit.get(unit.down)
        if isinstance(down, nn.Linear):
            unit.set(unit.down, slice_linear_in(down, index))
        else:
            slice_conv_in(down, index)

    def widths(self) -> dict[str, Any]:
        return {
            "format": WIDTHS_FORMAT,
            "layers": [[b.num_groups for b in self.blocks(i)] for i in range(len(self.layers()))],
        }

    def apply_widths(self, record: Mapping[str, Any]) -> None:
        if record.get("format") != WIDTHS_FORMAT:
            raise ValueError(f"width record format {record.get('format')!r} is not {WIDTHS_FORMAT!r}")
        layers = record["layers"]
        if len(layers) != len(self.layers()):
            raise ValueError(f"width record covers {len(layers)} layers but the model has {len(self.layers())}")
        for index, widths in enumerate(layers):
            blocks = self.blocks(index)
            if len(widths) != len(blocks):
                raise ValueError(f"layer {index}: record has {len(widths)} prunable blocks, the model {len(blocks)}")
            for block, width in zip(blocks, widths, strict=True):
                if not 1 <= int(width) <= block.num_groups:
                    raise ValueError(f"{block.name}: recorded width {width} is outside 1..{block.num_groups}")
                if int(width) != block.num_groups:
                    self.compact(block, torch.arange(int(width)))

    # Statistics ----------------------------------------------------------------------------------------
    def hidden_rows(self, block: PrunableBlock, hidden: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        down = self.current_down(block)
        if isinstance(down, nn.Linear):
            return hidden.reshape(-1, hidden.shape[-1])
        if self._unit(block).im2col:
            cols = F.unfold(hidden, down.kernel_size, dilation=down.dilation, padding=down.padding, stride=down.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])

    def output_weight(self, block: PrunableBlock) -> torch.Tensor:
        weight = self.current_down(block).weight
        return weight.reshape(weight.shape[0], -1)

    def _next_norm(self, block: PrunableBlock) -> nn.Module | None:
        unit = self._unit(block)
        norm = unit.get(unit.next_norm) if unit.next_norm else None
        return norm if _is_bn(norm) else None

    def output_bias(self, block: PrunableBlock) -> torch.Tensor | None:
        down = self.current_down(block)
        if down.bias is None and self._next_norm(block) is not None:
            return torch.zeros(down.weight.shape[0], dtype=down.weight.dtype, device=down.weight.device)
        return down.bias

    def set_output_projection(self, block: PrunableBlock, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        down = self.current_down(block)
        norm = self._next_norm(block)
        with torch.no_grad():
            down.weight.copy_(weight.reshape(down.weight.shape).to(down.weight.dtype))
            if bias is None:
                return
            if down.bias is not None:
                down.bias.copy_(bias.to(down.bias.dtype))
            elif norm is not None:
                # BN(x + b) == BN with running_mean - b (eval mode): the projection keeps no bias.
                norm.running_mean.sub_(bias.to(norm.running_mean.device, norm.running_mean.dtype))

    def weight_scores(self, block: PrunableBlock) -> torch.Tensor:
        unit = self._unit(block)
        n = block.num_groups
        score = self.current_down(block).weight.detach().float().pow(2).sum(0).reshape(n, -1).sum(-1)
        for path in unit.producers:
            module = unit.get(path)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                score = score + module.weight.detach().float().pow(2).reshape(n, -1).sum(-1)
        if unit.se is not None:
            se = unit.get(unit.se)
            score = score + se.conv_reduce.weight.detach().float().pow(2).sum(0).reshape(n, -1).sum(-1)
            score = score + se.conv_expand.weight.detach().float().pow(2).reshape(n, -1).sum(-1)
        return score


def _flatten(stages: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for stage in stages:
        if isinstance(stage, nn.Sequential):
            out.extend(stage)
        else:
            out.append(stage)
    return out


@register_adapter("EfficientNet", "MobileNetV3")
class EfficientNetAdapter(TimmCNNAdapter):
    """timm EfficientNet / MobileNetV2 / MobileNetV3: expansion channels of every inverted residual."""

    def layers(self) -> Sequence[nn.Module]:
        return _flatten(self.model.blocks)

    def units(self, layer: int) -> list[_Unit]:
        block = self.layers()[layer]
        if not isinstance(block, InvertedResidual):
            return []  # depthwise-separable / conv blocks have no expansion channels
        if block.conv_pw.groups != 1 or not _is_identity(getattr(block, "aa", None)):
            return []
        se = getattr(block, "se", None)
        if not _is_identity(se) and not isinstance(se, SqueezeExcite):
            return []
        return [
            _Unit(
                f"blocks.{layer}.expansion", block, ["conv_pw", "bn1", "conv_dw", "bn2"], "conv_pwl",
                se=None if _is_identity(se) else "se", next_norm="bn3",
            )
        ]


@register_adapter("ResNet")
class ResNetAdapter(TimmCNNAdapter):
    """timm ResNet: inner channels of BasicBlock (input of conv2) and Bottleneck (inputs of conv2 and conv3)."""

    def layers(self) -> Sequence[nn.Module]:
        return [block for name in ("layer1", "layer2", "layer3", "layer4") for block in getattr(self.model, name)]

    def units(self, layer: int) -> list[_Unit]:
        block = self.layers()[layer]
        units = []
        if isinstance(block, BasicBlock):
            if _is_identity(block.aa) and block.conv2.groups == 1 and isinstance(block.conv2.padding, tuple):
                units.append(_Unit(f"layer.{layer}.conv1", block, ["conv1", "bn1"], "conv2", next_norm="bn2",
                                   im2col=True))
        elif isinstance(block, Bottleneck):
            if block.conv2.groups == 1 and isinstance(block.conv2.padding, tuple):
                units.append(_Unit(f"layer.{layer}.conv1", block, ["conv1", "bn1"], "conv2", next_norm="bn2",
                                   im2col=True))
                if _is_identity(block.aa):
                    units.append(_Unit(f"layer.{layer}.conv2", block, ["conv2", "bn2"], "conv3", next_norm="bn3"))
        return units


@register_adapter("ConvNeXt")
class ConvNeXtAdapter(TimmCNNAdapter):
    """timm ConvNeXt: hidden channels of each block's MLP; a layer is a stage."""

    def layers(self) -> Sequence[nn.Module]:
        return list(self.model.stages)

    def units(self, layer: int) -> list[_Unit]:
        units = []
        for index, block in enumerate(self.layers()[layer].blocks):
            mlp = getattr(block, "mlp", None)
            if not isinstance(block, ConvNeXtBlock) or mlp is None or not hasattr(mlp, "fc1"):
                continue
            if not _is_identity(getattr(mlp, "norm", None)):
                continue
            units.append(_Unit(f"stages.{layer}.blocks.{index}.mlp", mlp, ["fc1"], "fc2"))
        return units
