"""One parametrisation over the whole registry: an adapter without a tiny test model fails here.

Every registered adapter is described by group specs (:mod:`hf_ispasp.adapters.groups`), so these checks exercise
the generic spec on each architecture: keeping everything reproduces the outputs exactly; after a real prune every
module a spec cuts has the shape its row map and the width record give; ``save_pruned``/``load_pruned`` round trips.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DECODER_CONFIGS, TEXT_CONFIGS, tiny_factories, tiny_text_model, token_batches

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for, load_pruned, save_pruned
from hf_ispasp.adapters import ADAPTER_REGISTRY
from hf_ispasp.adapters.groups import SpecAdapter, check_group_spec

pytestmark = pytest.mark.usefixtures("one_thread")

FACTORIES = tiny_factories()
KEYS = sorted(ADAPTER_REGISTRY)
TEXT_HEADS = [
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMaskedLM",
]
# What the generic spec derives; an adapter overriding one of these is back to hand-written slicing.
DERIVED = ("blocks", "compact", "current_down", "weight_scores", "widths", "apply_widths", "set_output_projection")


def test_every_registered_adapter_has_a_tiny_model():
    missing = sorted(set(ADAPTER_REGISTRY) - set(FACTORIES))
    assert not missing, f"registered adapters without a tiny test model: {missing}"


def _outputs(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if not hasattr(out, "logits") else out.logits


def _calibration(model):
    adapter = adapter_for(model)
    if hasattr(model, "config") and getattr(model.config, "model_type", None) in {*TEXT_CONFIGS, *DECODER_CONFIGS}:
        pad = model.config.pad_token_id or 0
        return token_batches(pad_id=pad)
    example = adapter.example_inputs(batch_size=4)
    return [example for _ in range(2)]


def _check_specs(adapter: SpecAdapter, counts: list[list[int]]) -> None:
    """Every cut of every spec has ``count`` groups of its row map, ``count`` being the recorded width."""
    assert len(counts) == len(adapter.layers())
    for index, layer in enumerate(adapter.layers()):
        specs = adapter.group_specs(index)
        blocks = adapter.blocks(index)
        assert [s.name for s in specs] == [b.name for b in blocks]
        assert [check_group_spec(layer, s) for s in specs] == [b.num_groups for b in blocks] == counts[index]


@pytest.mark.parametrize("key", KEYS)
def test_adapter_is_derived_from_group_specs(key):
    cls = ADAPTER_REGISTRY[key]
    assert issubclass(cls, SpecAdapter), f"{cls.__name__} does not describe its groups with GroupSpec"
    overridden = [name for name in DERIVED if getattr(cls, name) is not getattr(SpecAdapter, name)]
    assert not overridden, f"{cls.__name__} overrides what the specs derive: {overridden}"
    adapter = adapter_for(FACTORIES[key]())
    record = adapter.widths()
    _check_specs(adapter, adapter.record_counts(record))
    for block in adapter.iter_blocks():
        scores = adapter.weight_scores(block)
        assert scores.shape == (block.num_groups,) and bool((scores > 0).all()), block.name


@pytest.mark.parametrize("key", KEYS)
def test_registry_prune_shapes_and_round_trip(key, tmp_path):
    model = FACTORIES[key]()
    data = _calibration(model)
    pruner = ISpaSPPruner(model, PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.5, show_progress=False))
    pruned = pruner.prune(data)
    report = pruner.report
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    adapter = adapter_for(pruned)
    for block in report.blocks:
        assert 1 <= block.groups_after <= block.groups_before
    assert any(block.groups_after < block.groups_before for block in report.blocks)
    # Compacted shapes are what the record says (every sliced module, through the spec's row maps).
    record = adapter.widths()
    counts = adapter.record_counts(record)
    _check_specs(adapter, counts)
    after = {b.name: b.groups_after for b in report.blocks}
    assert [[after[b.name] for b in adapter.blocks(i)] for i in range(len(counts))] == counts
    save_pruned(pruned, tmp_path / "ckpt")
    again = load_pruned(tmp_path / "ckpt")
    assert type(again) is type(pruned)
    assert adapter_for(again).widths() == record
    batch = data[0]
    with torch.no_grad():
        torch.testing.assert_close(_outputs(again, batch), _outputs(pruned, batch))


@pytest.mark.parametrize("key", KEYS)
def test_registry_keep_all_is_exact(key):
    model = FACTORIES[key]()
    data = _calibration(model)
    config = PrunerConfig(ffn_keep_ratio=1.0, head_keep_ratio=1.0, show_progress=False)
    pruned = ISpaSPPruner(model, config).prune(data)
    with torch.no_grad():
        torch.testing.assert_close(_outputs(pruned, data[0]), _outputs(model, data[0]), rtol=0, atol=0)


@pytest.mark.parametrize("key", sorted(TEXT_CONFIGS))
@pytest.mark.parametrize("head", TEXT_HEADS)
def test_text_task_heads(key, head, tmp_path):
    model = tiny_text_model(key, head)
    data = token_batches(pad_id=model.config.pad_token_id or 0, num=8)
    config = PrunerConfig(ffn_keep_ratio=0.4, head_keep_ratio=0.7, show_progress=False)
    pruned = ISpaSPPruner(model, config).prune(data)
    pruned.save_pretrained(tmp_path)
    again = load_pruned(tmp_path)
    assert type(again).__name__ == type(model).__name__
    with torch.no_grad():
        a, b = pruned(**data[0]), again(**data[0])
    for key_out in a.keys():
        if isinstance(a[key_out], torch.Tensor):
            torch.testing.assert_close(a[key_out], b[key_out])


@pytest.mark.parametrize("key", KEYS)
def test_registry_meets_a_flops_target(key, tmp_path):
    """Every architecture prunes to a FLOPs target with per-layer widths, and the result reloads."""
    from hf_ispasp.budget import block_costs

    model = FACTORIES[key]().eval()
    costs = block_costs(model)
    floors = {b.name: b.partitions for b in adapter_for(model).iter_blocks()}
    target = (1 + costs.predict("flops", floors) / costs.dense["flops"]) / 2  # halfway down the reachable range
    pruner = ISpaSPPruner(model, PrunerConfig(flops_keep_ratio=target, show_progress=False))
    pruned = pruner.prune(_calibration(model))
    budget = pruner.report.budget
    assert budget["achieved"]["flops"] <= target + 1e-12
    assert budget["predicted"]["flops"] == pytest.approx(budget["achieved"]["flops"], rel=1e-9)
    save_pruned(pruned, tmp_path / "ckpt")
    batch = _calibration(model)[0]
    with torch.no_grad():
        torch.testing.assert_close(_outputs(load_pruned(tmp_path / "ckpt").eval(), batch), _outputs(pruned, batch))
