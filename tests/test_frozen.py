"""Frozen and partly frozen models: pruning keeps every parameter's ``requires_grad``; taylor needs none."""

from __future__ import annotations

import pytest
import torch
from conftest import TEXT_CONFIGS, tiny_factories, tiny_text_model, token_batches

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for
from hf_ispasp.adapters import ADAPTER_REGISTRY
from hf_ispasp.importance import taylor_scores

FACTORIES = tiny_factories()


pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration(model: torch.nn.Module) -> list:
    if getattr(getattr(model, "config", None), "model_type", None) in TEXT_CONFIGS:
        return token_batches(pad_id=model.config.pad_token_id or 0)
    example = adapter_for(model).example_inputs(batch_size=4)
    return [example for _ in range(2)]


def _flags(model: torch.nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _prune(model: torch.nn.Module, data: list, **kwargs) -> tuple[torch.nn.Module, ISpaSPPruner]:
    config = PrunerConfig(**{"ffn_keep_ratio": 0.5, "head_keep_ratio": 0.5, "show_progress": False, **kwargs})
    pruner = ISpaSPPruner(model, config)
    return pruner.prune(data), pruner


@pytest.mark.parametrize("key", sorted(ADAPTER_REGISTRY))
def test_frozen_model_prunes_to_a_frozen_model(key):
    model = FACTORIES[key]().requires_grad_(False)
    pruned, pruner = _prune(model, _calibration(model))
    assert pruner.report.params_after < pruner.report.params_before  # layers were sliced
    assert [n for n, p in pruned.named_parameters() if p.requires_grad] == []
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("key", sorted(ADAPTER_REGISTRY))
def test_partly_frozen_model_keeps_its_pattern(key):
    model = FACTORIES[key]()
    # Period 3 over the parameter list: weight/bias pairs and producer/consumer layers get every mix of flags.
    for index, param in enumerate(model.parameters()):
        param.requires_grad_(index % 3 != 0)
    flags = _flags(model)
    assert len(set(flags.values())) == 2
    pruned, pruner = _prune(model, _calibration(model))
    assert pruner.report.params_after < pruner.report.params_before
    assert _flags(pruned) == flags
    assert _flags(model) == flags


# Taylor selection -------------------------------------------------------------------------------------------
def _labelled(num: int = 16) -> list[dict[str, torch.Tensor]]:
    batches = token_batches(num=num)
    gen = torch.Generator().manual_seed(5)
    return [{**b, "labels": torch.randint(0, 3, (len(b["input_ids"]),), generator=gen)} for b in batches]


@pytest.mark.parametrize("frozen", ["all", "embeddings and layer 0"])
def test_taylor_scores_do_not_depend_on_requires_grad(frozen):
    """dL/dH needs no parameter gradient: a (partly) frozen model scores exactly like a trainable one."""
    data = _labelled()
    trainable = tiny_text_model("bert")
    model = tiny_text_model("bert")
    if frozen == "all":
        model.requires_grad_(False)
    else:
        model.bert.embeddings.requires_grad_(False)
        model.bert.encoder.layer[0].requires_grad_(False)
    flags = _flags(model)
    expected = taylor_scores(trainable, adapter_for(trainable), data, torch.device("cpu"))
    scores = taylor_scores(model, adapter_for(model), data, torch.device("cpu"))
    assert scores.keys() == expected.keys()
    for name in expected:
        assert scores[name].abs().sum() > 0, name
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-6, atol=1e-12)
    assert _flags(model) == flags
    assert all(p.grad is None for p in model.parameters())


def test_taylor_prunes_a_frozen_model_and_leaves_it_unchanged():
    data = _labelled()
    model = tiny_text_model("bert").requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, pruner = _prune(model, data, selection="taylor")
    reference, reference_pruner = _prune(tiny_text_model("bert"), data, selection="taylor")
    assert [b.kept for b in pruner.report.blocks] == [b.kept for b in reference_pruner.report.blocks]
    assert not any(p.requires_grad for p in pruned.parameters())
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_taylor_leaves_existing_gradients_alone():
    """Scores come from gradients of the hidden representations only: a caller's .grad buffers survive."""
    model = tiny_text_model("bert")
    weight = model.classifier.weight
    weight.grad = torch.full_like(weight, 3.0)
    taylor_scores(model, adapter_for(model), _labelled(8), torch.device("cpu"))
    assert torch.equal(weight.grad, torch.full_like(weight, 3.0))
    assert all(p.grad is None for p in model.parameters() if p is not weight)
