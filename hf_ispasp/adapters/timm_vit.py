"""Adapter for timm ``VisionTransformer``: attention heads (fused ``qkv``) and MLP neurons of every block.

A "layer" (the key of ``PrunerConfig.layer_overrides``) is one entry of ``model.blocks``. Heads are groups of
``head_dim`` columns of the input of ``attn.proj``; removing head ``h`` removes its rows in each of the q, k and
v thirds of ``attn.qkv`` (a fused row map, see :mod:`hf_ispasp.adapters.groups`). ``attn.num_heads`` and
``attn.attn_dim`` are updated so timm's reshape still fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn

from .base import Resume, register_adapter
from .groups import Attr, GroupSpec, SpecAdapter, fused_attention_heads, neurons
from .timm_cnn import TimmImageMixin

__all__ = ["TimmViTAdapter"]

WIDTHS_FORMAT = "hf_ispasp.timm_vit/1"


@register_adapter("VisionTransformer")
class TimmViTAdapter(TimmImageMixin, SpecAdapter):
    """Heads and MLP neurons of timm ViT / DeiT blocks (plain ``Block`` with ``Attention`` and ``Mlp``)."""

    WIDTHS_FORMAT = WIDTHS_FORMAT
    RECORD_KINDS = ("heads", "ffn")

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

    def group_specs(self, layer: int) -> list[GroupSpec]:
        head_dim = self._check(layer).attn.head_dim
        attrs = (Attr("attn", "num_heads"), Attr("attn", "attn_dim", per_group="head_dim"))
        return [
            fused_attention_heads(f"blocks.{layer}.attn", "attn.proj", "attn.qkv", head_dim, attrs=attrs),
            neurons(f"blocks.{layer}.mlp", "mlp.fc2", "mlp.fc1"),
        ]

    def resume(self, layer: int) -> Resume | None:
        block = self.layers()[layer]
        return Resume(block.norm2, lambda x: x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))),
                      skip=lambda z, x: x + block.drop_path1(block.ls1(block.attn.proj_drop(block.attn.proj(z)))))

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
