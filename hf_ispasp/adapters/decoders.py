"""Adapters for decoder LLMs: LLaMA, Mistral, Qwen2, Qwen3, Phi-3 and GPT-2 (attention groups and FFN neurons).

An architecture is a :class:`DecoderLayout`; the group specs, compaction, scores and the width record come from
:mod:`hf_ispasp.adapters.groups`. Attention groups under grouped-query attention (``PrunerConfig.gqa_groups``):

- ``"kv"`` (default): a group is one key/value head with its ``r`` query heads; pruning removes whole KV groups,
  ``num_key_value_heads`` shrinks and ``r`` stays. ``head_keep_ratio`` is the fraction of KV heads kept.
- ``"query"``: every KV head stays and each keeps the same number of its query heads (the block's groups are
  query heads in ``num_key_value_heads`` partitions); ``head_keep_ratio`` is the fraction of query heads kept.

Multi-head attention (GPT-2, or ``r == 1``): a group is a head in both modes.

Calibration runs the model's own forward with ``use_cache=False``: the rotary embeddings and the causal mask
each layer receives are captured from it and replayed. Padded batches get position ids counted from each
sequence's first real token (as ``generate`` does), so a left-padded sequence is calibrated like the same
sequence right-padded; padding never enters the statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import GQA_GROUPS
from ..partitions import first_per_run
from .base import Resume, register_adapter
from .groups import (
    Attr,
    Cut,
    GroupSpec,
    SpecAdapter,
    attention_heads,
    compact_groups,
    fused_attention_heads,
    get_module,
    group_count,
    neurons,
    units,
)

__all__ = ["DecoderAdapter", "DecoderLayout", "GPT2Adapter", "LlamaLikeAdapter", "Phi3Adapter"]

WIDTHS_FORMAT = "hf_ispasp.decoder/1"


@dataclass(frozen=True)
class DecoderLayout:
    """Where the pieces of a decoder layer live (paths relative to the layer; ``layers`` to the base model).

    Either ``q``/``k``/``v`` (separate projections) or ``qkv`` (one fused ``[q | k | v]``) is set. ``ffn_norm`` is
    the norm in front of the MLP: the layer's output is ``x + mlp(ffn_norm(x))`` (through ``mlp_dropout`` when
    set), which lets the engine finish a layer from the cached input of that norm.
    """

    layers: str
    attention: str
    out: str
    ffn_down: str
    ffn_ups: tuple[Cut, ...]
    ffn_norm: str
    mlp: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    head_attrs: tuple[Attr, ...] = ()
    mlp_dropout: str | None = None


class _LayerConfig:
    """The model config seen through one layer's head counts (Phi-3 attention reads them from its config).

    Every other attribute is the model config's, read live, so later changes (e.g. the attention implementation)
    still reach the layer.
    """

    def __init__(self, config: Any, **counts: int) -> None:
        self.__dict__["_config"], self.__dict__["_counts"] = config, dict(counts)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_counts" not in self.__dict__:  # copy/pickle probe before the state is set
            raise AttributeError(name)
        counts = self.__dict__["_counts"]
        return counts[name] if name in counts else getattr(self.__dict__["_config"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__["_counts"]:
            self.__dict__["_counts"][name] = value
        else:
            setattr(self.__dict__["_config"], name, value)


class DecoderAdapter(SpecAdapter):
    """Decoder layers: attention heads / KV groups and FFN neurons; ``layout`` names the modules."""

    layout: ClassVar[DecoderLayout]
    WIDTHS_FORMAT = WIDTHS_FORMAT
    RECORD_KINDS = ("heads", "ffn")
    causal_lm: ClassVar[bool] = True
    #: The attention reads ``config.num_attention_heads`` / ``num_key_value_heads`` in its forward.
    config_head_counts: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.base = getattr(model, "base_model", model)
        self.gqa_groups = "kv"

    def configure(self, config: Any) -> None:
        mode = getattr(config, "gqa_groups", "kv")
        if mode not in GQA_GROUPS:
            raise ValueError(f"gqa_groups must be one of {GQA_GROUPS}, got {mode!r}")
        self.gqa_groups = mode

    # Structure ----------------------------------------------------------------------------------------------
    def layers(self) -> Sequence[nn.Module]:
        return get_module(self.base, self.layout.layers)

    def attention(self, layer: int) -> nn.Module:
        return get_module(self.layers()[layer], self.layout.attention)

    def head_dim(self, layer: int = 0) -> int:
        return int(self.attention(layer).head_dim)

    def q_per_kv(self, layer: int) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return int(getattr(self.attention(layer), "num_key_value_groups", 1))

    def _kv_spec(self, layer: int) -> GroupSpec:
        lay, name, d, r = self.layout, f"layer.{layer}.attention", self.head_dim(layer), self.q_per_kv(layer)
        if lay.qkv is not None:
            return fused_attention_heads(name, lay.out, lay.qkv, d, r, attrs=lay.head_attrs)
        return attention_heads(name, lay.out, lay.q, lay.k, lay.v, d, r, attrs=lay.head_attrs)

    def _query_spec(self, layer: int) -> GroupSpec:
        """Query heads, partitioned by their key/value head; keys and values are not cut."""
        lay, d = self.layout, self.head_dim(layer)
        kv_heads = group_count(self.layers()[layer], self._kv_spec(layer))
        q = Cut(lay.qkv, d, whole=2 * kv_heads * d) if lay.qkv is not None else Cut(lay.q, d)
        return GroupSpec(f"layer.{layer}.attention", "heads", Cut(lay.out, d), (q,), partitions=kv_heads)

    def _ffn_spec(self, layer: int) -> GroupSpec:
        return neurons(f"layer.{layer}.ffn", self.layout.ffn_down, *self.layout.ffn_ups)

    def group_specs(self, layer: int) -> list[GroupSpec]:
        query = self.gqa_groups == "query" and self.q_per_kv(layer) > 1
        return [self._query_spec(layer) if query else self._kv_spec(layer), self._ffn_spec(layer)]

    def record_specs(self, layer: int) -> list[GroupSpec]:
        """KV groups and neurons, whatever ``gqa_groups``: queries per KV head are a record extra."""
        return [self._kv_spec(layer), self._ffn_spec(layer)]

    def _head_counts(self, layer: int) -> tuple[int, int]:
        """(query heads, key/value heads) of ``layer`` from its projection shapes (the attributes follow them)."""
        root, lay, d = self.layers()[layer], self.layout, self.head_dim(layer)
        queries = units(get_module(root, lay.out), output=False) // d
        if lay.qkv is not None:
            return queries, (units(get_module(root, lay.qkv), output=True) // d - queries) // 2
        return queries, units(get_module(root, lay.k), output=True) // d

    def after_compact(self, layer: int) -> None:
        """Query heads per KV head and, where the attention reads them there, the per-layer config's counts."""
        attn = self.attention(layer)
        queries, kv_heads = self._head_counts(layer)
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = queries // kv_heads
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = kv_heads
        if self.config_head_counts:
            config = attn.config.__dict__.get("_config", attn.config)
            attn.config = _LayerConfig(config, num_attention_heads=queries, num_key_value_heads=kv_heads)

    # Width record -------------------------------------------------------------------------------------------
    def record_extras(self) -> dict[str, Any]:
        counts = [self._head_counts(i) for i in range(len(self.layers()))]
        return {"head_dim": self.head_dim(), "q_per_kv": [q // kv for q, kv in counts]}

    def apply_record_extras(self, layer: int, record: Mapping[str, Any]) -> None:
        """Keep the first ``q_per_kv[layer]`` query heads of every KV head (records from ``gqa_groups="query"``)."""
        wanted = record.get("q_per_kv")
        if wanted is None:
            return
        if not isinstance(wanted, list) or len(wanted) != len(self.layers()):
            raise ValueError(f"width record field 'q_per_kv' must list one count per layer, got {wanted!r}")
        r, want = self.q_per_kv(layer), int(wanted[layer])
        if not 1 <= want <= r:
            raise ValueError(f"layer {layer}: recorded {want} query heads per KV head, the model has {r}")
        if want < r:
            kv_heads = group_count(self.layers()[layer], self._kv_spec(layer))
            compact_groups(self.layers()[layer], self._query_spec(layer), first_per_run(kv_heads * r, want, kv_heads))
            self.after_compact(layer)

    # Calibration --------------------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[tuple, dict[str, Any], torch.Tensor | None]:
        args, kwargs, mask = super().prepare_batch(batch, device)
        kwargs["use_cache"] = False  # no KV cache grows while layers are replayed
        attention_mask = kwargs.get("attention_mask")
        if "position_ids" not in kwargs and attention_mask is not None and not bool(attention_mask.all()):
            # Positions from each sequence's first real token, as generate() does: padding on the left then
            # leaves the positions of the real tokens (GPT-2's learned embeddings, rotary phases) unchanged.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self._check_sliding_window(mask.shape[-1] if mask is not None else 0)
        return args, kwargs, mask

    def _check_sliding_window(self, length: int) -> None:
        """Layers are replayed with the mask captured at the first layer: every layer must see the same one."""
        config = getattr(self.model, "config", None)
        types = set(getattr(config, "layer_types", None) or ())
        window = getattr(config, "sliding_window", None)
        if len(types) > 1 and window is not None and length > window:
            raise ValueError(
                f"calibration sequences of {length} tokens exceed the sliding window ({window}) of a model whose "
                f"layers mix attention types ({sorted(types)}); the layers would need different masks: calibrate "
                f"with sequences of at most {window} tokens"
            )

    def resume(self, layer: int) -> Resume | None:
        module, lay = self.layers()[layer], self.layout
        if hasattr(module, "crossattention"):  # GPT-2 with cross-attention: the MLP is not the whole tail
            return None
        norm, mlp = get_module(module, lay.ffn_norm), get_module(module, lay.mlp)
        dropout = get_module(module, lay.mlp_dropout) if lay.mlp_dropout else nn.Identity()
        return Resume(norm, lambda x: x + dropout(mlp(norm(x))), skip=lambda z, x: x + get_module(module, lay.out)(z))

    def example_inputs(self, batch_size: int = 1, seq_len: int = 128) -> dict[str, torch.Tensor]:
        inputs = super().example_inputs(batch_size, seq_len)
        return {**inputs, "use_cache": False}


_LLAMA = DecoderLayout(
    layers="layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
    ffn_ups=(Cut("mlp.gate_proj"), Cut("mlp.up_proj")),
    ffn_norm="post_attention_layernorm",
    mlp="mlp",
)


@register_adapter("llama", "mistral", "qwen2", "qwen3")
class LlamaLikeAdapter(DecoderAdapter):
    """LLaMA and the families that share its layer: gated MLP (neuron j = row j of ``gate_proj`` and
    ``up_proj``, column j of ``down_proj``), separate q/k/v (Qwen2's biases are sliced with their rows; Qwen3's
    ``q_norm``/``k_norm`` act on one head and are shared by all heads, so only the head count changes)."""

    layout = _LLAMA


@register_adapter("phi3")
class Phi3Adapter(DecoderAdapter):
    """Phi-3: fused ``qkv_proj`` (``[q | k | v]``, grouped-query) and fused ``gate_up_proj`` (both halves cut)."""

    layout = DecoderLayout(
        layers="layers",
        attention="self_attn",
        qkv="self_attn.qkv_proj",
        out="self_attn.o_proj",
        ffn_down="mlp.down_proj",
        ffn_ups=(Cut.fused("mlp.gate_up_proj", 1, 2),),
        ffn_norm="post_attention_layernorm",
        mlp="mlp",
        mlp_dropout="resid_mlp_dropout",
    )
    config_head_counts = True


@register_adapter("gpt2")
class GPT2Adapter(DecoderAdapter):
    """GPT-2: ``Conv1D`` projections (weights stored transposed), fused ``c_attn`` and multi-head attention."""

    layout = DecoderLayout(
        layers="h",
        attention="attn",
        qkv="attn.c_attn",
        out="attn.c_proj",
        ffn_down="mlp.c_proj",
        ffn_ups=(Cut("mlp.c_fc"),),
        ffn_norm="ln_2",
        mlp="mlp",
        head_attrs=(Attr("attn", "num_heads"), Attr("attn", "split_size", per_group="head_dim")),
    )
