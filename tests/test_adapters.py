"""One parametrisation over the whole registry: an adapter without a tiny test model fails here."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXT_CONFIGS, tiny_factories, tiny_text_model, token_batches

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for, load_pruned, save_pruned
from hf_ispasp.adapters import ADAPTER_REGISTRY

FACTORIES = tiny_factories()
TEXT_HEADS = [
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMaskedLM",
]


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
    if hasattr(model, "config") and getattr(model.config, "model_type", None) in TEXT_CONFIGS:
        pad = model.config.pad_token_id or 0
        return token_batches(pad_id=pad)
    example = adapter.example_inputs(batch_size=4)
    return [example for _ in range(2)]


@pytest.mark.parametrize("key", sorted(ADAPTER_REGISTRY))
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
    # Compacted shapes are what the adapter records, and the record is in the metadata.
    for index in range(len(adapter.layers())):
        for block in adapter.blocks(index):
            kept = next(b for b in report.blocks if b.name == block.name)
            assert block.num_groups == kept.groups_after
    save_pruned(pruned, tmp_path / "ckpt")
    again = load_pruned(tmp_path / "ckpt")
    assert type(again) is type(pruned)
    batch = data[0]
    with torch.no_grad():
        torch.testing.assert_close(_outputs(again, batch), _outputs(pruned, batch))


@pytest.mark.parametrize("key", sorted(ADAPTER_REGISTRY))
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
