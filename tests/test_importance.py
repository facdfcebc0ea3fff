"""First-order Taylor selection (`PrunerConfig(selection="taylor")`)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for
from hf_ispasp.importance import taylor_scores


def _model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def _batches(labels: bool) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(1, 100, (4, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = torch.randint(0, 2, (4,), generator=gen)
        out.append(batch)
    return out


def test_taylor_scores_match_a_manual_gradient() -> None:
    model = _model()
    adapter = adapter_for(model)
    scores = taylor_scores(model, adapter, _batches(True), torch.device("cpu"))
    block = next(b for b in adapter.iter_blocks() if b.kind == "ffn")
    assert scores[block.name].shape == (37,)
    # manual check: d loss / d (scale of neuron j) at scale 1 equals sum_tokens H_j dL/dH_j
    batch = {k: v[1:2] for k, v in _batches(True)[0].items()}  # one sequence: per-sequence = whole-batch sum
    scale = torch.ones(37, requires_grad=True)
    handle = block.down.register_forward_pre_hook(lambda m, a: (a[0] * scale,))
    model(**batch).loss.backward()
    handle.remove()
    model.zero_grad(set_to_none=True)  # taylor_scores leaves .grad alone: clear the manual pass's own
    single = taylor_scores(model, adapter, [batch], torch.device("cpu"))[block.name]
    torch.testing.assert_close(single, scale.grad.abs().double(), rtol=1e-4, atol=1e-7)
    assert not any(p.grad is not None for p in model.parameters())


def test_taylor_prune_and_missing_labels() -> None:
    model = _model()
    pruned = ISpaSPPruner(model, PrunerConfig(selection="taylor", show_progress=False)).prune(_batches(True))
    assert pruned.bert.encoder.layer[0].intermediate.dense.out_features == round(0.5 * 37)
    with pytest.raises(ValueError, match="needs labels"):
        ISpaSPPruner(model, PrunerConfig(selection="taylor", show_progress=False)).prune(_batches(False))
