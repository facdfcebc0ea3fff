"""Checkpoints anyone can load: a plain config where the widths allow it, self-contained remote code otherwise.

After the transformers save has written ``config.json`` (with the ``ispasp`` width record) and the weights,
:func:`finish_checkpoint` makes the folder loadable without hf_ispasp:

- **plain**: every layer has the same widths and the architecture's config can state them (the stock class,
  built on the meta device from the rewritten config, has exactly the pruned shapes and head bookkeeping);
  ``config.json`` then holds those widths and stock ``AutoModel*.from_pretrained`` loads it;
- **remote code** otherwise: ``modeling_pruned.py`` (``modeling_template.py`` plus this architecture's layout
  and thin subclasses of the stock classes) and an ``auto_map``, so ``from_pretrained(..., trust_remote_code=True)``
  rebuilds the per-layer widths. ``config.json`` also names an invalid ``transformers_weights`` file: stock
  transformers (5.x) reads that field before building anything and stops with our message
  (:data:`WRONG_WAY`), so a wrong-way load, even with ``ignore_mismatched_sizes=True``, never re-initialises.

transformers' own hook for custom code (``register_for_auto_class`` / ``custom_object_save``) copies the source
file of the model's class and names that class in ``auto_map``; a pruned model is an instance of the stock class
and its config must not carry the wrong-way field in memory, so the hook does not fit. Instead
:func:`attach_portable_save` gives the pruned model an instance-level ``save_pretrained`` that runs the
transformers save and then :func:`finish_checkpoint`; ``save_pruned`` calls :func:`finish_checkpoint` itself.

The same hook writes the model card (:mod:`hf_ispasp.portable.card`: ``README.md`` and a widths picture, never
over a README.md that hf_ispasp did not write), and a pruned model's ``push_to_hub`` is
:func:`hf_ispasp.portable.hub.push_pruned`: transformers' ``push_to_hub`` would write its own README.md after
saving, over the card.
"""

from __future__ import annotations

import json
import logging
import os
import pprint
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_for
from ..adapters.decoders import DecoderAdapter
from ..adapters.encoders import TransformerEncoderAdapter
from ..record import METADATA_KEY

__all__ = [
    "MODELING_FILE",
    "WRONG_WAY",
    "attach_portable_save",
    "clear_portable_fields",
    "finish_checkpoint",
    "plain_config_updates",
    "render_modeling_file",
    "write_card",
]

logger = logging.getLogger(__name__)

MODELING_FILE = "modeling_pruned.py"
_TEMPLATE = Path(__file__).with_name("modeling_template.py")
WRONG_WAY = (
    "not-a-weights-file: this checkpoint was pruned by hf_ispasp and its layers have different widths, which the "
    "stock transformers classes cannot build. Load it with AutoModelFor<Task>.from_pretrained(path, "
    "trust_remote_code=True) (needs only transformers) or hf_ispasp.load_pruned(path)"
)
# Config fields holding the FFN width where it is not ``intermediate_size`` (head counts go through attribute_map).
_FFN_FIELDS = {"gpt2": "n_inner", "distilbert": "hidden_dim"}


# Plain config --------------------------------------------------------------------------------------------------
def _uniform(widths: dict[str, Any]) -> tuple[int, int, int] | None:
    """(groups, neurons, query heads per group) when every layer has the same, else ``None``."""
    values = [widths.get("heads"), widths.get("ffn"), widths.get("q_per_kv") or [1]]
    if not all(isinstance(v, list) and v and len(set(v)) == 1 for v in values):
        return None
    return int(values[0][0]), int(values[1][0]), int(values[2][0])


def _int_attrs(module: nn.Module) -> dict[str, int]:
    """The module's integer bookkeeping (head counts and sizes, feature counts) that a forward may read."""
    return {k: v for k, v in vars(module).items() if type(v) is int}


def _builds_same(model: nn.Module, config: Any, fields: dict[str, Any]) -> bool:
    """Whether the stock class, built from ``config`` on the meta device, has the shapes and head counts of ``model``.

    An attribute that the prune left at the dense config's value (LLaMA's ``mlp.intermediate_size``) is a stale
    copy that the pruned forward does not read, so it may differ.
    """
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights(), torch.device("meta"):
            stock = _stock_class(type(model))(config)
    except Exception as err:  # noqa: BLE001 (any refusal of the stock class means: not plain)
        logger.debug("the stock class rejects the plain config: %s", err)
        return False
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in stock.state_dict().items()}:
        return False
    built, dense = dict(stock.named_modules()), model.config
    for name, module in model.named_modules():
        if name not in built:
            return False
        ours, theirs = _int_attrs(module), _int_attrs(built[name])
        if set(ours) != set(theirs) or any(
            ours[k] != theirs[k] and not (k in fields and ours[k] == getattr(dense, k, None)) for k in ours
        ):
            return False
    return True


def plain_config_updates(model: nn.Module) -> dict[str, Any] | None:
    """``config.json`` fields under which the stock class builds the pruned model as it is, or ``None``.

    Decided by building the stock model from the rewritten config (meta device) and comparing it with ``model``,
    not by a list of families: LLaMA's config refuses head counts that do not divide the hidden size, BERT and
    GPT-2 derive the head size from it, so only some prunes of some families are plain.
    """
    config = getattr(model, "config", None)
    record = getattr(config, METADATA_KEY, None)
    if not isinstance(record, dict) or not isinstance(record.get("widths"), dict) or record.get("added_biases"):
        return None
    widths = record["widths"]
    counts = _uniform(widths)
    if counts is None:
        return None
    groups, neurons, q_per_kv = counts
    names = getattr(config, "attribute_map", {}) or {}
    updates: dict[str, Any] = {
        names.get("num_attention_heads", "num_attention_heads"): groups * q_per_kv,
        _FFN_FIELDS.get(config.model_type, "intermediate_size"): neurons,
    }
    if hasattr(config, "num_key_value_heads"):
        updates["num_key_value_heads"] = groups
    tries = [updates] + ([{**updates, "head_dim": int(widths["head_dim"])}] if "head_dim" in widths else [])
    for fields in tries:
        try:
            candidate = type(config).from_dict({**config.to_dict(), **fields})
        except Exception as err:  # noqa: BLE001 (strict validation errors are no ValueError; LLaMA's head check)
            logger.debug("config %s rejects %s: %s", type(config).__name__, fields, err)
            continue
        if _builds_same(model, candidate, fields):
            return fields
    return None


# Remote code ---------------------------------------------------------------------------------------------------
def _stock_class(cls: type) -> type:
    """The transformers class that ``cls`` is or derives from (a remote-code class derives from one)."""
    for base in cls.__mro__:
        if base.__module__.startswith("transformers."):
            return base
    raise TypeError(f"{cls.__name__} is not a transformers class")


def _layout(model: nn.Module) -> dict[str, Any]:
    """What ``apply_widths`` of the template cuts, from the adapter's layout (one source for both)."""
    adapter = adapter_for(model)
    lay = adapter.layout
    attrs = [[a.path, a.name, a.per_group] for a in lay.head_attrs]
    if isinstance(adapter, TransformerEncoderAdapter):
        heads = {"outputs": [[lay.query, ["d"]], [lay.key, ["d"]], [lay.value, ["d"]]],
                 "down": [lay.attn_out, ["d"]], "attrs": attrs}
        ffn = {"outputs": [[lay.ffn_up, [1]]], "down": [lay.ffn_down, [1]]}
        return {"layers": lay.layers, "heads": heads, "ffn": ffn}
    if isinstance(adapter, DecoderAdapter):
        qkv = [[lay.qkv, ["q", "d", "d"]]] if lay.qkv else [[lay.q, ["q"]], [lay.k, ["d"]], [lay.v, ["d"]]]
        heads = {"outputs": qkv, "down": [lay.out, ["q"]], "attrs": attrs}
        ffn = {"outputs": [[cut.path, list(cut.sizes)] for cut in lay.ffn_ups], "down": [lay.ffn_down, [1]]}
        return {"layers": lay.layers, "heads": heads, "ffn": ffn, "attention": lay.attention,
                "config_head_counts": adapter.config_head_counts}
    raise TypeError(f"no portable layout for {type(adapter).__name__}: load this checkpoint with load_pruned")


def _auto_classes(model_type: str, class_name: str) -> list[str]:
    """The ``AutoModel*`` classes that map ``model_type`` to ``class_name``."""
    from transformers.models.auto import modeling_auto

    found = []
    for name in dir(modeling_auto):
        mapping = getattr(getattr(modeling_auto, name), "_model_mapping", None)
        entry = getattr(mapping, "_model_mapping", {}).get(model_type) if name.startswith("AutoModel") else None
        if entry == class_name or (isinstance(entry, (list, tuple)) and class_name in entry):
            found.append(name)
    return found


def render_modeling_file(model: nn.Module) -> tuple[str, dict[str, str]]:
    """The source of ``modeling_pruned.py`` for ``model`` and the ``auto_map`` that points into it."""
    head = _stock_class(type(model))
    base = _stock_class(type(getattr(model, "base_model", model)))
    config_class = _stock_class(type(model.config))
    module = MODELING_FILE.removesuffix(".py")
    classes = [config_class.__name__] + sorted({head.__name__, base.__name__})
    lines = [
        f"from transformers import {', '.join(sorted(classes))}  # noqa: E402",
        "",
        f"LAYOUT.update({pprint.pformat(_layout(model), width=110, sort_dicts=False)})",
        "",
        "",
        f"class Pruned{config_class.__name__}(PrunedConfigMixin, {config_class.__name__}):",
        "    pass",
    ]
    auto_map = {"AutoConfig": f"{module}.Pruned{config_class.__name__}"}
    for cls in sorted({head, base}, key=lambda c: c.__name__):
        lines += ["", "", f"class Pruned{cls.__name__}(PrunedModelMixin, {cls.__name__}):",
                  f"    config_class = Pruned{config_class.__name__}"]
        for auto in _auto_classes(model.config.model_type, cls.__name__):
            auto_map[auto] = f"{module}.Pruned{cls.__name__}"
    source = _TEMPLATE.read_text(encoding="utf-8").replace('"@WRONG_WAY@"', repr(WRONG_WAY))
    return source + "\n".join(lines) + "\n", auto_map


# Writing the checkpoint ----------------------------------------------------------------------------------------
def clear_portable_fields(config: Any) -> None:
    """Drop what :func:`finish_checkpoint` wrote into ``config.json`` from a loaded config (``load_pruned``)."""
    if getattr(config, "transformers_weights", None) == WRONG_WAY:
        del config.transformers_weights
    if getattr(config, "auto_map", None) is not None:
        del config.auto_map


def finish_checkpoint(model: nn.Module, folder: str | os.PathLike) -> str | None:
    """Make the checkpoint that ``save_pretrained`` wrote into ``folder`` loadable without hf_ispasp.

    Returns ``"plain"``, ``"remote_code"`` or ``None`` (not a pruned transformers checkpoint: left as it is).
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if METADATA_KEY not in saved or not hasattr(getattr(model, "config", None), "to_dict"):
        return None
    saved["architectures"] = [_stock_class(type(model)).__name__]
    saved.pop("auto_map", None)
    saved.pop("transformers_weights", None)
    code = Path(folder) / MODELING_FILE
    updates = plain_config_updates(model)
    if updates is not None:
        saved.update(updates)
        code.unlink(missing_ok=True)
        kind = "plain"
    else:
        source, auto_map = render_modeling_file(model)
        code.write_text(source, encoding="utf-8")
        saved["auto_map"] = auto_map
        saved["transformers_weights"] = WRONG_WAY
        kind = "remote_code"
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return kind


def write_card(model: nn.Module, folder: str | os.PathLike, kind: str | None,
               target: str | os.PathLike | None = None) -> None:
    """The model card beside a checkpoint that :func:`finish_checkpoint` made portable (``kind``), if it can be built.

    A card that cannot be built is logged, not raised: the checkpoint itself is complete by then. ``target``: see
    :func:`hf_ispasp.portable.card.write_model_card`.
    """
    if kind is None:
        return
    from .card import write_model_card

    try:
        write_model_card(model, folder, target=target, checkpoint=kind)
    except Exception as err:  # noqa: BLE001 (the checkpoint is written; a card must not fail the save)
        logger.warning("hf_ispasp: the model card of %s was not written: %s", target or folder, err)


class _PortableSave:
    """``model.save_pretrained`` of a pruned model: the transformers save, :func:`finish_checkpoint`, the card.

    The model card (``README.md`` and its widths picture, :mod:`hf_ispasp.portable.card`) is written unless the
    folder holds a README.md that hf_ispasp did not write; a card that cannot be built is logged, not raised,
    because the checkpoint itself is complete by then.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        push = kwargs.pop("push_to_hub", False)
        hub = ("repo_id", "token", "commit_message", "private", "create_pr")
        push_kwargs = {k: kwargs.pop(k) for k in hub if k in kwargs}
        type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        kind = finish_checkpoint(self.model, save_directory)
        if kwargs.get("is_main_process", True):
            write_card(self.model, save_directory, kind)
        if push:  # as transformers' save_pretrained(push_to_hub=True): the folder name is the default repo
            repo_id = push_kwargs.pop("repo_id", None) or Path(save_directory).name
            self.model.push_to_hub(repo_id, **push_kwargs)


class _PortablePush:
    """``model.push_to_hub`` of a pruned model: :func:`hf_ispasp.portable.hub.push_pruned` (checkpoint + card).

    transformers' own ``push_to_hub`` writes its README.md after ``save_pretrained``, over the pruning card.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, repo_id: str, **kwargs: Any) -> Any:
        from .hub import push_pruned

        return push_pruned(self.model, repo_id, **kwargs)


def attach_portable_save(model: nn.Module) -> None:
    """Make the ordinary ``model.save_pretrained(folder)`` write a portable checkpoint with its model card, and
    ``model.push_to_hub(repo_id)`` upload both (instance attributes)."""
    if hasattr(model, "save_pretrained") and hasattr(getattr(model, "config", None), "to_dict"):
        model.save_pretrained = _PortableSave(model)
        if hasattr(model, "push_to_hub"):
            model.push_to_hub = _PortablePush(model)
