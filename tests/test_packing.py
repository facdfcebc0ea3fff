"""Calibration sequences regrouped by length: the same sequences with less padding, the same prune; anything that
regrouping could change the meaning of is passed through as given."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_CONFIGS, TEXT_CONFIGS, tiny_factories, token_batches

from hf_ispasp import ISpaSPPruner, PrunerConfig
from hf_ispasp.packing import group_by_length

pytestmark = pytest.mark.usefixtures("one_thread")


def _sequences(batches):
    """Every sequence's real tokens (and token types) as tuples, in order."""
    out = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            types = tuple(b["token_type_ids"][i, :n].tolist()) if "token_type_ids" in b else ()
            out.append((tuple(b["input_ids"][i, :n].tolist()), types))
    return out


def test_regrouped_batches_hold_the_same_sequences_with_less_padding():
    batches = token_batches(num=30, batch_size=8, min_len=2, max_len=20, pad_to=24, pad_fill=7)
    for b in batches:
        b["token_type_ids"] = (torch.arange(24) >= 3).long().expand_as(b["input_ids"]) * b["attention_mask"]
        b["labels"] = torch.zeros(b["input_ids"].shape[0], dtype=torch.long)
    packed = group_by_length(batches, pad_token_id=5)
    assert sorted(_sequences(packed)) == sorted(_sequences(batches))
    lengths = [len(s[0]) for s in _sequences(packed)]
    assert lengths == sorted(lengths)
    assert sum(b["input_ids"].numel() for b in packed) < sum(b["input_ids"].numel() for b in batches)
    assert max(b["input_ids"].shape[0] for b in packed) <= 8
    for b in packed:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}  # labels are no calibration input
        real = b["attention_mask"].bool()
        assert bool(real[:, -1].any()), "padded only to the longest sequence of the batch"
        assert bool((b["input_ids"][~real] == 5).all()) and bool((b["token_type_ids"][~real] == 0).all())
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == batches[0]["attention_mask"].dtype


def test_equal_lengths_keep_their_order():
    batches = token_batches(num=12, batch_size=4, min_len=6, max_len=6)
    assert _sequences(group_by_length(batches)) == _sequences(batches)


def _left_padded():
    batches = token_batches(num=8, batch_size=4)
    return [{k: torch.flip(v, dims=[1]) for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("case", ["left_padding", "embeddings", "lists", "empty_sequence", "soft_mask", "keys_differ",
                                  "unbatched", "pixels", "shape_mismatch"])
def test_batches_it_cannot_regroup_pass_through(case):
    batches = token_batches(num=8, batch_size=4)
    if case == "left_padding":
        batches = _left_padded()
    elif case == "embeddings":
        batches[0]["inputs_embeds"] = torch.zeros(4, batches[0]["input_ids"].shape[1], 3)
    elif case == "lists":
        batches[1]["input_ids"] = batches[1]["input_ids"].tolist()
    elif case == "empty_sequence":
        batches[0]["attention_mask"][2] = 0
    elif case == "soft_mask":
        batches[0]["attention_mask"] = batches[0]["attention_mask"] * 2
    elif case == "keys_differ":
        batches[0]["token_type_ids"] = torch.zeros_like(batches[0]["input_ids"])
    elif case == "unbatched":
        batches = [{k: v[0] for k, v in b.items()} for b in batches]
    elif case == "pixels":
        batches = [{"pixel_values": torch.zeros(2, 3, 8, 8)}]
    elif case == "shape_mismatch":
        batches[0]["attention_mask"] = batches[0]["attention_mask"][:, :-1]
    packed = list(group_by_length(iter(batches)))
    assert len(packed) == len(batches) and all(p is b for p, b in zip(packed, batches, strict=True))


def test_a_stream_of_non_token_batches_is_not_materialised():
    def stream():
        yield {"pixel_values": torch.zeros(2, 3, 8, 8)}
        raise AssertionError("read ahead of the consumer")

    regrouped = group_by_length(stream())
    assert not isinstance(regrouped, list)
    assert next(iter(regrouped))["pixel_values"].shape == (2, 3, 8, 8)
    assert group_by_length([]) == []


TOKEN_MODELS = sorted(k for k in tiny_factories() if k in {*TEXT_CONFIGS, *DECODER_CONFIGS})


@pytest.mark.parametrize("key", TOKEN_MODELS)
def test_regrouping_prunes_alike(key):
    """Sorted by length or as given, a prune keeps the same groups and the pruned models agree to rounding (a
    re-fit with a small ridge can magnify rounding in a weight, not in what the model computes)."""
    model = tiny_factories()[key]()
    data = token_batches(num=24, batch_size=8, min_len=3, max_len=14, pad_fill=9)
    results = {}
    for regroup in (False, True):
        pruner = ISpaSPPruner(model, PrunerConfig(show_progress=False, group_by_length=regroup))
        pruned = pruner.prune(data)
        with torch.no_grad():
            outputs = [pruned(**batch)[0] for batch in data]
        results[regroup] = ({b.name: b.kept for b in pruner.report.blocks}, outputs)
    assert results[True][0] == results[False][0]
    for regrouped, given in zip(results[True][1], results[False][1], strict=True):
        assert float((regrouped - given).abs().max()) <= 1e-5 * float(given.abs().max())


def test_config_switch_is_validated():
    with pytest.raises(ValueError, match="group_by_length"):
        PrunerConfig(group_by_length="yes")
    assert PrunerConfig.from_dict(PrunerConfig(group_by_length=False).to_dict()).group_by_length is False
