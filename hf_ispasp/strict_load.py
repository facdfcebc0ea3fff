"""Strict loading of a pruned checkpoint's weights into its rebuilt skeleton, shared by every checkpoint format.

Loading never builds the dense model: the skeleton is made on the meta device (:func:`empty_skeleton`; buffers,
which a forward may compute at construction, such as rotary frequencies, stay real), cut to the recorded widths
there, and the weights read from the file become its parameters (``assign``), so the peak memory of a load is
the pruned model plus one tensor (measured in ``benchmarks/load_memory.py``).

A leaf below :mod:`hf_ispasp.serialization` and :mod:`hf_ispasp.timm_format`, so the format that
``serialization`` registers can use it without importing ``serialization`` back.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator

import torch
from torch import nn

from .record import METADATA_KEY

__all__ = ["CheckpointMismatchError", "empty_skeleton", "load_state_dict_checked", "read_safetensors"]

# safetensors dtype names (the format's header).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointMismatchError(ValueError):
    """The weights of a checkpoint do not match the widths recorded in its pruning metadata."""


@contextlib.contextmanager
def empty_skeleton() -> Iterator[None]:
    """Build models inside this block with their parameters on the meta device and their buffers real.

    Buffers are small and some are computed in ``__init__`` and not stored (rotary ``inv_freq``, BERT's
    ``position_ids``); parameters are all in the checkpoint. accelerate moves each parameter to the meta device as
    it is registered, so at most one dense parameter is ever reserved (virtual memory, never written: no
    initialisation runs) and none is resident; transformers' ``no_init_weights`` also skips the random
    initialisation of the real buffers.
    """
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    with no_init_weights(), init_empty_weights(include_buffers=False):
        yield


def read_safetensors(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read (not memory-mapped) one at a time, floating ones cast to ``dtype``.

    Plain reads keep the file out of the process's resident memory and let a cast to another dtype cost one
    tensor of the stored dtype at a time, never the whole file.
    """
    state: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        start = 8 + size
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            stored = _DTYPES.get(entry["dtype"])
            if stored is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which hf_ispasp cannot read")
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=stored)
            buffer = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else None
            if buffer is not None:
                f.seek(start + begin)
                if f.readinto(buffer) != end - begin:
                    raise ValueError(f"{path} is truncated: tensor {name!r} is incomplete; save the model again")
            if dtype is not None and tensor.is_floating_point() and stored != dtype:
                tensor = tensor.to(dtype)
            state[name] = tensor
    return state


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names the modules whose shapes disagree with the (pruned) skeleton.

    The tensors of ``state`` become the parameters (``assign``), so a skeleton built by :func:`empty_skeleton`
    is filled without a copy; a parameter still on the meta device afterwards is an error.
    """
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
    state = dict(state)
    for names in by_id.values():  # a tied tensor stored once fills every alias (assign replaces them one by one)
        stored = next((name for name in names if name in state), None)
        for name in names if stored is not None else ():
            state.setdefault(name, state[stored])
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the aliases hold equal tensors; make them one parameter again
    empty = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    if empty:
        raise CheckpointMismatchError(f"the weights in {source} do not fill {empty[:20]}: save the model again")
