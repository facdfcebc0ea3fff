"""ONNX export of pruned models: onnxruntime equals PyTorch at batch sizes and lengths other than the export's,
clear errors, and the stock config that serving engines read for decoders with uniform widths."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import VOCAB, tiny_decoder_model, tiny_text_model, token_batches

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for, save_pruned
from hf_ispasp.export import OnnxRunner, check_onnx, export_onnx
from hf_ispasp.metrics import latency_ratio

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")

# Layer 0 keeps 2 of 3 heads (LLaMA: KV groups) and half the FFN, layer 1 every head and 30 of 37 neurons.
NON_UNIFORM = PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.67, show_progress=False,
                           layer_overrides={1: {"ffn_keep_ratio": 0.8, "head_keep_ratio": 1.0}})
UNIFORM = PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.67, show_progress=False)


def _pruned(model: torch.nn.Module, config: PrunerConfig) -> torch.nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test one_thread fixture
    try:
        return ISpaSPPruner(model, config).prune(token_batches(num=8))
    finally:
        torch.set_num_threads(threads)


def _batch(batch: int, length: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Padded token batch of exactly ``batch`` x ``length``; ``left`` moves the padding to the front."""
    out = token_batches(num=batch, batch_size=batch, min_len=2, max_len=length, pad_to=length, seed=batch)[0]
    if left:
        shift = (out["attention_mask"] == 0).sum(1)
        out = {k: torch.stack([row.roll(int(s)) for row, s in zip(v, shift, strict=True)]) for k, v in out.items()}
    return out


def _export(model: torch.nn.Module, path, example=None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return export_onnx(model, path, example)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    model = _pruned(tiny_text_model("bert"), NON_UNIFORM)
    return model, _export(model, tmp_path_factory.mktemp("onnx") / "encoder.onnx")  # default example: 2 x 8


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    model = _pruned(tiny_decoder_model("llama"), NON_UNIFORM)
    example = _batch(2, 8)
    return model, _export(model, tmp_path_factory.mktemp("onnx") / "decoder.onnx", example)


def _dims(path) -> dict[str, list]:
    import onnx

    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}


def test_pruned_encoder_round_trip_at_other_shapes(encoder):
    model, path = encoder
    widths = adapter_for(model).widths()
    assert widths["heads"] == [2, 3] and widths["ffn"] == [18, 30]  # per-layer widths differ
    assert _dims(path) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                           "logits": ["batch", 3]}
    runner = OnnxRunner(path)
    for batch, length in ((3, 5), (5, 19)):  # neither is the export's 2 x 8
        check = check_onnx(runner, model, _batch(batch, length))
        assert check.ok and check.max_abs_diff < 1e-5, check
        assert check.shapes == {"logits": (batch, 3)}


def test_pruned_decoder_round_trip_at_other_shapes(decoder):
    model, path = decoder
    widths = adapter_for(model).widths()
    assert widths["heads"] == [2, 3] and widths["q_per_kv"] == [2, 2] and widths["ffn"] == [18, 30]
    assert _dims(path) == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                           "logits": ["batch", "sequence", VOCAB]}  # no KV-cache outputs
    runner = OnnxRunner(path)
    for batch, length, left in ((3, 5, False), (4, 21, True)):  # serving batches are left-padded
        check = check_onnx(runner, model, _batch(batch, length, left))
        assert check.ok and check.max_abs_diff < 1e-5, check
        assert check.shapes == {"logits": (batch, length, VOCAB)}
    # Right padding leaves no query without keys: every position, padding included, agrees.
    assert check_onnx(runner, model, _batch(3, 5), ignore_padding=False).ok


def test_check_fails_on_another_model(encoder):
    model, path = encoder
    other = copy.deepcopy(model)  # the same shapes, one weight changed
    with torch.no_grad():
        other.classifier.bias[1] += 0.01
    check = check_onnx(path, other, _batch(3, 5))
    assert not check.ok and check.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    # a model whose outputs have another shape: infinite difference, not a broadcast comparison
    check = check_onnx(path, tiny_text_model("bert", head="AutoModelForTokenClassification"), _batch(3, 5))
    assert not check.ok and check.diffs["logits"] == float("inf")


def test_latency_ratio_times_onnx_sessions(encoder, decoder):
    _, encoder_path = encoder
    ticks = iter(range(10_000))
    inputs = {k: v.to(torch.int32) for k, v in _batch(3, 6).items()}  # cast to the graph's int64 by the runner
    result = latency_ratio(OnnxRunner(encoder_path), OnnxRunner(encoder_path), inputs, repeats=3, rounds=1,
                           warmup=1, clock=lambda: float(next(ticks)))
    assert result.pairs == 3 and result.speedup == 1.0  # every call takes one tick
    with pytest.raises(ValueError, match="missing \\['attention_mask'\\]"):
        OnnxRunner(decoder[1])(input_ids=inputs["input_ids"])


def test_missing_onnx_packages_name_the_extra(monkeypatch, tmp_path, encoder):
    model, path = encoder
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"onnxscript.*pip install 'hf_ispasp\[onnx\]'"):
        export_onnx(model, tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install 'hf_ispasp\[onnx\]'"):
        check_onnx(path, model, _batch(2, 4))
    assert not list(tmp_path.iterdir())


def test_export_refuses_bad_inputs_and_paths(tmp_path):
    model = tiny_text_model("bert")
    with pytest.raises(ValueError, match="at least 2 long"):  # a batch of 1 would fix the batch size
        export_onnx(model, tmp_path / "m.onnx", {"input_ids": torch.ones(1, 8, dtype=torch.long)})
    with pytest.raises(ValueError, match="at least 2 long"):
        export_onnx(model, tmp_path / "m.onnx", {"input_ids": torch.ones(4, 1, dtype=torch.long)})
    with pytest.raises(TypeError, match="must hold tensors"):
        export_onnx(model, tmp_path / "m.onnx", {"input_ids": [[1, 2], [3, 4]]})
    with pytest.raises(IsADirectoryError, match="model.onnx"):
        export_onnx(model, tmp_path)
    with pytest.raises(ValueError, match="pass example_inputs"):
        export_onnx(torch.nn.Linear(4, 2), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_failed_write_keeps_the_previous_file(monkeypatch, tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")

    class HalfWritten:
        def save(self, destination):
            open(destination, "wb").write(b"partial")
            raise OSError("disk full")

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: HalfWritten())
    with pytest.raises(OSError, match="disk full"):
        export_onnx(tiny_text_model("bert"), target)
    assert target.read_bytes() == b"previous export" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]

    def broken(*args, **kwargs):
        raise NotImplementedError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="BertForSequenceClassification: unsupported operator"):
        export_onnx(tiny_text_model("bert"), target)
    assert target.read_bytes() == b"previous export"


def test_uniform_decoder_config_is_what_serving_engines_read(tmp_path):
    """vLLM / TGI / llama.cpp converters build the model from ``config.json`` alone and load the safetensors by name.

    So with uniform widths the config must be the stock one (stock architecture, no ``auto_map``, no remote code),
    must not need the ``ispasp`` record, and its head counts, ``head_dim`` and FFN width must give every weight
    shape in the file. (test_portable checks stock loading of Mistral/Qwen/Phi-3 with the record present.)
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    model = _pruned(tiny_decoder_model("llama"), UNIFORM)
    save_pruned(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]
    assert not {"auto_map", "transformers_weights"} & set(saved) and not list(tmp_path.glob("*.py"))
    del saved["ispasp"]  # what an engine ignores; nothing below may depend on it
    (tmp_path / "config.json").write_text(json.dumps(saved))

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is LlamaConfig
    heads, groups, head_dim = config.num_attention_heads, config.num_key_value_heads, saved["head_dim"]
    assert (heads, groups, config.intermediate_size) == (4, 2, 18)
    assert heads * head_dim != config.hidden_size  # so engines must read head_dim, not hidden_size // heads
    expected = {"self_attn.q_proj": (heads * head_dim, config.hidden_size),
                "self_attn.k_proj": (groups * head_dim, config.hidden_size),
                "self_attn.v_proj": (groups * head_dim, config.hidden_size),
                "self_attn.o_proj": (config.hidden_size, heads * head_dim),
                "mlp.gate_proj": (config.intermediate_size, config.hidden_size),
                "mlp.up_proj": (config.intermediate_size, config.hidden_size),
                "mlp.down_proj": (config.hidden_size, config.intermediate_size)}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        for layer in range(config.num_hidden_layers):
            for name, shape in expected.items():
                assert tuple(weights.get_slice(f"model.layers.{layer}.{name}.weight").get_shape()) == shape, name

    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(stock) is LlamaForCausalLM
    batch = _batch(3, 7, left=True)
    with torch.no_grad():
        torch.testing.assert_close(stock(**batch).logits, model(**batch).logits)


def test_pruned_timm_model_round_trip(tmp_path):
    """timm models export too: one image input, a dynamic batch axis, the default example from ``input_size``."""
    from vision_fixtures import IMAGE_SIZE, tiny_vision_models

    images = torch.randn(24, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    config = PrunerConfig(ffn_keep_ratio=0.5, show_progress=False, layer_overrides={0: {"ffn_keep_ratio": 0.75}})
    model = ISpaSPPruner(tiny_vision_models()["ResNet"](), config).prune([images])
    assert adapter_for(model).widths()["layers"] == [[6], [6], [8], [10]]  # of 8, 12, 16, 20 channels
    path = export_onnx(model, tmp_path / "resnet.onnx")
    assert _dims(path)["input"] == ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
    for batch in (3, 5):
        check = check_onnx(path, model, images[:batch])
        assert check.ok and check.shapes == {"logits": (batch, 3)}, check
