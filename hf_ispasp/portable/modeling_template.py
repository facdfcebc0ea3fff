"""Stock transformers classes reshaped to the per-layer widths that hf_ispasp recorded in ``config.json``.

This file travels with a pruned checkpoint and needs only torch and transformers (hf_ispasp need not be
installed). Load the checkpoint with ``AutoModelFor<Task>.from_pretrained(folder, trust_remote_code=True)``.

Each class below subclasses the stock class of the architecture and, once the stock layers are built, replaces
the projections of every layer by empty ones of the recorded widths (``config.ispasp["widths"]``); the weights
then load strictly from the checkpoint. ``LAYOUT`` says, for this architecture, which modules lose rows or
columns with each attention group (a head, or a key/value head with its query heads) and each FFN neuron:
a row map such as ``["q", "d", "d"]`` means one run of ``q`` (query heads per KV head x head size) units, then
one of ``d`` (head size), then ``d`` per group, as in a fused ``[q | k | v]`` projection.

``config.json`` also names an invalid ``transformers_weights`` file: stock classes stop on it with a message
pointing here, instead of re-initialising the pruned layers. The config class below drops that field.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

RECORD_KEY = "ispasp"
WRONG_WAY = "@WRONG_WAY@"
LAYOUT: dict[str, Any] = {}  # this checkpoint's architecture, set at the end of the file


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split(".") if path else ():
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent), name, module)


def _resized(module: nn.Module, units: int, output: bool) -> nn.Module:
    """An empty module like ``module`` with ``units`` outputs (or inputs); the checkpoint fills its weights."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        rows, cols = (units, module.in_features) if output else (module.out_features, units)
        return nn.Linear(cols, rows, bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
    if isinstance(module, Conv1D):  # GPT-2: weight stored as (inputs, outputs)
        inputs, outputs = weight.shape
        return Conv1D(units if output else outputs, inputs if output else units).to(weight.device, weight.dtype)
    params = dict(module.named_parameters(recurse=False))
    if output and params and all(p.dim() == 1 for p in params.values()):  # a per-channel norm
        for name, param in params.items():
            setattr(module, name, nn.Parameter(param.new_empty(units), requires_grad=param.requires_grad))
        if hasattr(module, "normalized_shape"):
            module.normalized_shape = (units,)
        return module
    raise TypeError(f"cannot resize a {type(module).__name__}")


class _LayerConfig:
    """The model config seen through one layer's head counts (Phi-3 attention reads them from its config)."""

    def __init__(self, config: Any, **counts: int) -> None:
        self.__dict__["_config"], self.__dict__["_counts"] = config, dict(counts)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_counts" not in self.__dict__:
            raise AttributeError(name)
        counts = self.__dict__["_counts"]
        return counts[name] if name in counts else getattr(self.__dict__["_config"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__["_counts"]:
            self.__dict__["_counts"][name] = value
        else:
            setattr(self.__dict__["_config"], name, value)


def apply_widths(model: nn.Module, config: Any) -> None:
    """Reshape the freshly built ``model`` to the widths recorded in ``config`` (no-op without a record)."""
    record = getattr(config, RECORD_KEY, None)
    if not isinstance(record, dict) or "widths" not in record:
        return
    widths = record["widths"]
    layers = _get(getattr(model, "base_model", model), LAYOUT["layers"])
    if any(len(widths[kind]) != len(layers) for kind in ("heads", "ffn")):
        raise ValueError(f"the width record covers {len(widths['heads'])} layers, the model has {len(layers)}")
    head_dim = int(widths["head_dim"])
    for index, layer in enumerate(layers):
        q_per_kv = int((widths.get("q_per_kv") or [1] * len(layers))[index])
        units = {"d": head_dim, "q": q_per_kv * head_dim}
        for kind in ("heads", "ffn"):
            spec, count = LAYOUT[kind], int(widths[kind][index])
            for path, rows in spec["outputs"]:
                _set(layer, path, _resized(_get(layer, path), count * sum(units.get(r, r) for r in rows), True))
            path, rows = spec["down"]
            _set(layer, path, _resized(_get(layer, path), count * sum(units.get(r, r) for r in rows), False))
            for path, name, per_group in spec.get("attrs", ()):
                module = _get(layer, path)
                size = getattr(module, per_group) if isinstance(per_group, str) else per_group
                setattr(module, name, count * size)
        if "attention" in LAYOUT:  # grouped-query attention: query heads per KV head, per-layer head counts
            attention, kv_heads = _get(layer, LAYOUT["attention"]), int(widths["heads"][index])
            if hasattr(attention, "num_key_value_groups"):
                attention.num_key_value_groups = q_per_kv
            if hasattr(attention, "num_key_value_heads"):
                attention.num_key_value_heads = kv_heads
            if LAYOUT.get("config_head_counts"):
                attention.config = _LayerConfig(config, num_attention_heads=q_per_kv * kv_heads,
                                                num_key_value_heads=kv_heads)
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for path in record.get("added_biases") or []:  # biases a prune added (FLAP); the checkpoint fills them
        if model is getattr(model, "base_model", None) and path.startswith(prefix):
            path = path[len(prefix):]  # a base model loaded from a checkpoint with a head
        module = model.get_submodule(path)
        if module.bias is None:
            module.bias = nn.Parameter(module.weight.new_zeros(module.weight.shape[0]))


class PrunedConfigMixin:
    """Drops the field that stops stock loaders; writes it back on save so a re-saved checkpoint keeps it."""

    def __post_init__(self, **kwargs: Any) -> None:
        if kwargs.get("transformers_weights") == WRONG_WAY:
            del kwargs["transformers_weights"]
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "transformers_weights": WRONG_WAY}

    def to_diff_dict(self) -> dict[str, Any]:
        return {**super().to_diff_dict(), "transformers_weights": WRONG_WAY}


class PrunedModelMixin:
    """Builds the stock model, then reshapes its layers to the recorded widths."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        apply_widths(self, config)


# --- generated for this checkpoint by hf_ispasp ---
