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

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from timm.models._efficientnet_blocks import InvertedResidual, SqueezeExcite
from timm.models.convnext import ConvNeXtBlock
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from .base import PrunableBlock, register_adapter
from .groups import GroupSpec, SpecAdapter, get_module

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


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


class TimmCNNAdapter(TimmImageMixin, SpecAdapter):
    """Subclasses find the prunable channels of each layer (``group_specs``); the rest comes from the specs."""

    WIDTHS_FORMAT = WIDTHS_FORMAT

    def group_specs(self, layer: int) -> list[GroupSpec]:
        raise TypeError(f"{type(self).__name__} does not define group_specs()")

    def _unit(self, block: PrunableBlock) -> SimpleNamespace:
        """``se``: path of the block's squeeze-excitation (or ``None``), whose input is where masking the dropped
        channels equals compaction (tests/test_compaction_property.py); ``get``: a module by path."""
        spec, root = self.spec(block), self.layers()[block.layer]
        se = next((cut.path.rpartition(".")[0] for cut in spec.inputs if cut.path.endswith("conv_reduce")), None)
        return SimpleNamespace(se=se, get=lambda path: get_module(root, path))


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

    def group_specs(self, layer: int) -> list[GroupSpec]:
        block = self.layers()[layer]
        if not isinstance(block, InvertedResidual):
            return []  # depthwise-separable / conv blocks have no expansion channels
        if block.conv_pw.groups != 1 or not _is_identity(getattr(block, "aa", None)):
            return []
        se = getattr(block, "se", None)
        if not _is_identity(se) and not isinstance(se, SqueezeExcite):
            return []
        has_se = not _is_identity(se)  # SE: its reduce conv loses inputs, its expand conv outputs
        return [
            GroupSpec(
                f"blocks.{layer}.expansion", "ffn", down="conv_pwl",
                outputs=("conv_pw", "bn1", "conv_dw", "bn2", *(("se.conv_expand",) if has_se else ())),
                inputs=("se.conv_reduce",) if has_se else (), down_norm="bn3",
            )
        ]


@register_adapter("ResNet")
class ResNetAdapter(TimmCNNAdapter):
    """timm ResNet: inner channels of BasicBlock (input of conv2) and Bottleneck (inputs of conv2 and conv3)."""

    def layers(self) -> Sequence[nn.Module]:
        return [block for name in ("layer1", "layer2", "layer3", "layer4") for block in getattr(self.model, name)]

    def group_specs(self, layer: int) -> list[GroupSpec]:
        block = self.layers()[layer]
        if not isinstance(block, (BasicBlock, Bottleneck)) or block.conv2.groups != 1:
            return []
        if not isinstance(block.conv2.padding, tuple):  # "same" padding is not an unfold
            return []
        specs = []
        if isinstance(block, Bottleneck) or _is_identity(block.aa):
            # the channels between conv1 and the 3x3 conv2, read as im2col rows
            specs.append(GroupSpec(f"layer.{layer}.conv1", "ffn", "conv2", ("conv1", "bn1"), down_norm="bn2",
                                   im2col=True))
        if isinstance(block, Bottleneck) and _is_identity(block.aa):
            specs.append(GroupSpec(f"layer.{layer}.conv2", "ffn", "conv3", ("conv2", "bn2"), down_norm="bn3"))
        return specs


@register_adapter("ConvNeXt")
class ConvNeXtAdapter(TimmCNNAdapter):
    """timm ConvNeXt: hidden channels of each block's MLP; a layer is a stage."""

    def layers(self) -> Sequence[nn.Module]:
        return list(self.model.stages)

    def group_specs(self, layer: int) -> list[GroupSpec]:
        specs = []
        for index, block in enumerate(self.layers()[layer].blocks):
            mlp = getattr(block, "mlp", None)
            if not isinstance(block, ConvNeXtBlock) or mlp is None or not hasattr(mlp, "fc1"):
                continue
            if not _is_identity(getattr(mlp, "norm", None)):
                continue
            specs.append(GroupSpec(f"stages.{layer}.blocks.{index}.mlp", "ffn", f"blocks.{index}.mlp.fc2",
                                   (f"blocks.{index}.mlp.fc1",)))
        return specs
