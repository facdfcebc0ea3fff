"""Engine invariants: exact keep-all, untouched input, determinism, padding and batch-size invariance."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_text_model, token_batches

from hf_ispasp import CalibrationError, ISpaSPPruner, PrunerConfig, UnsupportedModelError, adapter_for

QUIET = {"show_progress": False}


def _prune(model, data, **kwargs):
    pruner = ISpaSPPruner(model, PrunerConfig(**{**QUIET, **kwargs}))
    return pruner.prune(data), pruner


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        torch.testing.assert_close(sa[key], sb[key], **tol)


def test_input_model_is_untouched(batches):
    model = tiny_text_model("bert")
    before = _state(model)
    pruned, _ = _prune(model, batches, ffn_keep_ratio=0.3, head_keep_ratio=0.4)
    assert pruned is not model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 3


def test_failed_prune_leaves_model_untouched(batches, monkeypatch):
    model = tiny_text_model("bert")
    before = _state(model)
    bad = batches[:2] + [{"input_ids": torch.full((2, 5), VOCAB + 50), "attention_mask": torch.ones(2, 5)}]
    with pytest.raises(ValueError, match=f"largest {VOCAB + 50}.*{VOCAB} embeddings"):
        _prune(model, bad)
    # An exception part-way through compaction, after some blocks were already sliced.
    from hf_ispasp.adapters.encoders import TransformerEncoderAdapter

    calls = {"n": 0}
    original = TransformerEncoderAdapter.compact

    def flaky(self, block, groups):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return original(self, block, groups)

    monkeypatch.setattr(TransformerEncoderAdapter, "compact", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        _prune(model, batches, ffn_keep_ratio=0.5)
    for key, value in model.state_dict().items():
        assert value.shape == before[key].shape and torch.equal(value, before[key]), key


def test_same_seed_same_selection(batches):
    model = tiny_text_model("bert")
    a, a_pruner = _prune(model, batches, selection="random", seed=3)
    b, _ = _prune(model, batches, selection="random", seed=3)
    c, c_pruner = _prune(model, batches, selection="random", seed=4)
    _assert_same_state(a, b, rtol=0, atol=0)
    assert [b.kept for b in a_pruner.report.blocks] != [b.kept for b in c_pruner.report.blocks]
    d, _ = _prune(model, batches)
    e, _ = _prune(model, batches)
    _assert_same_state(d, e, rtol=0, atol=0)


def _kept(pruner):
    return [(b.name, b.kept) for b in pruner.report.blocks]


@pytest.mark.parametrize("refit", [False, True])
def test_padding_length_and_garbage_do_not_change_the_selection(refit):
    model = tiny_text_model("bert")
    tight = token_batches()
    padded = token_batches(pad_to=40, pad_fill=7)  # same examples, longer padding with random ids under it
    a, pa = _prune(model, tight, ffn_keep_ratio=0.4, head_keep_ratio=0.6, refit=refit)
    b, pb = _prune(model, padded, ffn_keep_ratio=0.4, head_keep_ratio=0.6, refit=refit)
    assert pa.report.calibration_tokens == pb.report.calibration_tokens
    assert _kept(pa) == _kept(pb)
    if not refit:  # sliced weights are bit-identical; re-fitted ones agree up to float32 statistics
        _assert_same_state(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(a(**tight[0]).logits, b(**tight[0]).logits, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("refit", [False, True])
def test_calibration_batch_size_does_not_change_the_selection(refit):
    model = tiny_text_model("roberta")
    small, big = token_batches(batch_size=3, pad_id=1), token_batches(batch_size=24, pad_id=1)
    a, pa = _prune(model, small, ffn_keep_ratio=0.4, head_keep_ratio=0.6, refit=refit)
    b, pb = _prune(model, big, ffn_keep_ratio=0.4, head_keep_ratio=0.6, refit=refit)
    assert _kept(pa) == _kept(pb)
    if not refit:
        _assert_same_state(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(a(**small[0]).logits, b(**small[0]).logits, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("refit", [False, True])
def test_cache_modes_agree(batches, refit):
    """Layer inputs kept on disk and kept in memory give bit-identical pruned models."""
    model = tiny_text_model("bert")
    disk, disk_pruner = _prune(model, batches, activation_cache="disk", refit=refit)
    memory, memory_pruner = _prune(model, batches, activation_cache="memory", refit=refit)
    assert _kept(disk_pruner) == _kept(memory_pruner)
    assert disk_pruner.report.calibration_tokens == memory_pruner.report.calibration_tokens
    _assert_same_state(disk, memory, rtol=0, atol=0)


def test_budgets_overrides_and_rounding(batches):
    model = tiny_text_model("bert")
    overrides = {1: {"ffn_keep_ratio": 1.0, "head_keep_ratio": 0.01}}
    pruned, pruner = _prune(model, batches, ffn_keep_ratio=0.5, head_keep_ratio=0.01, round_to=8,
                            layer_overrides=overrides)
    widths = adapter_for(pruned).widths()
    assert widths["heads"] == [1, 1]  # at least one head per layer
    assert widths["ffn"] == [16, 37]  # 18.5 -> rounded to a multiple of 8; layer 1 overridden to keep all
    assert pruned.config.ispasp["widths"] == widths
    assert [b.groups_after for b in pruner.report.blocks] == [1, 16, 1, 37]


def test_keep_all_reproduces_outputs_exactly(batches):
    model = tiny_text_model("bert")
    pruned, pruner = _prune(model, batches, ffn_keep_ratio=1.0, head_keep_ratio=1.0)
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(pruned(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert pruner.report.params_after == pruner.report.params_before


def test_refit_lowers_the_residual(batches):
    """The re-fit is installed, really lowers the residual, and the report states the residual the model has."""
    model = tiny_text_model("bert")
    pruned, with_refit = _prune(model, batches, ffn_keep_ratio=0.3, head_keep_ratio=0.7, refit=True)
    for block in with_refit.report.blocks:
        assert block.refit_ridge is not None  # ~230 tokens for 30-37 columns: the validation keeps a re-fit
        assert 0 <= block.relative_residual_refit < 0.9 * block.relative_residual
        # ~230 tokens for 30-37 columns are well posed: where the re-fit threshold's support is not the
        # exact-residual one it is kept without a held-out residual of its own (None)
        heldout = block.relative_residual_heldout
        assert heldout is None or 0 <= heldout < block.relative_residual
    assert any(b.relative_residual_heldout is not None for b in with_refit.report.blocks)
    # Measure the first block (its inputs, the embeddings, are the same in both models) on the calibration tokens.
    outputs = {}
    for name, m in (("dense", model), ("pruned", pruned)):
        proj = m.bert.encoder.layer[0].attention.output.dense
        handle = proj.register_forward_hook(lambda mod, args, out, name=name: outputs.setdefault(name, []).append(
            (args[0], out)))
        with torch.no_grad():
            for batch in batches:
                m(**batch)
        handle.remove()
    residual = energy = 0.0
    weight = model.bert.encoder.layer[0].attention.output.dense.weight.detach()
    for batch, (h, y), (_, y_pruned) in zip(batches, outputs["dense"], outputs["pruned"], strict=True):
        mask = batch["attention_mask"].bool()
        residual += float((y - y_pruned)[mask].double().pow(2).sum())
        energy += float((h[mask] @ weight.T).double().pow(2).sum())
    first = with_refit.report.blocks[0]
    assert first.name == "layer.0.attention"
    assert residual / energy == pytest.approx(first.relative_residual_refit, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("selection", ["ispasp", "random", "weight_magnitude", "activation", "output_energy"])
def test_every_rule_runs(batches, selection):
    model = tiny_text_model("distilbert")
    pruned, pruner = _prune(model, batches, selection=selection, refit=False)
    assert pruner.report.params_after < pruner.report.params_before
    with torch.no_grad():
        assert torch.isfinite(pruned(**batches[0]).logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(batches, dtype):
    model = tiny_text_model("bert").to(dtype)
    pruned, _ = _prune(model, batches, ffn_keep_ratio=0.5)
    assert next(pruned.parameters()).dtype == dtype
    with torch.no_grad():
        assert torch.isfinite(pruned(**batches[0]).logits.float()).all()


def test_datasets_dataset_and_sample_cap():
    import datasets

    rows = []
    for batch in token_batches(num=20):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            n = int(mask.sum())
            rows.append({"input_ids": ids[:n].tolist(), "attention_mask": [1] * n, "label": 1})
    dataset = datasets.Dataset.from_list(rows)
    model = tiny_text_model("bert")
    _, pruner = _prune(model, dataset, calibration_batch_size=6, max_calibration_samples=10)
    assert pruner.report.calibration_batches == 2
    assert pruner.report.calibration_tokens == sum(len(r["input_ids"]) for r in rows[:10])


# Errors ---------------------------------------------------------------------------------------------
def test_unsupported_architecture_says_how_to_add_one():
    from transformers import OPTConfig, OPTModel

    model = OPTModel(OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=8, vocab_size=50,
                               word_embed_proj_dim=16))
    with pytest.raises(UnsupportedModelError) as info:
        ISpaSPPruner(model, PrunerConfig())
    message = str(info.value)
    assert "'opt'" in message and "bert" in message and "llama" in message and "register_adapter" in message


@pytest.mark.parametrize(
    "data,error,match",
    [
        ([], CalibrationError, "empty"),
        (None, CalibrationError, "None"),
        ([{"attention_mask": torch.ones(2, 3)}], ValueError, "input_ids"),
        ([{"input_ids": torch.rand(2, 3)}], TypeError, "integer token ids"),
        ([{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3)}], ValueError,
         "no real tokens"),
        ([torch.ones(2, 3, dtype=torch.long)], TypeError, "dicts of tensors"),
    ],
)
def test_bad_calibration_data(data, error, match):
    model = tiny_text_model("bert")
    with pytest.raises(error, match=match):
        _prune(model, data)


def test_nan_weights_and_nan_activations_are_reported(batches):
    model = tiny_text_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _prune(model, batches)
    model = tiny_text_model("bert")
    model.bert.encoder.layer[1].intermediate.register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(CalibrationError, match=r"layer\.1\.ffn.*NaN"):
        _prune(model, batches)


def test_meta_device_model_is_rejected(batches):
    model = tiny_text_model("bert").to("meta")
    with pytest.raises(ValueError, match="meta"):
        _prune(model, batches)


def test_config_type_is_checked():
    with pytest.raises(TypeError, match="PrunerConfig"):
        ISpaSPPruner(tiny_text_model("bert"), {"ffn_keep_ratio": 0.5})


def test_selection_never_runs_in_tf32_where_the_user_allows_it(monkeypatch):
    """A float32 selection or validation in TF32 (10 mantissa bits) can drop other groups: whatever the user's
    float32 matmul precision, the selection and the budget's error curves run at "highest", and the user's
    setting is back afterwards."""
    import hf_ispasp.budget as budget
    import hf_ispasp.pruner as pruner_module

    seen = []

    def recording(module, name):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            seen.append((name, torch.get_float32_matmul_precision()))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    recording(pruner_module, "validated_selection")
    recording(pruner_module, "select_groups")
    recording(budget, "residual_curve")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _prune(tiny_text_model("bert"), token_batches(), selection_dtype="float32")
        _prune(tiny_text_model("bert"), token_batches(), refit_validation=False)
        _prune(tiny_text_model("bert"), token_batches(), flops_keep_ratio=0.7, allocation="global")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert {name for name, _ in seen} == {"validated_selection", "select_groups", "residual_curve"}
    assert {precision for _, precision in seen} == {"highest"}
