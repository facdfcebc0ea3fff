"""Adapters for BERT-style transformers encoders: heads of self-attention and FFN neurons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..surgery import group_columns, slice_linear_in, slice_linear_out
from .base import ModelAdapter, PrunableBlock, Resume, register_adapter

__all__ = ["BertLikeAdapter", "DistilBertAdapter", "EncoderLayout", "TransformerEncoderAdapter"]

WIDTHS_FORMAT = "hf_ispasp.encoder/1"


@dataclass(frozen=True)
class EncoderLayout:
    """Where the pieces of an encoder layer live (attribute paths relative to the layer)."""

    layers: str
    attention: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_up: str
    ffn_down: str
    head_count_attr: str


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _set(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get(root, parent_path) if parent_path else root
    setattr(parent, name, value)


class TransformerEncoderAdapter(ModelAdapter):
    """Encoder layers with separate q/k/v projections; ``layout`` names the modules."""

    layout: ClassVar[EncoderLayout]

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.base = getattr(model, "base_model", model)

    def layers(self) -> Sequence[nn.Module]:
        return _get(self.base, self.layout.layers)

    def _attention(self, layer: int) -> nn.Module:
        return _get(self.layers()[layer], self.layout.attention)

    def head_dim(self, layer: int = 0) -> int:
        return int(self._attention(layer).attention_head_size)

    def num_heads(self, layer: int) -> int:
        return _get(self.layers()[layer], self.layout.query).out_features // self.head_dim(layer)

    def ffn_width(self, layer: int) -> int:
        return _get(self.layers()[layer], self.layout.ffn_up).out_features

    def blocks(self, layer: int) -> list[PrunableBlock]:
        module = self.layers()[layer]
        lay = self.layout
        return [
            PrunableBlock(
                f"layer.{layer}.attention", "heads", layer, _get(module, lay.attn_out), self.head_dim(layer),
                self.num_heads(layer),
            ),
            PrunableBlock(f"layer.{layer}.ffn", "ffn", layer, _get(module, lay.ffn_down), 1, self.ffn_width(layer)),
        ]

    def _down_path(self, block: PrunableBlock) -> str:
        return self.layout.attn_out if block.kind == "heads" else self.layout.ffn_down

    def current_down(self, block: PrunableBlock) -> nn.Module:
        return _get(self.layers()[block.layer], self._down_path(block))

    def weight_scores(self, block: PrunableBlock) -> torch.Tensor:
        layer = self.layers()[block.layer]
        lay = self.layout
        ups = [lay.query, lay.key, lay.value] if block.kind == "heads" else [lay.ffn_up]
        score = self.output_weight(block).detach().float().pow(2).sum(0)
        for path in ups:
            up = _get(layer, path)
            score = score + up.weight.detach().float().pow(2).sum(1)
            if up.bias is not None:
                score = score + up.bias.detach().float().pow(2)
        return score.reshape(block.num_groups, block.group_size).sum(-1)

    def compact(self, block: PrunableBlock, groups: torch.Tensor) -> None:
        layer = self.layers()[block.layer]
        lay = self.layout
        cols = group_columns(groups, block.group_size)
        ups = [lay.query, lay.key, lay.value] if block.kind == "heads" else [lay.ffn_up]
        for path in ups:
            _set(layer, path, slice_linear_out(_get(layer, path), cols))
        down_path = self._down_path(block)
        _set(layer, down_path, slice_linear_in(_get(layer, down_path), cols))
        if block.kind == "heads":
            attention = _get(layer, lay.attention)
            setattr(attention, lay.head_count_attr, len(groups))
            if hasattr(attention, "all_head_size"):
                attention.all_head_size = len(cols)

    def widths(self) -> dict[str, Any]:
        count = len(self.layers())
        return {
            "format": WIDTHS_FORMAT,
            "head_dim": self.head_dim(),
            "heads": [self.num_heads(i) for i in range(count)],
            "ffn": [self.ffn_width(i) for i in range(count)],
        }

    def apply_widths(self, record: Mapping[str, Any]) -> None:
        if record.get("format") != WIDTHS_FORMAT:
            raise ValueError(f"width record format {record.get('format')!r} is not {WIDTHS_FORMAT!r}")
        count = len(self.layers())
        if len(record["heads"]) != count or len(record["ffn"]) != count:
            raise ValueError(
                f"width record covers {len(record['heads'])} layers but the model has {count}: "
                "the checkpoint's config does not match its pruning metadata"
            )
        for index in range(count):
            for kind, width in (("heads", record["heads"][index]), ("ffn", record["ffn"][index])):
                block = next(b for b in self.blocks(index) if b.kind == kind)
                if not 1 <= int(width) <= block.num_groups:
                    raise ValueError(f"layer {index}: recorded {kind} width {width} is outside 1..{block.num_groups}")
                if int(width) != block.num_groups:
                    self.compact(block, torch.arange(int(width)))


_BERT = EncoderLayout(
    layers="encoder.layer",
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_up="intermediate.dense",
    ffn_down="output.dense",
    head_count_attr="num_attention_heads",
)


@register_adapter("bert", "roberta", "xlm-roberta", "electra")
class BertLikeAdapter(TransformerEncoderAdapter):
    """BERT, RoBERTa, XLM-RoBERTa and ELECTRA share the BERT layer layout."""

    layout = _BERT

    def resume(self, layer: int) -> Resume | None:
        module = self.layers()[layer]
        if getattr(module, "chunk_size_feed_forward", 0):  # the feed-forward runs per chunk: no single entry
            return None
        return Resume(module.intermediate, lambda x: module.output(module.intermediate(x), x))


@register_adapter("distilbert")
class DistilBertAdapter(TransformerEncoderAdapter):
    layout = EncoderLayout(
        layers="transformer.layer",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attn_out="attention.out_lin",
        ffn_up="ffn.lin1",
        ffn_down="ffn.lin2",
        head_count_attr="n_heads",
    )

    def resume(self, layer: int) -> Resume | None:
        module = self.layers()[layer]
        return Resume(module.ffn, lambda x: module.output_layer_norm(module.ffn(x) + x))
