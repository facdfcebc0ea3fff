"""Engine v2 invariants: precision and device agreement of the selection, the resume shortcut, layer-by-layer
memory (no whole-model copy, in-place pruning, failures restore the caller's layers) and the activation cache."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os

import pytest
import torch
from conftest import DECODER_CONFIGS, TEXT_CONFIGS, tiny_factories, tiny_text_model, token_batches

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for
from hf_ispasp.adapters.base import ModelAdapter
from hf_ispasp.algorithm import BlockStatistics, selection_precision
from hf_ispasp.statistics import ActivationCache

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"show_progress": False}


def _kept(pruner: ISpaSPPruner) -> dict[str, list[int]]:
    return {b.name: b.kept for b in pruner.report.blocks}


def _prune(model, data, inplace=False, **kwargs):
    pruner = ISpaSPPruner(model, PrunerConfig(**{**QUIET, **kwargs}))
    return pruner.prune(data, inplace=inplace), pruner


def _image_batches(model, num=3, size=4, seed=0):
    example = adapter_for(model).example_inputs()
    shape = (example if isinstance(example, torch.Tensor) else example["pixel_values"]).shape[1:]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=gen) for _ in range(num)]


def _calibration(key, model):
    return token_batches() if key in {*TEXT_CONFIGS, *DECODER_CONFIGS} else _image_batches(model)


# The tiny EfficientNet / MobileNetV3 calibrate on 48 pixel rows for blocks of up to 576 columns: their statistics
# are rank-deficient and float32 ranks near-equal groups differently there, even in the validation alone. That is
# why selection_dtype="auto" validates in float32 only from 2 rows per column.
WELL_POSED = [k for k in sorted(tiny_factories()) if k not in ("EfficientNet", "MobileNetV3")]


@pytest.mark.parametrize("key", WELL_POSED)
def test_auto_selection_equals_float64(key):
    """The default (float32 validation where well posed) keeps exactly the groups of the float64 reference."""
    model = tiny_factories()[key]()
    data = _calibration(key, model)
    _, reference = _prune(model, data, ffn_keep_ratio=0.5, head_keep_ratio=0.67, selection_dtype="float64")
    _, auto = _prune(model, data, ffn_keep_ratio=0.5, head_keep_ratio=0.67)
    assert _kept(auto) == _kept(reference)


def _quality(block):
    return block.relative_residual_heldout if block.relative_residual_heldout is not None else block.relative_residual


@pytest.mark.parametrize("key", WELL_POSED)
def test_float32_selection_is_as_good_as_float64(key):
    """selection_dtype='float32' may break a near-tie the other way (a tiny ELECTRA's last FFN keeps another
    support whose held-out residual is 1% lower), never to a clearly worse block."""
    model = tiny_factories()[key]()
    data = _calibration(key, model)
    _, reference = _prune(model, data, ffn_keep_ratio=0.5, head_keep_ratio=0.67, selection_dtype="float64")
    _, single = _prune(model, data, ffn_keep_ratio=0.5, head_keep_ratio=0.67, selection_dtype="float32")
    for ours, theirs in zip(single.report.blocks, reference.report.blocks, strict=True):
        assert ours.kept == theirs.kept or _quality(ours) <= 1.05 * _quality(theirs) + 1e-9, ours.name


def test_selection_precision_follows_rows_per_column():
    """auto: selection in float64, validation in float32 from 2 calibration rows per column (well posed)."""
    stats = BlockStatistics(10)
    stats.update(torch.randn(19, 10), fold=0)
    assert selection_precision(stats) == (torch.float64, torch.float64)
    assert selection_precision(stats, "float32") == (torch.float32, torch.float32)
    stats.update(torch.randn(1, 10), fold=1)
    assert selection_precision(stats) == (torch.float64, torch.float32)
    assert selection_precision(stats, "float64") == (torch.float64, torch.float64)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_precision_prunes_to_the_float64_model(monkeypatch):
    """auto (float32 validation) keeps the groups of float64 and gives a bit-identical model: the re-fitted
    weights come from the float64 statistics in either precision."""
    import hf_ispasp.pruner as pruner_module

    model, data = tiny_text_model("bert"), token_batches()
    reference, ref_pruner = _prune(model, data)  # default: auto
    chosen = []
    real = pruner_module.selection_precision
    monkeypatch.setattr(pruner_module, "selection_precision", lambda *a: chosen.append(real(*a)) or chosen[-1])
    auto, auto_pruner = _prune(model, data)
    explicit, explicit_pruner = _prune(model, data, selection_dtype="float64")
    assert (torch.float64, torch.float32) in chosen  # the tiny BERT's ~230 tokens are well posed for its blocks
    assert _kept(auto_pruner) == _kept(explicit_pruner) == _kept(ref_pruner)
    assert _same_state(_state(auto), _state(explicit))


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_failed_float32_selection_runs_again_in_float64(monkeypatch, caplog, dtype):
    """A float32 factorisation that fails (eigh not converging) is redone in float64: same model as float64."""
    model, data = tiny_text_model("bert"), token_batches()
    expected, _ = _prune(model, data, selection_dtype="float64")
    eigh = torch.linalg.eigh

    def failing(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    with caplog.at_level(logging.INFO, logger="hf_ispasp.pruner"):
        pruned, _ = _prune(model, data, selection_dtype=dtype)
    assert _same_state(_state(pruned), _state(expected))
    assert "float32 factorisation failed" in caplog.text and "selecting in float64" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_selection_equals_cpu():
    model = tiny_text_model("bert")
    data = token_batches()
    _, cpu = _prune(model, data, ffn_keep_ratio=0.5, head_keep_ratio=0.67)
    _, gpu = _prune(copy.deepcopy(model).cuda(), data, ffn_keep_ratio=0.5, head_keep_ratio=0.67)
    assert _kept(gpu) == _kept(cpu)


@pytest.mark.parametrize("key", ["bert", "distilbert", "vit", "VisionTransformer"])
def test_resume_equals_running_layers_whole(key, monkeypatch):
    """Propagating through the adapter's resume tail gives the same prune as re-running every layer."""
    factories = tiny_factories()
    if key not in factories:
        pytest.skip(f"{key} is not available (timm missing)")
    model = factories[key]()
    data = _calibration(key, model)
    adapter_cls = type(adapter_for(model))
    assert adapter_cls.resume is not ModelAdapter.resume, "this adapter should declare a resume point"
    fast, fast_pruner = _prune(model, data)
    monkeypatch.setattr(adapter_cls, "resume", lambda self, layer: None)
    slow, slow_pruner = _prune(model, data)
    assert _kept(fast_pruner) == _kept(slow_pruner)
    for a, b in zip(fast.state_dict().values(), slow.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _without_skip(adapter_cls):
    resume = adapter_cls.resume

    def plain(self, layer):
        point = resume(self, layer)
        return None if point is None else dataclasses.replace(point, skip=None)

    return plain


# every adapter whose layers are an attention block then an FFN block declares Resume.skip
SKIPPING = [k for k in sorted(tiny_factories()) if k not in ("ConvNeXt", "EfficientNet", "MobileNetV3", "ResNet")]


@pytest.mark.parametrize("key", SKIPPING)
def test_skip_equals_running_the_attention_again(key, monkeypatch, caplog):
    """Starting the FFN's statistics pass at the attention's output projection (Resume.skip, from the input it
    had in the attention's pass) prunes to the model that running the whole layer again gives."""
    model = tiny_factories()[key]()
    data = _calibration(key, model)
    adapter_cls = type(adapter_for(model))
    point = adapter_for(model).resume(0)
    assert point is not None and point.skip is not None, "this adapter should declare Resume.skip"
    resume, skipped = adapter_cls.resume, []

    def counted(self, layer):
        point = resume(self, layer)
        return dataclasses.replace(point, skip=lambda z, x: skipped.append(layer) or point.skip(z, x))

    monkeypatch.setattr(adapter_cls, "resume", counted)
    with caplog.at_level(logging.WARNING, logger="hf_ispasp.pruner"):
        fast, fast_pruner = _prune(model, data)
    assert "does not reproduce" not in caplog.text
    layers = len(adapter_for(model).layers())
    assert sorted(set(skipped)) == list(range(layers))  # every layer's FFN pass started at the attention's output
    monkeypatch.setattr(adapter_cls, "resume", _without_skip(adapter_cls))
    slow, slow_pruner = _prune(model, data)
    assert _kept(fast_pruner) == _kept(slow_pruner)
    for a, b in zip(fast.state_dict().values(), slow.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_counts_layer_runs(monkeypatch):
    """Each layer runs at most twice per calibration batch (its statistics passes), the tail once more."""
    model = tiny_text_model("bert")
    data = token_batches(num=16, batch_size=8)
    calls: dict[str, int] = {}
    from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention

    def counting(name, forward):
        def counted(self, *args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return forward(self, *args, **kwargs)
        return counted

    monkeypatch.setattr(BertLayer, "forward", counting("layer", BertLayer.forward))
    monkeypatch.setattr(BertSelfAttention, "forward", counting("attention", BertSelfAttention.forward))
    _prune(model, data)
    batches, layers = len(data), 2
    # statistics: the attention's pass runs the layer, the FFN's starts at the attention's output projection
    # (Resume.skip); + the one-batch checks of the tail and of the skip on layer 0; no full re-run to propagate;
    # + one forward of the dense and of the pruned model to count FLOPs
    assert calls["layer"] == batches * layers + 2 + 2 * layers
    assert calls["attention"] == calls["layer"]  # the attention runs once per layer run, never on its own


@pytest.mark.parametrize("part, message", [
    ("tail", "does not reproduce the layer's output"),
    ("skip", "does not reproduce the input of the layer's last block"),
])
def test_wrong_resume_falls_back(part, message, monkeypatch, caplog):
    """A resume tail or skip that does not match the layer is caught on the first batch: a warning, the same prune."""
    model = tiny_text_model("bert")
    data = token_batches()
    _, reference = _prune(model, data)
    adapter_cls = type(adapter_for(model))
    good = adapter_cls.resume

    def broken(self, layer):
        point = good(self, layer)
        wrong = getattr(point, part)
        return dataclasses.replace(point, **{part: lambda *args: wrong(*args) * 2})

    monkeypatch.setattr(adapter_cls, "resume", broken)
    with caplog.at_level(logging.WARNING, logger="hf_ispasp.pruner"):
        _, pruner = _prune(model, data)
    assert message in caplog.text
    assert _kept(pruner) == _kept(reference)


def _spy_deepcopy(monkeypatch) -> list[str]:
    """Record the type of every module passed to a top-level ``copy.deepcopy`` (not the recursive calls)."""
    copied: list[str] = []
    deepcopy = copy.deepcopy
    depth = [0]

    def spy(value, memo=None, *args):
        if depth[0] == 0 and isinstance(value, torch.nn.Module):
            copied.append(type(value).__name__)
        depth[0] += 1
        try:
            return deepcopy(value, memo, *args)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(copy, "deepcopy", spy)
    return copied


def test_no_whole_model_copy_and_inplace(monkeypatch):
    model = tiny_text_model("bert")
    data = token_batches()
    reference, reference_pruner = _prune(model, data)
    copied = _spy_deepcopy(monkeypatch)
    layers_before = list(adapter_for(model).layers())
    result, pruner = _prune(model, data, inplace=True)
    assert result is model
    assert copied == ["BertLayer", "BertLayer"], copied  # one layer at a time, nothing else
    assert _kept(pruner) == _kept(reference_pruner)
    assert all(a is not b for a, b in zip(layers_before, adapter_for(model).layers(), strict=True))
    for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert model.config.ispasp["widths"] == reference.config.ispasp["widths"]


def test_failure_part_way_restores_layers_without_model_copy(monkeypatch):
    model = tiny_text_model("bert")
    layers = list(adapter_for(model).layers())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied = _spy_deepcopy(monkeypatch)
    original = ISpaSPPruner._prune_block

    def fail_in_layer_one(self, adapter, block, stats, generator):
        if block.layer == 1:
            raise RuntimeError("boom in layer 1")
        return original(self, adapter, block, stats, generator)

    monkeypatch.setattr(ISpaSPPruner, "_prune_block", fail_in_layer_one)
    for inplace in (False, True):
        with pytest.raises(RuntimeError, match="boom"):
            _prune(model, token_batches(), inplace=inplace)
        assert all(a is b for a, b in zip(layers, adapter_for(model).layers(), strict=True))
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        assert "ispasp" not in model.config.to_dict()
    assert set(copied) == {"BertLayer"}


def test_non_finite_propagation_found_after_the_layer(monkeypatch):
    """The pruned layer's outputs are checked for NaN/inf in one read after all batches: a NaN in a later batch
    still fails the prune with CalibrationError, and the caller's model is untouched."""
    from hf_ispasp.statistics import CalibrationError

    model = tiny_text_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = ISpaSPPruner._prune_block
    calls = []

    def poison_second_batch(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    def hooked(self, adapter, block, stats, generator):
        report = original(self, adapter, block, stats, generator)
        if block.layer == 0 and block.kind == "ffn":  # layer 0 is the pruned copy now; propagation runs next
            adapter.layers()[0].output.register_forward_hook(poison_second_batch)  # run whole or resumed
        return report

    monkeypatch.setattr(ISpaSPPruner, "_prune_block", hooked)
    data = token_batches()
    assert len(data) >= 2
    with pytest.raises(CalibrationError, match="pruned layer produced NaN/inf"):
        _prune(model, data)
    assert len(calls) >= 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_activation_cache_tiers(caplog):
    cache = ActivationCache("auto", "cpu")
    entry = {"args": (torch.ones(4, 8),), "kwargs": {"mask": torch.ones(4)}, "folds": torch.zeros(4)}
    size = 4 * 8 * 4 + 4 * 4 + 4 * 4
    cache._budget = {"device": 2 * size, "cpu": 0, "disk": None}  # room for two entries in memory
    with caplog.at_level(logging.INFO, logger="hf_ispasp.statistics"):
        for i in range(4):
            cache.append({k: (tuple(t * i for t in v) if isinstance(v, tuple) else v) for k, v in entry.items()})
    assert cache.summary() == {"device": 2 * size, "cpu": 0, "disk": 2 * size}
    assert "cpu memory from batch 0" in caplog.text and "disk" in caplog.text
    folder = cache._dir
    assert folder is not None and len(os.listdir(folder)) == 2
    for i in range(4):
        torch.testing.assert_close(cache[i]["args"][0], torch.ones(4, 8) * i)
    cache[0] = cache[3]  # replacing an entry frees its old slot
    assert cache.summary()["disk"] == 3 * size or cache.summary()["device"] == 2 * size
    cache.close()
    assert not os.path.exists(folder)


@pytest.mark.parametrize("mode", ["device", "memory", "cpu", "disk"])
def test_forced_cache_tiers_prune_alike(mode):
    model = tiny_text_model("bert")
    data = token_batches()
    _, reference = _prune(model, data, activation_cache="auto")
    _, other = _prune(model, data, activation_cache=mode)
    assert _kept(other) == _kept(reference)
    tier = {"memory": "device"}.get(mode, mode)
    assert other.report.activation_cache_bytes[tier] > 0


def test_compensated_float32_accumulation():
    """Kahan-compensated float32 sums stay at float64 accuracy where plain float32 drifts."""
    gen = torch.Generator().manual_seed(0)
    batches = [1e3 + torch.randn(64, 6, generator=gen) for _ in range(400)]
    exact = BlockStatistics(6)
    kahan = BlockStatistics(6, dtype=torch.float32)
    naive = torch.zeros(6, 6, dtype=torch.float32)
    for rows in batches:
        exact.update(rows, torch.float64)
        kahan.update(rows, torch.float64)
        naive += (rows.T @ rows).float()
    error_kahan = float((kahan.gram.double() - exact.gram).abs().max() / exact.gram.abs().max())
    error_naive = float((naive.double() - exact.gram).abs().max() / exact.gram.abs().max())
    assert error_kahan < 1e-7 < error_naive
    assert float(kahan.count) == float(exact.count) == 400 * 64
