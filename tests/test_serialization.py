"""Compacted checkpoints reload strictly; mismatches name the modules; writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_text_model, token_batches

from hf_ispasp import CheckpointMismatchError, ISpaSPPruner, PrunerConfig, load_pruned, save_pruned


@pytest.fixture
def pruned():
    model = tiny_text_model("bert")
    return ISpaSPPruner(model, PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.6, show_progress=False)).prune(
        token_batches()
    )


def test_round_trip_identical_outputs_and_metadata(pruned, tmp_path):
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["ispasp"]["widths"]["ffn"] == [18, 18]
    assert config["ispasp"]["widths"]["heads"] == [2, 2]
    assert config["ispasp"]["pruner_config"]["ffn_keep_ratio"] == 0.5
    again = load_pruned(tmp_path)
    batch = token_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, pruned(**batch).logits, rtol=0, atol=0)
    assert again.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert not again.training


def test_dtype_is_kept_and_can_be_overridden(pruned, tmp_path):
    pruned.to(torch.bfloat16).save_pretrained(tmp_path)
    assert next(load_pruned(tmp_path).parameters()).dtype == torch.bfloat16
    assert next(load_pruned(tmp_path, torch_dtype=torch.float32).parameters()).dtype == torch.float32


def test_mismatched_widths_name_the_modules(pruned, tmp_path):
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["ispasp"]["widths"]["ffn"] = [18, 20]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as info:
        load_pruned(tmp_path)
    message = str(info.value)
    assert "bert.encoder.layer.1.intermediate.dense" in message
    assert "bert.encoder.layer.1.output.dense" in message
    assert "layer.0" not in message.split("Modules with mismatched shapes")[1].split("\n")[0]


def test_wrong_layer_count_and_plain_checkpoints(pruned, tmp_path):
    dense = tiny_text_model("bert")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not an hf_ispasp checkpoint"):
        load_pruned(tmp_path / "dense")
    pruned.save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config["ispasp"]["widths"]["heads"] = [2]
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its pruning metadata"):
        load_pruned(tmp_path / "p")


def test_save_is_atomic(pruned, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pruned(pruned, target)
    before = sorted(p.name for p in target.iterdir())
    original = type(pruned).save_pretrained

    def broken(self, path, **kwargs):
        original(self, path, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(type(pruned), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(pruned, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert load_pruned(target) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left behind


def test_plain_save_pretrained_of_vit_reloads(tmp_path):
    """transformers 5 writes ViT weights under legacy names; load_pruned maps them back."""
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model("vit", hidden_size=30, num_attention_heads=3, intermediate_size=37,
                                  num_hidden_layers=2, image_size=32, patch_size=8, num_labels=3)
    model = AutoModelForImageClassification.from_config(config).eval()
    images = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    pruned = ISpaSPPruner(model, PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.6, show_progress=False)).prune(
        images
    )
    pruned.save_pretrained(tmp_path)  # the ordinary call, default save_original_format
    again = load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(images[0]).logits, pruned(images[0]).logits)
