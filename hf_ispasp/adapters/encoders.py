"""Adapters for BERT-style transformers encoders: heads of self-attention and FFN neurons.

An architecture is an :class:`EncoderLayout` (where the modules live and which attributes follow the head count);
the group specs, compaction, scores and the width record come from :mod:`hf_ispasp.adapters.groups`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import Resume, register_adapter
from .groups import Attr, GroupSpec, SpecAdapter, attention_heads, get_module, neurons

__all__ = ["BertLikeAdapter", "DistilBertAdapter", "EncoderLayout", "TransformerEncoderAdapter"]

WIDTHS_FORMAT = "hf_ispasp.encoder/1"


@dataclass(frozen=True)
class EncoderLayout:
    """Where the pieces of an encoder layer live (paths relative to the layer; ``layers`` to the base model).

    ``head_dim`` is the dotted path of the attribute holding the head size; ``head_attrs`` follow the head count.
    """

    layers: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_up: str
    ffn_down: str
    head_dim: str
    head_attrs: tuple[Attr, ...]


class TransformerEncoderAdapter(SpecAdapter):
    """Encoder layers with separate q/k/v projections; ``layout`` names the modules."""

    layout: EncoderLayout
    WIDTHS_FORMAT = WIDTHS_FORMAT
    RECORD_KINDS = ("heads", "ffn")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.base = getattr(model, "base_model", model)

    def layers(self) -> Sequence[nn.Module]:
        return get_module(self.base, self.layout.layers)

    def head_dim(self, layer: int = 0) -> int:
        owner, _, name = self.layout.head_dim.rpartition(".")
        return int(getattr(get_module(self.layers()[layer], owner), name))

    def group_specs(self, layer: int) -> list[GroupSpec]:
        lay = self.layout
        return [
            attention_heads(f"layer.{layer}.attention", lay.attn_out, lay.query, lay.key, lay.value,
                            self.head_dim(layer), attrs=lay.head_attrs),
            neurons(f"layer.{layer}.ffn", lay.ffn_down, lay.ffn_up),
        ]

    def record_extras(self) -> dict[str, Any]:
        return {"head_dim": self.head_dim()}


@register_adapter("bert", "roberta", "xlm-roberta", "electra")
class BertLikeAdapter(TransformerEncoderAdapter):
    """BERT, RoBERTa, XLM-RoBERTa and ELECTRA share the BERT layer layout."""

    post_norm = True

    layout = EncoderLayout(
        layers="encoder.layer",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attn_out="attention.output.dense",
        ffn_up="intermediate.dense",
        ffn_down="output.dense",
        head_dim="attention.self.attention_head_size",
        head_attrs=(
            Attr("attention.self", "num_attention_heads"),
            Attr("attention.self", "all_head_size", per_group="attention_head_size"),
        ),
    )

    def resume(self, layer: int) -> Resume | None:
        module = self.layers()[layer]
        if getattr(module, "chunk_size_feed_forward", 0):  # the feed-forward runs per chunk: no single entry
            return None
        return Resume(module.intermediate, lambda x: module.output(module.intermediate(x), x),
                      skip=lambda z, x: module.attention.output(z, x))


@register_adapter("distilbert")
class DistilBertAdapter(TransformerEncoderAdapter):
    post_norm = True
    layout = EncoderLayout(
        layers="transformer.layer",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attn_out="attention.out_lin",
        ffn_up="ffn.lin1",
        ffn_down="ffn.lin2",
        head_dim="attention.attention_head_size",
        head_attrs=(Attr("attention", "n_heads"),),
    )

    def resume(self, layer: int) -> Resume | None:
        module = self.layers()[layer]
        return Resume(module.ffn, lambda x: module.output_layer_norm(module.ffn(x) + x),
                      skip=lambda z, x: module.sa_layer_norm(module.attention.out_lin(z) + x))
