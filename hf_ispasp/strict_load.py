"""Strict loading of a pruned checkpoint's weights into its rebuilt skeleton, shared by every checkpoint format.

A leaf below :mod:`hf_ispasp.serialization` and :mod:`hf_ispasp.timm_format`, so the format that
``serialization`` registers can use it without importing ``serialization`` back.
"""

from __future__ import annotations

import torch
from torch import nn

from .record import METADATA_KEY

__all__ = ["CheckpointMismatchError", "load_state_dict_checked"]


class CheckpointMismatchError(ValueError):
    """The weights of a checkpoint do not match the widths recorded in its pruning metadata."""


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names the modules whose shapes disagree with the (pruned) skeleton."""
    params = dict(model.state_dict(keep_vars=True))
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs recorded {tuple(params[key].shape)}"
        for key, value in state.items()
        if key in params and tuple(params[key].shape) != tuple(value.shape)
    ]
    unexpected = sorted(set(state) - set(params))
    # Tied parameters (e.g. an MLM decoder sharing the embeddings) are stored once.
    by_id: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), []).append(name)
    missing = sorted(
        key for key in set(params) - set(state) if not any(alias in state for alias in by_id[id(params[key])])
    )
    if mismatched or unexpected or missing:
        modules = sorted({m.split(":")[0].rsplit(".", 1)[0] for m in mismatched})
        raise CheckpointMismatchError(
            f"the weights in {source} do not match the widths recorded in its pruning metadata "
            f"(config.{METADATA_KEY}).\n"
            + (f"Modules with mismatched shapes: {modules}\n  " + "\n  ".join(mismatched[:20]) + "\n"
               if mismatched else "")
            + (f"Missing keys: {missing[:20]}\n" if missing else "")
            + (f"Unexpected keys: {unexpected[:20]}\n" if unexpected else "")
            + "Re-save the pruned model with save_pretrained (which writes both), or fix config.json's "
            f"'{METADATA_KEY}' record."
        )
    model.load_state_dict(state, strict=False)
