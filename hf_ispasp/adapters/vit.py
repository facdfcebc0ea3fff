"""Adapter for transformers ViT (``ViTModel``, ``ViTForImageClassification``): heads and MLP neurons.

transformers 5 lays a ViT layer out as ``vit.layers.N`` with ``attention.{q,k,v,o}_proj`` and ``mlp.{fc1,fc2}``;
attention reshapes with ``-1`` heads, so sliced projections run as they are. A "layer" (the key of
``PrunerConfig.layer_overrides``) is one entry of ``vit.layers``. Checkpoints follow the text models' path:
``save_pretrained`` keeps the width record in ``config.json`` and :func:`hf_ispasp.load_pruned` rebuilds it.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Resume, register_adapter
from .encoders import EncoderLayout, TransformerEncoderAdapter
from .groups import Attr, get_module

__all__ = ["ViTAdapter"]


@register_adapter("vit")
class ViTAdapter(TransformerEncoderAdapter):
    """transformers ViT: calibration batches are images (tensors, ``(images, labels)`` or ``pixel_values`` dicts)."""

    layout = EncoderLayout(
        layers="layers",
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        attn_out="attention.o_proj",
        ffn_up="mlp.fc1",
        ffn_down="mlp.fc2",
        head_dim="attention.head_dim",
        head_attrs=(Attr("attention", "num_attention_heads"),),
    )

    def resume(self, layer: int) -> Resume | None:
        module = self.layers()[layer]
        return Resume(module.layernorm_after, lambda x: x + module.dropout(module.mlp(module.layernorm_after(x))),
                      skip=lambda z, x: x + module.dropout(get_module(module, self.layout.attn_out)(z)))

    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[tuple, dict[str, Any], torch.Tensor | None]:
        from .inputs import image_tensor

        images = image_tensor(batch, device)
        dtype = next(self.model.parameters()).dtype
        return (), {"pixel_values": images.to(dtype)}, None

    def example_inputs(self, batch_size: int = 1, seq_len: int = 128) -> dict[str, torch.Tensor]:
        config = self.model.config
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(batch_size, config.num_channels, *size, generator=generator)
        return {"pixel_values": pixels.to(next(self.model.parameters()).dtype)}
