"""Compacted checkpoints: the width record travels in ``config.json``; loading rebuilds shapes, then loads strictly.

transformers 5 has no ``prune_heads``/``config.pruned_heads``, so ``from_pretrained`` cannot rebuild a sliced
model by itself. ``ISpaSPPruner`` writes ``config.ispasp = {"widths": ..., "pruner_config": ..., "version": ...}``,
which the ordinary ``save_pretrained`` keeps; :func:`load_pruned` builds the dense skeleton from the config,
applies the recorded widths through the architecture's adapter and then loads the weights strictly.

A prune may also give a bias-free projection a bias (FLAP's bias compensation on LLaMA's ``o_proj`` /
``down_proj``); the record lists those modules under ``"added_biases"`` and loading recreates them (zeros) before
the strict load, which then fills them.

Both ``save_pruned`` and the ``save_pretrained`` of a pruned model also make the checkpoint loadable without
hf_ispasp (a plain config or a modeling file, see :mod:`hf_ispasp.portable`); :func:`load_pruned` reads those
checkpoints as well as older ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import timm_format
from .adapters import adapter_for
from .atomic import CheckpointFolderError, atomic_directory, readable_folder
from .portable import attach_portable_save, clear_portable_fields, finish_checkpoint, write_card
from .record import METADATA_KEY
from .strict_load import CheckpointMismatchError, empty_skeleton, load_state_dict_checked, read_safetensors

__all__ = [
    "ADDED_BIASES_KEY",
    "CheckpointFolderError",
    "CheckpointMismatchError",
    "add_zero_bias",
    "atomic_directory",
    "load_pruned",
    "load_state_dict_checked",
    "looks_like_hub_id",
    "register_format",
    "restore_added_biases",
    "save_pruned",
]

logger = logging.getLogger(__name__)

# Entry of the width record listing the modules (dotted paths from the model root) that the prune gave a bias.
ADDED_BIASES_KEY = "added_biases"


def add_zero_bias(module: nn.Module) -> nn.Parameter:
    """Give a bias-free ``nn.Linear`` / ``nn.Conv*`` a zero bias parameter (same dtype and device) and return it."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or weight is None:
        raise TypeError(f"cannot add a bias to a {type(module).__name__}: only Linear and Conv layers take one")
    if module.bias is not None:
        return module.bias
    module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                               requires_grad=weight.requires_grad)
    return module.bias


def restore_added_biases(model: nn.Module, record: dict[str, Any]) -> None:
    """Recreate the biases a prune added (``record["added_biases"]``) on a freshly built skeleton."""
    for path in record.get(ADDED_BIASES_KEY) or []:
        try:
            module = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"the pruning record names {path!r} among its added biases, but the model has no such "
                             "module: the checkpoint's config does not match its pruning metadata") from err
        add_zero_bias(module)

# Checkpoint formats other than transformers (e.g. timm) register a saver and a loader:
# (matches(model) -> bool, save(model, folder)) and (detect(folder) -> bool, load(folder, torch_dtype=None) -> model).
_SAVERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module, str], None]]] = []
_LOADERS: list[tuple[Callable[[str], bool], Callable[..., nn.Module]]] = []


def register_format(
    matches: Callable[[nn.Module], bool],
    save: Callable[[nn.Module, str], None],
    detect: Callable[[str], bool],
    load: Callable[..., nn.Module],
) -> None:
    """Teach :func:`save_pruned` / :func:`load_pruned` another checkpoint format (timm's is registered below)."""
    _SAVERS.append((matches, save))
    _LOADERS.append((detect, load))


# Built in: timm models (imported lazily by the format's functions, so this costs nothing without timm).
register_format(timm_format.is_timm_model, timm_format.save_timm_pruned, timm_format.is_timm_folder,
                timm_format.load_timm_pruned)


def save_pruned(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, **kwargs: Any) -> None:
    """Save a pruned model atomically (``save_pretrained`` for transformers models), losing nothing.

    Files already in ``path`` that no save of ours wrote are kept untouched; our own files are replaced one by
    one, and an interrupt at any point leaves the old or the new checkpoint readable by :func:`load_pruned`
    (see :mod:`hf_ispasp.atomic`).

    Args:
        model: A model returned by :meth:`ISpaSPPruner.prune`.
        path: Output folder (created if needed).
        tokenizer: Optional tokenizer / processor saved into the same checkpoint (anything with
            ``save_pretrained``), in the same atomic step.
        kwargs: Passed to ``save_pretrained``.
    """
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must have save_pretrained (a tokenizer or processor), got {type(tokenizer)}")

    def with_tokenizer(save: Callable[[str], None]) -> Callable[[str], None]:
        def write(tmp: str) -> None:
            save(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        return write

    for matches, save in _SAVERS:
        if matches(model):
            atomic_directory(path, with_tokenizer(lambda tmp, save=save: save(model, tmp)))
            return
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"cannot save a {type(model).__name__}: it is neither a transformers model nor a model with a "
            "registered hf_ispasp checkpoint format (see hf_ispasp.serialization.register_format)"
        )
    # transformers 5 renames some weights back to their legacy names on save (e.g. ViT's `encoder.layer`);
    # load_pruned reads the file directly, so keep the names of the module tree.
    kwargs.setdefault("save_original_format", False)

    def save(tmp: str) -> None:
        type(model).save_pretrained(model, tmp, **kwargs)  # the transformers save, then the portable part
        write_card(model, tmp, finish_checkpoint(model, tmp), target=path)  # never over the user's README.md

    atomic_directory(path, with_tokenizer(save))


def _state_dict_files(path: str) -> list[str]:
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [cached_file(path, shard) for shard in shards]
    single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    if not single:
        raise FileNotFoundError(f"no model.safetensors in {path}; save the pruned model with save_pretrained")
    return [single]


def _to_module_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo transformers 5's save-time renaming to legacy names (e.g. ViT ``encoder.layer``) with its own mapping."""
    expected = model.state_dict()
    if set(state) <= set(expected):
        return state
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        if converters:  # merges/splits of tensors: leave the keys for the strict check to report
            return state
        prefix = getattr(model, "base_model_prefix", None)
        renamed = {rename_source_key(k, renamings, [], prefix, expected)[0]: v for k, v in state.items()}
    except (ImportError, AttributeError, TypeError, ValueError):
        return state
    return renamed if len(renamed) == len(state) else state


def looks_like_hub_id(path: str) -> bool:
    """``name`` or ``owner/name``: what a missing local path may still be (anything else is a local path)."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path)) and not path.startswith(".")


def _resolve_local(path: str) -> str:
    """A local folder (the complete one of an interrupted save), or ``path`` unchanged when it is a Hub id."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return readable_folder(expanded)
    if os.path.exists(expanded):
        raise NotADirectoryError(f"{path} is a file; load_pruned takes the folder written by save_pruned")
    if not looks_like_hub_id(path):
        raise FileNotFoundError(
            f"no checkpoint folder at {path}: pass the folder written by save_pruned / save_pretrained, "
            "or a Hub id such as 'user/model-pruned'"
        )
    return path


def load_pruned(path: str | os.PathLike, torch_dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """Load a checkpoint written from a pruned model, with its compacted shapes.

    Args:
        path: Local folder or Hub id holding ``config.json`` (with the ``ispasp`` record) and safetensors weights.
        torch_dtype: Cast the loaded model to this dtype (default: the dtype of the stored weights).
        kwargs: Passed to ``AutoConfig.from_pretrained`` (e.g. ``revision``, ``token``).
    """
    path = _resolve_local(os.fspath(path))
    for detect, load in _LOADERS:
        if detect(path):
            return load(path, torch_dtype=torch_dtype)
    import transformers
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load {path!r}: it is not a local folder, and as a Hub id it could not be read ({err}). "
            "Pass the folder written by save_pruned / save_pretrained."
        ) from err
    record = getattr(config, METADATA_KEY, None)
    if not isinstance(record, dict) or "widths" not in record:
        raise ValueError(
            f"{path} has no '{METADATA_KEY}' pruning record in config.json, so it is not an hf_ispasp checkpoint; "
            "load it with the usual from_pretrained"
        )
    clear_portable_fields(config)
    architectures = [name.removeprefix("Pruned") if not hasattr(transformers, name) else name
                     for name in getattr(config, "architectures", None) or []]  # a re-saved remote-code model
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(f"config.json of {path} names no known model class (architectures={architectures})")
    with empty_skeleton():  # parameters on the meta device: no dense detour
        model = getattr(transformers, architectures[0])(config)
    adapter_for(model).apply_widths(record["widths"])
    restore_added_biases(model, record)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied parameters are stored once; tie first so the strict check knows the aliases
    state: dict[str, torch.Tensor] = {}
    for file in _state_dict_files(path):
        state.update(read_safetensors(file, torch_dtype))
    state = _to_module_names(model, state)
    dtype = torch_dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}  # one dtype, as before
    model.to(dtype)  # the real buffers (meta parameters cost nothing)
    load_state_dict_checked(model, state, path)
    model.eval()
    attach_portable_save(model)
    return model
