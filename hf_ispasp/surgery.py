"""Physical slicing of layers by kept indices: one function per layer type and direction."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from .algorithm import group_columns

__all__ = ["group_columns", "slice_conv_in", "slice_conv_out", "slice_linear_in", "slice_linear_out", "slice_norm"]


def slice_linear_out(layer: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep output features ``index`` (rows of the weight and the bias)."""
    return _keep_requires_grad(prune_linear_layer(layer, index.to(layer.weight.device), dim=0), layer)


def slice_linear_in(layer: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep input features ``index`` (columns of the weight); the bias is unchanged."""
    return _keep_requires_grad(prune_linear_layer(layer, index.to(layer.weight.device), dim=1), layer)


def _keep_requires_grad(new: nn.Linear, old: nn.Linear) -> nn.Linear:
    """Give the sliced layer the old dtype and the old parameters' ``requires_grad``.

    ``prune_linear_layer`` builds fresh parameters with ``requires_grad=True``: a frozen (or partly frozen)
    model would come back trainable, and an optimiser built from ``requires_grad`` would update it.
    """
    new = new.to(old.weight.dtype)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None and old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
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


def slice_norm(norm: nn.Module, index: torch.Tensor) -> nn.Module:
    """Keep channels ``index`` of a BatchNorm / LayerNorm / GroupNorm-free affine norm, in place."""
    index = index.to(next(iter(norm.parameters()), torch.empty(0)).device)
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if isinstance(param, nn.Parameter):
            setattr(norm, name, nn.Parameter(param.data.index_select(0, index).clone(), param.requires_grad))
    for name in ("running_mean", "running_var"):
        buf = getattr(norm, name, None)
        if isinstance(buf, torch.Tensor):
            setattr(norm, name, buf.index_select(0, index.to(buf.device)).clone())
    if hasattr(norm, "num_features"):
        norm.num_features = len(index)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(index),)
    return norm
