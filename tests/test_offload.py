"""A model loaded with accelerate offload (device_map with "disk") prunes layer by layer, exactly like in memory."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_text_model, token_batches
from transformers import AutoModelForSequenceClassification

from hf_ispasp import ISpaSPPruner, PrunerConfig
from hf_ispasp.offload import has_offload

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE_MAP = {"bert.embeddings": "cpu", "bert.encoder.layer.0": "disk", "bert.encoder.layer.1": "disk",
              "bert.pooler": "cpu", "classifier": "cpu"}


def _offloaded(tmp_path):
    model = tiny_text_model("bert")
    model.save_pretrained(tmp_path / "dense")
    offloaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "dense", device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert has_offload(offloaded)
    assert offloaded.bert.encoder.layer[1].attention.self.query.weight.device.type == "meta"
    return model, offloaded


def test_offloaded_model_prunes_like_the_in_memory_one(tmp_path):
    model, offloaded = _offloaded(tmp_path)
    data = token_batches()
    config = PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.67, show_progress=False)
    reference = ISpaSPPruner(model, config)
    pruned = reference.prune(data)
    folder_before = sorted(p.name for p in (tmp_path / "offload").iterdir())
    pruner = ISpaSPPruner(offloaded, config)
    result = pruner.prune(data, inplace=True)
    assert result is offloaded
    assert [b.kept for b in pruner.report.blocks] == [b.kept for b in reference.report.blocks]
    # the pruned layers are offloaded again (weights off the execution device), and compute like the reference
    layer = offloaded.bert.encoder.layer[1]
    assert layer.attention.self.query.weight.device.type == "meta"
    assert layer.attention.self.query.out_features == pruned.bert.encoder.layer[1].attention.self.query.out_features
    assert offloaded.hf_device_map["bert.encoder.layer.1"] == "cpu"
    with torch.no_grad():
        for batch in data[:2]:
            torch.testing.assert_close(offloaded(**batch).logits, pruned(**batch).logits, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "offload").iterdir()) == folder_before  # the caller's folder


def test_offloaded_model_needs_inplace(tmp_path):
    _, offloaded = _offloaded(tmp_path)
    with pytest.raises(ValueError, match="inplace=True"):
        ISpaSPPruner(offloaded, PrunerConfig(show_progress=False)).prune(token_batches())


def test_failed_offloaded_prune_restores_the_hooked_layers(tmp_path, monkeypatch):
    _, offloaded = _offloaded(tmp_path)
    layers = list(offloaded.bert.encoder.layer)
    batch = token_batches()[0]
    with torch.no_grad():
        before = offloaded(**batch).logits

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ISpaSPPruner, "_prune_block", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ISpaSPPruner(offloaded, PrunerConfig(show_progress=False)).prune(token_batches(), inplace=True)
    assert all(a is b for a, b in zip(layers, offloaded.bert.encoder.layer, strict=True))
    assert offloaded.bert.encoder.layer[0].attention.self.query.weight.device.type == "meta"
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**batch).logits, before)


def test_offloaded_model_meets_a_flops_target_like_the_in_memory_one(tmp_path):
    model, offloaded = _offloaded(tmp_path)
    data = token_batches()
    config = PrunerConfig(flops_keep_ratio=0.6, show_progress=False)
    reference = ISpaSPPruner(model, config)
    reference.prune(data)
    pruner = ISpaSPPruner(offloaded, config)
    pruner.prune(data, inplace=True)
    assert pruner.report.budget["widths"] == reference.report.budget["widths"]
    assert [b.kept for b in pruner.report.blocks] == [b.kept for b in reference.report.blocks]
    assert pruner.report.budget["achieved"] == pytest.approx(reference.report.budget["achieved"])
