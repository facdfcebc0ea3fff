"""What the pruner needs to know about an architecture, and the registry that maps models to adapters.

An adapter answers three questions for the engine: which groups each layer has (and where their hidden
representation is read), how to slice them, and how to record and re-apply the new widths. It knows
nothing of the selection algorithm.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "ADAPTER_REGISTRY",
    "ModelAdapter",
    "PrunableBlock",
    "Resume",
    "UnsupportedModelError",
    "adapter_for",
    "register_adapter",
    "supported_model_types",
]


class UnsupportedModelError(ValueError):
    """The model's architecture has no registered adapter."""


@dataclass
class PrunableBlock:
    """One prunable block of a layer: ``H`` is the input of ``down``; groups are ``group_size`` columns.

    ``kind`` is ``"heads"`` (budget from ``head_keep_ratio``) or ``"ffn"`` (``ffn_keep_ratio``; CNN inner
    channels use it too). ``partitions`` > 1: the groups fall into that many equal, contiguous runs and every run
    keeps the same number of groups (query heads inside each key/value head under ``gqa_groups="query"``).
    """

    name: str
    kind: str
    layer: int
    down: nn.Module
    group_size: int
    num_groups: int
    partitions: int = 1


@dataclass
class Resume:
    """Where a layer can be finished without running it from the start.

    ``entry`` is a module that runs, once per forward, after the layer's earlier blocks and before the last
    block's ``down``; ``tail(x)`` maps the first positional input ``x`` of ``entry`` to the layer's output hidden
    states, with the layer's current (possibly compacted) modules, e.g. for BERT
    ``tail(x) = layer.output(layer.intermediate(x), x)``. The engine caches ``x`` during the last block's
    statistics pass and propagates with ``tail``: each layer then runs at most twice per batch.

    ``skip(z, x)`` (optional, layers of two blocks): the input of ``entry`` from ``z``, the input of the first
    block's ``down`` restricted to the columns that block kept, and ``x``, the layer's input hidden states, with
    the compacted modules; for BERT ``skip(z, x) = layer.attention.output(z, x)``. The engine then caches ``z``
    during the first block's statistics pass and starts the last block's at its ``down`` instead of running the
    first block again (the attention's projections and scores, a quarter to a third of an encoder layer).
    """

    entry: nn.Module
    tail: Callable[[torch.Tensor], torch.Tensor]
    skip: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


logger = logging.getLogger(__name__)

ADAPTER_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(*keys: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Register an adapter class for ``config.model_type`` values (or timm class names); refuses duplicates."""

    def wrap(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        for key in keys:
            if key in ADAPTER_REGISTRY:
                raise ValueError(f"an adapter is already registered for {key!r}: {ADAPTER_REGISTRY[key].__name__}")
            ADAPTER_REGISTRY[key] = cls
        cls.registry_keys = tuple(cls.registry_keys) + tuple(keys)
        return cls

    return wrap


def supported_model_types() -> list[str]:
    return sorted(ADAPTER_REGISTRY)


def model_key(model: nn.Module) -> str:
    """Registry key of a model: ``config.model_type`` for transformers, the class name otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type:
        return model_type
    return type(model).__name__


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered adapter for ``model``, or an error that says how to add one."""
    key = model_key(model)
    cls = ADAPTER_REGISTRY.get(key)
    if cls is None:
        raise UnsupportedModelError(
            f"hf_ispasp has no adapter for model_type {key!r} ({type(model).__name__}). "
            f"Supported: {', '.join(supported_model_types())}. To add one, subclass "
            "hf_ispasp.adapters.ModelAdapter and decorate it with "
            f"@hf_ispasp.register_adapter({key!r}) (see hf_ispasp/adapters/encoders.py for an example)."
        )
    return cls(model)


class ModelAdapter(ABC):
    """Base class of architecture adapters.

    Subclasses implement :meth:`layers`, :meth:`blocks`, :meth:`compact`, :meth:`widths` and
    :meth:`apply_widths`; the defaults of the other hooks fit transformers models whose layers take the
    hidden states as first argument and whose blocks read ``H`` as the input of a ``nn.Linear``.
    """

    registry_keys: ClassVar[tuple[str, ...]] = ()
    # Post-norm layers (BERT family): every block's output is layer-normalised with its input before anything reads
    # it, so the stream stays at the scale of the layer input. Pre-norm layers (decoders, ViTs) and residual CNNs
    # add block outputs to a stream that grows. Budget allocation measures a block's error against the layer input
    # in the first case and against the stream the block writes into in the second (hf_ispasp.budget).
    post_norm: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def configure(self, config: Any) -> None:  # noqa: B027 (optional hook)
        """Take the options of a :class:`~hf_ispasp.PrunerConfig` that change the groups (e.g. ``gqa_groups``)."""

    # Structure -------------------------------------------------------------------------------------
    @abstractmethod
    def layers(self) -> Sequence[nn.Module]:
        """Modules run one after the other; calibration inputs are cached between them."""

    @abstractmethod
    def blocks(self, layer: int) -> list[PrunableBlock]:
        """Prunable blocks of ``layer`` in forward order."""

    @abstractmethod
    def compact(self, block: PrunableBlock, groups: torch.Tensor) -> None:
        """Physically keep only ``groups`` (sorted group indices) of ``block``."""

    @abstractmethod
    def widths(self) -> dict[str, Any]:
        """JSON-serialisable record of the current per-layer widths."""

    @abstractmethod
    def apply_widths(self, record: Mapping[str, Any]) -> None:
        """Reshape a freshly built (dense) model to the widths of ``record`` (weights are loaded after)."""

    # Calibration -----------------------------------------------------------------------------------
    def prepare_batch(self, batch: Any, device: torch.device) -> tuple[tuple, dict[str, Any], torch.Tensor | None]:
        """(args, kwargs) for ``model(*args, **kwargs)`` and the token mask (``None``: every position counts)."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"calibration batches for {type(self.model).__name__} must be dicts of tensors "
                f"(input_ids, attention_mask, ...), got {type(batch).__name__}"
            )
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            raise ValueError(
                f"a calibration batch has no 'input_ids' (keys: {sorted(batch)}); tokenize the text first, e.g. "
                "dataset.map(lambda x: tokenizer(x['text'], truncation=True), batched=True)"
            )
        kwargs: dict[str, Any] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds"):
            if key in batch and batch[key] is not None:
                value = batch[key]
                if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor) and (
                    value[0].dim() == 1
                ):
                    raise ValueError(
                        f"calibration batch '{key}' is a list of {len(value)} tensors, the shape torch's default "
                        "collate gives a tokenized datasets.Dataset (one tensor per position); use "
                        "collate_fn=DataCollatorWithPadding(tokenizer) in the DataLoader, or pass the Dataset itself"
                    )
                try:
                    value = torch.as_tensor(value)
                except (ValueError, TypeError, RuntimeError) as err:
                    raise ValueError(
                        f"calibration batch '{key}' cannot be made a tensor ({err}); sequences of different lengths "
                        "must be padded: use collate_fn=DataCollatorWithPadding(tokenizer) or pass the Dataset itself"
                    ) from None
                kwargs[key] = value.to(device)
        reference_key = "input_ids" if "input_ids" in kwargs else "inputs_embeds"
        if reference_key not in kwargs:
            raise ValueError(f"a calibration batch has input_ids=None (keys: {sorted(batch)})")
        token_dims = 1 if reference_key == "input_ids" else 2
        if kwargs[reference_key].dim() == token_dims:  # one unbatched sequence
            kwargs = {k: v.unsqueeze(0) for k, v in kwargs.items()}
        shape = tuple(kwargs[reference_key].shape[:2])
        if kwargs[reference_key].dim() != token_dims + 1:
            raise ValueError(
                f"calibration '{reference_key}' has shape {tuple(kwargs[reference_key].shape)}; expected "
                f"(batch, sequence{', hidden' if token_dims == 2 else ''})"
            )
        for key in ("attention_mask", "token_type_ids", "position_ids"):
            if key in kwargs and tuple(kwargs[key].shape) != shape:
                raise ValueError(
                    f"calibration batch '{key}' has shape {tuple(kwargs[key].shape)} but {reference_key} has "
                    f"{shape}; they must match (batch, sequence): pad them together, e.g. with "
                    "DataCollatorWithPadding(tokenizer)"
                )
        ids = kwargs.get("input_ids")
        if ids is not None and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
            raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}; did you pass embeddings?")
        mask = kwargs.get("attention_mask")
        pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if mask is None and ids is not None and pad is not None and bool((ids == pad).any()):
            if not getattr(self, "_warned_mask", False):
                logger.warning(
                    "calibration batches have no attention_mask; treating token id %d (pad_token_id) as padding. "
                    "Pass the tokenizer's attention_mask to make this explicit.", pad,
                )
                self._warned_mask = True
            mask = (ids != pad).long()
            kwargs["attention_mask"] = mask
        if mask is None:
            reference = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            mask = torch.ones(reference.shape[:2], dtype=torch.long, device=device)
        if not bool((mask != 0).any()):
            raise ValueError("a calibration batch has an all-zero attention_mask: it holds no real tokens")
        if ids is not None:
            kwargs["input_ids"] = self._checked_ids(ids, mask != 0, pad)
        return (), kwargs, mask != 0

    def _checked_ids(self, ids: torch.Tensor, real: torch.Tensor, pad: int | None) -> torch.Tensor:
        """Token ids inside the embedding table; ids under padding (e.g. -1 fill) become the pad id."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None) or getattr(self.model.config, "vocab_size", None)
        if vocab is None:
            return ids
        outside = (ids < 0) | (ids >= vocab)
        if not bool(outside.any()):
            return ids
        if bool((outside & real).any()):
            bad = ids[outside & real]
            raise ValueError(
                f"calibration input_ids hold token ids outside the vocabulary (largest {int(bad.max())}, smallest "
                f"{int(bad.min())}; the model has {vocab} embeddings, ids 0..{vocab - 1}); tokenize with this model's "
                "tokenizer, and mark padding with attention_mask=0 rather than a -1 id"
            )
        return torch.where(outside, torch.full_like(ids, pad if pad is not None and 0 <= pad < vocab else 0), ids)

    def hidden_rows(
        self, block: PrunableBlock, hidden: torch.Tensor, token_mask: torch.Tensor | None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows of ``H`` (positions x width) from the input of ``block.down``, padding removed.

        ``index``: the flat positions of ``token_mask``'s true entries, precomputed by the engine; taking rows by
        index needs no device-to-host synchronisation (a boolean mask does). An override may ignore it.
        """
        if token_mask is None:
            return hidden.reshape(-1, hidden.shape[-1])
        if index is not None and hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(token_mask.shape):
            return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index.to(hidden.device))
        return hidden[token_mask.to(hidden.device)]

    def output_weight(self, block: PrunableBlock) -> torch.Tensor:
        """``W`` of ``Y = H W^T + b`` as (out x width)."""
        return block.down.weight

    def output_bias(self, block: PrunableBlock) -> torch.Tensor | None:
        return block.down.bias

    def set_output_projection(self, block: PrunableBlock, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Write a re-fitted projection (already restricted to the kept columns) into ``block.down``."""
        down = self.current_down(block)
        with torch.no_grad():
            down.weight.copy_(weight.reshape(down.weight.shape).to(down.weight.dtype))
            if bias is not None and down.bias is not None:
                down.bias.copy_(bias.to(down.bias.dtype))

    def resume(self, layer: int) -> Resume | None:
        """How to finish ``layer`` from the input of a module upstream of its last block (``None``: run it whole).

        Overridden by adapters whose layer ends with a feed-forward sub-block that can be called on its own.
        """
        return None

    def current_down(self, block: PrunableBlock) -> nn.Module:
        """``block.down`` after compaction (slicing may have replaced the module)."""
        return block.down

    def weight_scores(self, block: PrunableBlock) -> torch.Tensor:
        """Per-group weight magnitude (squared L2 of every weight that is removed with the group)."""
        weight = self.output_weight(block).detach().float()
        return weight.pow(2).sum(0).reshape(block.num_groups, block.group_size).sum(-1)

    @staticmethod
    def layer_hidden_states(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The hidden states a layer was called with."""
        if args:
            return args[0]
        for key in ("hidden_states", "x", "hidden_state"):
            if key in kwargs:
                return kwargs[key]
        raise ValueError("could not find the hidden states among the layer's arguments")

    @staticmethod
    def replace_hidden_states(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        for key in ("hidden_states", "x", "hidden_state"):
            if key in kwargs:
                return args, {**kwargs, key: hidden}
        raise ValueError("could not find the hidden states among the layer's arguments")

    @staticmethod
    def layer_output(output: Any) -> torch.Tensor:
        """The hidden states a layer returned."""
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)):
            return output[0]
        if hasattr(output, "last_hidden_state"):
            return output.last_hidden_state
        raise TypeError(f"cannot read hidden states from a layer output of type {type(output).__name__}")

    def example_inputs(self, batch_size: int = 1, seq_len: int = 128) -> dict[str, torch.Tensor]:
        """Inputs for FLOPs counting and latency measurement."""
        config = self.model.config
        # RoBERTa-style position ids start after the padding index, so leave two positions of headroom.
        seq_len = min(seq_len, getattr(config, "max_position_embeddings", seq_len + 2) - 2)
        ids = torch.randint(0, getattr(config, "vocab_size", 1000), (batch_size, seq_len), generator=_gen())
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def iter_blocks(self) -> Iterator[PrunableBlock]:
        for index in range(len(self.layers())):
            yield from self.blocks(index)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
