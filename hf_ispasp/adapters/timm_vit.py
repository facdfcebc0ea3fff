"""Adapter for timm ``VisionTransformer``: attention heads (fused ``qkv``) and MLP neurons of every block.

A "layer" (the key of ``PrunerConfig.layer_overrides``) is one entry of ``model.blocks``. Heads are groups of
``head_dim`` columns of the input of ``attn.proj``; removing head ``h`` removes its rows in each of the q, k and
v thirds of ``attn.qkv``. ``attn.num_heads`` and ``attn.attn_dim`` are updated so timm's reshape still fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn

from ..surgery import group_columns, slice_linear_in, slice_linear_out
from .base import ModelAdapter, PrunableBlock, Resume, register_adapter
from .timm_cnn import TimmImageMixin

__all__ = ["TimmViTAdapter"]

WIDTHS_FORMAT = "hf_ispasp.timm_vit/1"


@register_adapter("VisionTransformer")
class TimmViTAdapter(TimmImageMixin, ModelAdapter):
    """Heads and MLP neurons of timm ViT / DeiT blocks (plain ``Block`` with ``Attention`` and ``Mlp``)."""

    def layers(self) -> Sequence[nn.Module]:
        return list(self.model.blocks)

    def _check(self, layer: int) -> Block:
        block = self.layers()[layer]
        if not isinstance(block, Block) or not isinstance(block.attn, Attention) or not isinstance(block.mlp, Mlp):
            raise TypeError(
                f"block {layer} is a {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__} / "
                f"{type(getattr(block, 'mlp', None)).__name__}; the timm ViT adapter supports Block(Attention, Mlp)"
            )
        attn = block.attn
        if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
            raise TypeError(f"block {layer}: attention with scale_norm or a gate cannot be head-pruned")
        if not isinstance(block.mlp.norm, nn.Identity):
            raise TypeError(f"block {layer}: an MLP with a hidden norm cannot be pruned")
        return block

    def blocks(self, layer: int) -> list[PrunableBlock]:
        block = self._check(layer)
        attn = block.attn
        return [
            PrunableBlock(f"blocks.{layer}.attn", "heads", layer, attn.proj, attn.head_dim, attn.num_heads),
            PrunableBlock(f"blocks.{layer}.mlp", "ffn", layer, block.mlp.fc2, 1, block.mlp.fc2.in_features),
        ]

    def resume(self, layer: int) -> Resume | None:
        block = self.layers()[layer]
        return Resume(block.norm2, lambda x: x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))

    def current_down(self, block: PrunableBlock) -> nn.Module:
        layer = self.layers()[block.layer]
        return layer.attn.proj if block.kind == "heads" else layer.mlp.fc2

    def _qkv_rows(self, attn: Attention, groups: torch.Tensor) -> torch.Tensor:
        cols = group_columns(groups, attn.head_dim)
        return torch.cat([cols + part * attn.attn_dim for part in range(3)])

    def compact(self, block: PrunableBlock, groups: torch.Tensor) -> None:
        layer = self.layers()[block.layer]
        groups = torch.as_tensor(groups, dtype=torch.long)
        if block.kind == "heads":
            attn = layer.attn
            attn.qkv = slice_linear_out(attn.qkv, self._qkv_rows(attn, groups))
            attn.proj = slice_linear_in(attn.proj, group_columns(groups, attn.head_dim))
            attn.num_heads = len(groups)
            attn.attn_dim = len(groups) * attn.head_dim
        else:
            layer.mlp.fc1 = slice_linear_out(layer.mlp.fc1, groups)
            layer.mlp.fc2 = slice_linear_in(layer.mlp.fc2, groups)

    def weight_scores(self, block: PrunableBlock) -> torch.Tensor:
        layer = self.layers()[block.layer]
        score = self.current_down(block).weight.detach().float().pow(2).sum(0)
        if block.kind == "heads":
            attn = layer.attn
            rows = attn.qkv.weight.detach().float().pow(2).sum(1)
            if attn.qkv.bias is not None:
                rows = rows + attn.qkv.bias.detach().float().pow(2)
            score = score + rows.reshape(3, -1).sum(0)
        else:
            fc1 = layer.mlp.fc1
            score = score + fc1.weight.detach().float().pow(2).sum(1)
            if fc1.bias is not None:
                score = score + fc1.bias.detach().float().pow(2)
        return score.reshape(block.num_groups, block.group_size).sum(-1)

    def widths(self) -> dict[str, Any]:
        count = len(self.layers())
        return {
            "format": WIDTHS_FORMAT,
            "heads": [self.layers()[i].attn.num_heads for i in range(count)],
            "ffn": [self.layers()[i].mlp.fc1.out_features for i in range(count)],
        }

    def apply_widths(self, record: Mapping[str, Any]) -> None:
        if record.get("format") != WIDTHS_FORMAT:
            raise ValueError(f"width record format {record.get('format')!r} is not {WIDTHS_FORMAT!r}")
        count = len(self.layers())
        if len(record["heads"]) != count or len(record["ffn"]) != count:
            raise ValueError(f"width record covers {len(record['heads'])} blocks but the model has {count}")
        for index in range(count):
            for block, width in zip(self.blocks(index), (record["heads"][index], record["ffn"][index]), strict=True):
                if not 1 <= int(width) <= block.num_groups:
                    raise ValueError(f"{block.name}: recorded width {width} is outside 1..{block.num_groups}")
                if int(width) != block.num_groups:
                    self.compact(block, torch.arange(int(width)))

    def input_size(self) -> tuple[int, int, int]:
        embed = self.model.patch_embed
        size = getattr(embed, "img_size", None)
        if size is None:
            return super().input_size()
        return (embed.proj.in_channels, int(size[0]), int(size[1]))

    def create_kwargs(self) -> dict[str, Any]:
        kwargs = super().create_kwargs()
        size = getattr(self.model.patch_embed, "img_size", None)
        if size is not None and "img_size" not in kwargs:
            kwargs["img_size"] = list(size)
        return kwargs
