"""Calibration batches regrouped by sequence length, so that the layers replay as little padding as possible.

Every layer of a prune runs once or twice over every calibration batch, and a batch padded to its longest sequence
spends that compute on padding too (half of it for 512 polarity sentences in batches of 32). The statistics are
sums over real tokens and each sequence's activations do not depend on its batch-mates (padding is masked), so
sorting the sequences by length and re-batching them changes nothing but the rounding of those sums, and makes
the layer replays up to twice as fast (the idea of ``group_by_length`` in the transformers Trainer).

Only what the token adapters read is regrouped (``TOKEN_KEYS``); anything the regrouping could change the meaning
of is passed through untouched: left padding (positions would move), masks that are not 0/1 prefixes, empty
sequences, embeddings instead of ids, anything not a dict of 2-D tensors of one shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["TOKEN_KEYS", "group_by_length"]

# The inputs ``ModelAdapter.prepare_batch`` reads from a token batch (besides ``inputs_embeds``, never regrouped).
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def group_by_length(batches: Iterable[Any], pad_token_id: int = 0) -> Iterable[Any]:
    """The sequences of ``batches`` sorted by length (stable) in batches of as many sequences as the largest one.

    Right-padded token batches only (a list is returned). Anything else comes back as given: still streamed
    (never held in memory at once) when the first batch already is not a token batch, as a list of the same
    batch objects when a later one is not. A regrouped batch holds only :data:`TOKEN_KEYS` (other keys such as
    ``labels`` are not model inputs of a calibration pass) and is never longer, in sequences or in tokens, than
    the largest batch given.
    """
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        return []
    head = _right_padded(first)
    if head is None:  # images, embeddings, ...: never materialise a stream of them
        return itertools.chain([first], iterator)
    batches = [first, *iterator]
    parsed = [head, *(_right_padded(batch) for batch in batches[1:])]
    if any(p is None for p in parsed):
        return batches
    keys = head[0]
    if any(p[0] != keys for p in parsed):
        return batches
    rows: list[tuple[int, dict[str, torch.Tensor]]] = []
    for _, tensors, lengths in parsed:
        for i, length in enumerate(lengths):
            rows.append((length, {k: t[i, :length] for k, t in tensors.items()}))
    rows.sort(key=lambda row: row[0])  # stable: equal lengths keep their order
    size = max(len(p[2]) for p in parsed)
    fill = {"input_ids": int(pad_token_id)}
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = chunk[-1][0]
        batch = {}
        for key in keys:
            like = chunk[0][1][key]
            padded = torch.full((len(chunk), width), fill.get(key, 0), dtype=like.dtype, device=like.device)
            for i, (length, row) in enumerate(chunk):
                padded[i, :length] = row[key]
            batch[key] = padded
        out.append(batch)
    return out


def _right_padded(batch: Any) -> tuple[tuple[str, ...], dict[str, torch.Tensor], list[int]] | None:
    """(keys, tensors, real length per sequence) of a right-padded token batch, or ``None`` if it is not one."""
    if not isinstance(batch, Mapping) or "inputs_embeds" in batch:
        return None
    if batch.get("input_ids") is None or batch.get("attention_mask") is None:
        return None
    tensors = {}
    for key in TOKEN_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            return None  # lists and arrays are left to prepare_batch, which explains what it cannot use
        tensors[key] = value
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool or ids.shape[0] == 0:
        return None
    if any(t.dim() != 2 or t.shape != ids.shape for t in tensors.values()):
        return None
    if mask.is_floating_point() or mask.is_complex():
        return None
    real = mask != 0
    if bool((mask[real] != 1).any()):
        return None
    lengths = real.sum(1)
    prefix = torch.arange(ids.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, real) or bool((lengths == 0).any()):
        return None
    return tuple(tensors), tensors, [int(n) for n in lengths.tolist()]
