"""The real MiniLM-L6 weights (all-MiniLM-L6-v2) on real sentences."""

from __future__ import annotations

import pytest
import torch

from hf_ispasp import ISpaSPPruner, PrunerConfig, load_pruned


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    from demo.assets import minilm_path, polarity_dataset
    from hf_ispasp.classification import calibration_loader, tokenize_dataset

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    data = polarity_dataset()
    train = tokenize_dataset(data["train"], tokenizer)
    test = tokenize_dataset(data["test"].select(range(64)), tokenizer)
    return model, tokenizer, calibration_loader(train, tokenizer, num_samples=128), test


def _embed(model, tokenizer, test):
    from hf_ispasp.classification import padding_collator

    batch = padding_collator(tokenizer)(test.remove_columns(["label"])[:64])
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_real_minilm_prune_reload_and_quality(minilm, tmp_path):
    model, tokenizer, calib, test = minilm
    pruner = ISpaSPPruner(model, PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.75, show_progress=False))
    pruned = pruner.prune(calib)
    report = pruner.report
    assert report.layer_params_after <= 0.70 * report.layer_params_before  # >= 30% fewer encoder parameters
    assert all(b.groups_after == (9 if b.kind == "heads" else 768) for b in report.blocks)
    assert all(b.relative_residual_refit < b.relative_residual < 1 for b in report.blocks)
    pruned.save_pretrained(tmp_path)
    again = load_pruned(tmp_path)
    batch = tokenizer(["a gripping, beautifully acted film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).last_hidden_state, pruned(**batch).last_hidden_state)
    # The sentence embeddings of the pruned model stay close to the dense ones (i-SpaSP vs random selection).
    dense = _embed(model, tokenizer, test)
    ours = (dense * _embed(pruned, tokenizer, test)).sum(-1).mean()
    rand = ISpaSPPruner(
        model, PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.75, selection="random", refit=False,
                            show_progress=False)
    ).prune(calib)
    baseline = (dense * _embed(rand, tokenizer, test)).sum(-1).mean()
    assert ours > 0.8
    assert ours > baseline + 0.05
