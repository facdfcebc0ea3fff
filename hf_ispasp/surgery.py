"""Physical slicing of layers by kept indices: one function per layer type and direction."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .algorithm import group_columns

__all__ = [
    "group_columns",
    "group_rows",
    "slice_conv1d_in",
    "slice_conv1d_out",
    "slice_conv_in",
    "slice_conv_out",
    "slice_in",
    "slice_linear_in",
    "slice_linear_out",
    "slice_norm",
    "slice_out",
]


def group_rows(groups: torch.Tensor, num_groups: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Indices of ``groups`` in a dimension made of segments, each holding ``num_groups`` runs of ``sizes[s]``.

    One segment of ``head_dim`` is a plain head layout; ``(d, d, d)`` is a fused ``[q | k | v]`` projection;
    ``(r * d, d, d)`` a fused grouped-query projection (``r`` query heads per key/value head); ``(1, 1)`` a fused
    ``[gate | up]``.
    """
    groups = torch.as_tensor(groups, dtype=torch.long)
    parts, offset = [], 0
    for size in sizes:
        parts.append(group_columns(groups, size) + offset)
        offset += num_groups * size
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def slice_out(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """Keep output units ``index`` (features, channels) of any supported layer; use the returned module."""
    if isinstance(module, nn.Linear):
        return slice_linear_out(module, index)
    if isinstance(module, Conv1D):
        return slice_conv1d_out(module, index)
    if isinstance(module, nn.Conv2d):
        return slice_conv_out(module, index)
    if _is_channel_norm(module):
        return slice_norm(module, index)
    raise TypeError(f"cannot slice the outputs of a {type(module).__name__}")


def slice_in(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """Keep input units ``index`` of a Linear, Conv1D or ungrouped conv; use the returned module."""
    if isinstance(module, nn.Linear):
        return slice_linear_in(module, index)
    if isinstance(module, Conv1D):
        return slice_conv1d_in(module, index)
    if isinstance(module, nn.Conv2d):
        return slice_conv_in(module, index)
    raise TypeError(f"cannot slice the inputs of a {type(module).__name__}")


def _is_channel_norm(module: nn.Module) -> bool:
    """A per-channel layer (BatchNorm, LayerNorm, RMSNorm): 1-D parameters only; GroupNorm mixes channels."""
    params = list(module.parameters(recurse=False))
    return not isinstance(module, nn.GroupNorm) and bool(params) and all(p.dim() == 1 for p in params)


def slice_linear_out(layer: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep output features ``index`` (rows of the weight and the bias)."""
    return _slice_linear(layer, index, 0)


def slice_linear_in(layer: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep input features ``index`` (columns of the weight); the bias is unchanged."""
    return _slice_linear(layer, index, 1)


def _slice_linear(layer: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` holding the kept slice, with the old dtype, device and ``requires_grad``.

    Built on the meta device and then given the slices: no randomly initialised layer is ever allocated (a
    pruned-size allocation per layer would stay resident in a ``load_pruned`` of a large model), and a frozen
    model stays frozen (transformers' ``prune_linear_layer`` returns trainable parameters).
    """
    weight = layer.weight.detach().index_select(dim, index.to(layer.weight.device)).clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        bias = layer.bias.detach()
        bias = bias.index_select(0, index.to(bias.device)) if dim == 0 else bias
        new.bias = nn.Parameter(bias.clone(), requires_grad=layer.bias.requires_grad)
    return new


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))


def slice_conv_out(conv: nn.Conv2d, index: torch.Tensor) -> nn.Conv2d:
    """Keep output channels ``index`` in place (the class, e.g. timm's same-padding conv, is kept).

    A depthwise conv keeps the matching input channels and groups as well.
    """
    index = index.to(conv.weight.device)
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if conv.groups > 1 and not depthwise:
        raise ValueError(f"cannot slice a grouped (non-depthwise) conv with groups={conv.groups}")
    _set_param(conv, "weight", conv.weight.data.index_select(0, index))
    if conv.bias is not None:
        _set_param(conv, "bias", conv.bias.data.index_select(0, index))
    conv.out_channels = len(index)
    if depthwise:
        conv.in_channels = conv.groups = len(index)
    return conv


def slice_conv_in(conv: nn.Conv2d, index: torch.Tensor) -> nn.Conv2d:
    """Keep input channels ``index`` of an ungrouped conv, in place."""
    if conv.groups != 1:
        raise ValueError(
            "slice_conv_in supports ungrouped convolutions only; slice depthwise convs on the output side"
        )
    _set_param(conv, "weight", conv.weight.data.index_select(1, index.to(conv.weight.device)))
    conv.in_channels = len(index)
    return conv


def slice_conv1d_out(layer: Conv1D, index: torch.Tensor) -> Conv1D:
    """Keep output features ``index`` of a transformers ``Conv1D`` (GPT-2; weight is in x out), in place."""
    index = index.to(layer.weight.device)
    _set_param(layer, "weight", layer.weight.data.index_select(1, index))
    if layer.bias is not None:
        _set_param(layer, "bias", layer.bias.data.index_select(0, index))
    layer.nf = len(index)
    return layer


def slice_conv1d_in(layer: Conv1D, index: torch.Tensor) -> Conv1D:
    """Keep input features ``index`` of a transformers ``Conv1D``, in place; the bias is unchanged."""
    _set_param(layer, "weight", layer.weight.data.index_select(0, index.to(layer.weight.device)))
    layer.nx = len(index)
    return layer


def slice_norm(norm: nn.Module, index: torch.Tensor) -> nn.Module:
    """Keep channels ``index`` of a BatchNorm / LayerNorm / GroupNorm-free affine norm, in place."""
    for name in ("weight", "bias"):  # parameters and running statistics may be on different devices (meta skeleton)
        param = getattr(norm, name, None)
        if isinstance(param, nn.Parameter):
            kept = param.data.index_select(0, index.to(param.device)).clone()
            setattr(norm, name, nn.Parameter(kept, param.requires_grad))
    for name in ("running_mean", "running_var"):
        buf = getattr(norm, name, None)
        if isinstance(buf, torch.Tensor):
            setattr(norm, name, buf.index_select(0, index.to(buf.device)).clone())
    if hasattr(norm, "num_features"):
        norm.num_features = len(index)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(index),)
    return norm
