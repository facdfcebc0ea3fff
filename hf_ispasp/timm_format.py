"""The timm checkpoint format: safetensors weights plus a JSON record of architecture, kwargs and widths.

timm models have no ``save_pretrained``/``config.json``, so :func:`hf_ispasp.save_pruned` writes this format for
them and :func:`hf_ispasp.load_pruned` rebuilds the model from it; :mod:`hf_ispasp.serialization` registers it.
timm is optional (``pip install hf_ispasp[timm]``): it is imported only where a timm model is built.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters.base import adapter_for
from .strict_load import empty_skeleton, load_state_dict_checked, read_safetensors
from .version import __version__

__all__ = [
    "TIMM_FORMAT",
    "TIMM_RECORD",
    "create_timm_model",
    "is_timm_folder",
    "is_timm_model",
    "load_timm_pruned",
    "save_timm_pruned",
]

TIMM_RECORD = "ispasp_timm.json"
TIMM_FORMAT = "hf_ispasp.timm/1"
WEIGHTS = "model.safetensors"


def create_timm_model(name: str, input_size: int | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` that remembers ``kwargs`` so :func:`load_pruned` can rebuild it.

    ``save_pruned`` records the architecture and ``num_classes`` of any timm model; constructor arguments beyond
    those (``img_size``, ``channels``, ``depth``, ...) are only known when the model was built here or when
    ``model.ispasp_timm_kwargs`` is set by hand. ``input_size`` (pixels) sets the resolution used for FLOPs
    counting in the pruning report (``pretrained_cfg['input_size']``).
    """
    import timm

    model = timm.create_model(name, **kwargs)
    model.ispasp_timm_kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "num_classes")}
    if input_size is not None:
        channels = model.pretrained_cfg.get("input_size", (3,))[0]
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (channels, input_size, input_size)}
    return model


def is_timm_model(model: nn.Module) -> bool:
    """A model built by timm: it has no ``save_pretrained``, so it needs this format."""
    return type(model).__module__.startswith("timm.") and not hasattr(model, "save_pretrained")


def save_timm_pruned(model: nn.Module, folder: str) -> None:
    """Weights as safetensors plus a JSON record: timm architecture, constructor arguments and per-block widths."""
    adapter = adapter_for(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture")
    if not architecture:
        raise ValueError(
            f"cannot save this {type(model).__name__}: it has no pretrained_cfg['architecture']; build timm models "
            "with timm.create_model(name, ...) so the checkpoint can be rebuilt"
        )
    metadata = getattr(model, "ispasp_metadata", None) or {}
    record = {
        "format": TIMM_FORMAT,
        "version": __version__,
        "architecture": architecture,
        "model_kwargs": adapter.create_kwargs(),
        "widths": adapter.widths(),
        "pruner_config": metadata.get("pruner_config"),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, TIMM_RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


def is_timm_folder(path: str) -> bool:
    """A folder written by :func:`save_timm_pruned` (it holds the JSON record)."""
    return os.path.isfile(os.path.join(path, TIMM_RECORD))


def load_timm_pruned(path: str, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a timm model saved by :func:`save_timm_pruned`: meta skeleton, recorded widths, strict load."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"{path} is a timm checkpoint; install timm: pip install 'hf_ispasp[timm]'") from err
    with open(os.path.join(path, TIMM_RECORD), encoding="utf-8") as f:
        record = json.load(f)
    if record.get("format") != TIMM_FORMAT:
        raise ValueError(f"{path}: record format {record.get('format')!r} is not {TIMM_FORMAT!r}")
    with empty_skeleton():  # parameters on the meta device: no dense detour
        model = timm.create_model(record["architecture"], pretrained=False, **record.get("model_kwargs", {}))
    adapter_for(model).apply_widths(record["widths"])
    state = read_safetensors(os.path.join(path, WEIGHTS), torch_dtype)
    dtype = torch_dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.to(dtype)
    load_state_dict_checked(model, state, path)
    model.ispasp_metadata = {
        "version": record.get("version"), "widths": record["widths"], "pruner_config": record.get("pruner_config"),
    }
    model.eval()
    return model
