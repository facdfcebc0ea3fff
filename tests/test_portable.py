"""Pruned checkpoints load without hf_ispasp: plain configs, self-contained remote code, clear wrong-way errors.

The loads run in one subprocess per test where ``import hf_ispasp`` fails, with transformers alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DECODER_CONFIGS, TEXT_CONFIGS, tiny_decoder_model, tiny_text_model, token_batches
from vision_fixtures import IMAGE_SIZE, tiny_transformers_vit

from hf_ispasp import PrunerConfig, load_pruned, save_pruned
from hf_ispasp.adapters import ADAPTER_REGISTRY, adapter_for
from hf_ispasp.adapters.decoders import DecoderAdapter
from hf_ispasp.adapters.encoders import TransformerEncoderAdapter
from hf_ispasp.portable import MODELING_FILE, WRONG_WAY, plain_config_updates
from hf_ispasp.pruner import _record_metadata
from hf_ispasp.serialization import add_zero_bias

pytestmark = pytest.mark.usefixtures("one_thread")

_LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["hf_ispasp"] = None  # the package must not be needed
    import torch, transformers
    torch.set_num_threads(1)
    results = {}
    for case in json.loads(sys.argv[1]):
        folder, io = case["folder"], torch.load(case["folder"] + "/io.pt")
        auto = getattr(transformers, case["auto"])
        def attempt(load):
            try:
                model = load()
            except Exception as err:
                return {"error": f"{type(err).__name__}: {err}"}
            with torch.no_grad():
                logits = model(**io["inputs"]).logits
            return {"class": type(model).__name__,
                    "max_diff": float((logits - io["logits"]).abs().max()) if logits.shape == io["logits"].shape
                    else float("inf")}
        results[folder] = {
            "trusted": attempt(lambda: auto.from_pretrained(folder, trust_remote_code=True)),
            "plain": attempt(lambda: auto.from_pretrained(folder)),
            "ignore_sizes": attempt(lambda: auto.from_pretrained(folder, ignore_mismatched_sizes=True)),
            "stock_class": attempt(lambda: getattr(transformers, case["architecture"]).from_pretrained(
                folder, ignore_mismatched_sizes=True)),
        }
    print("RESULTS" + json.dumps(results))
""")


def _load_without_hf_ispasp(cases: list[dict], tmp_path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(cases)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULTS", 1)[1])


def _compact(model, keep, added_bias: bool = False, query_heads: bool = False):
    """Compact every block to ``keep(layer, block)`` and record the widths as the pruner does.

    ``query_heads``: decoders with grouped-query attention cut layer 1's query heads (``gqa_groups="query"``),
    so the record holds different query heads per KV head across layers.
    """
    adapter = adapter_for(model)
    for layer in range(len(adapter.layers())):
        if isinstance(adapter, DecoderAdapter):
            mode = "query" if query_heads and layer == 1 else "kv"
            adapter.configure(PrunerConfig(gqa_groups=mode, show_progress=False))
        for block in adapter.blocks(layer):
            kept = keep(layer, block)
            if block.partitions > 1:  # query heads: the same count in each KV head
                run = block.num_groups // block.partitions
                kept = torch.cat([p * run + torch.arange(run - 1) for p in range(block.partitions)])
            adapter.compact(block, kept)
    added = []
    if added_bias:  # FLAP's compensation gives a bias-free projection a bias
        with torch.no_grad():
            add_zero_bias(model.model.layers[0].self_attn.o_proj).normal_()
        added = ["model.layers.0.self_attn.o_proj"]
    _record_metadata(model, adapter, PrunerConfig(show_progress=False), added)
    return model


def _non_uniform(layer: int, block) -> torch.Tensor:
    return torch.arange(0, block.num_groups, 2) if layer == 0 else torch.arange(1, block.num_groups)


def _all_but_first(layer: int, block) -> torch.Tensor:
    return torch.arange(1, block.num_groups)


def _inputs(model) -> dict:
    if model.config.model_type == "vit":
        return {"pixel_values": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))}
    return token_batches(num=4, batch_size=4)[0]


def _save(model, folder, plain_call: bool) -> None:
    """``save_pruned`` or the ordinary transformers ``save_pretrained``; both must write a portable checkpoint."""
    if plain_call:
        model.save_pretrained(folder)
    else:
        save_pruned(model, folder)
    inputs = _inputs(model)
    with torch.no_grad():
        torch.save({"inputs": inputs, "logits": model(**inputs).logits}, folder / "io.pt")


def _transformers_models() -> dict[str, tuple]:
    """Registry key -> (factory, auto class) for every registered transformers architecture."""
    models = {k: (lambda k=k: tiny_text_model(k), "AutoModelForSequenceClassification") for k in TEXT_CONFIGS}
    models.update({k: (lambda k=k: tiny_decoder_model(k), "AutoModelForCausalLM") for k in DECODER_CONFIGS})
    models["vit"] = (tiny_transformers_vit, "AutoModelForImageClassification")
    return models


def test_every_transformers_architecture_is_covered():
    transformers_keys = {k for k, cls in ADAPTER_REGISTRY.items()
                         if issubclass(cls, (TransformerEncoderAdapter, DecoderAdapter))}
    assert transformers_keys == set(_transformers_models())


def test_non_uniform_widths_load_with_remote_code_only(tmp_path):
    cases, folders = [], []
    for index, (key, (factory, auto)) in enumerate(sorted(_transformers_models().items())):
        model = _compact(factory(), _non_uniform, added_bias=key == "llama", query_heads=True)
        folder = tmp_path / f"ckpt-{key}"
        _save(model, folder, plain_call=index % 2 == 0)
        config = json.loads((folder / "config.json").read_text())
        assert config["transformers_weights"] == WRONG_WAY and config["auto_map"][auto].startswith("modeling_pruned.")
        assert (folder / MODELING_FILE).is_file() and "hf_ispasp" not in _imports(folder / MODELING_FILE)
        cases.append({"folder": str(folder), "auto": auto, "architecture": config["architectures"][0]})
        folders.append(str(folder))
    results = _load_without_hf_ispasp(cases, tmp_path)
    for folder, result in results.items():
        assert result["trusted"].get("max_diff", 1) < 1e-5, (folder, result["trusted"])
        assert result["trusted"]["class"].startswith("Pruned"), folder
        for wrong_way in ("plain", "ignore_sizes", "stock_class"):
            message = result[wrong_way].get("error", "")
            assert "trust_remote_code=True" in message and "load_pruned" in message, (folder, wrong_way, result)
    # load_pruned reads the same checkpoints.
    for folder in folders[:3]:
        io = torch.load(f"{folder}/io.pt")
        with torch.no_grad():
            torch.testing.assert_close(load_pruned(folder)(**io["inputs"]).logits, io["logits"])


def _imports(path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith(("import", "from")))


def test_uniform_decoders_load_with_plain_from_pretrained(tmp_path):
    cases = []
    for key in ("mistral", "qwen2", "qwen3", "phi3"):
        model = _compact(tiny_decoder_model(key), _all_but_first)
        folder = tmp_path / f"plain-{key}"
        _save(model, folder, plain_call=key in ("qwen2", "phi3"))
        config = json.loads((folder / "config.json").read_text())
        head_dim = 8 if key == "qwen3" else 6
        assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, head_dim)
        assert config["intermediate_size"] == 36 and "auto_map" not in config and "transformers_weights" not in config
        assert config["ispasp"]["widths"]["heads"] == [2, 2]  # the record stays for load_pruned
        assert not (folder / MODELING_FILE).exists()
        cases.append({"folder": str(folder), "auto": "AutoModelForCausalLM",
                      "architecture": config["architectures"][0]})
        io = torch.load(folder / "io.pt")
        with torch.no_grad():
            torch.testing.assert_close(load_pruned(folder)(**io["inputs"]).logits, io["logits"])
    for folder, result in _load_without_hf_ispasp(cases, tmp_path).items():
        for way in ("plain", "stock_class"):
            assert result[way].get("max_diff", 1) < 1e-5, (folder, way, result[way])
            assert not result[way]["class"].startswith("Pruned")


def _uniform_prune(model, heads: int | None = None, ffn: int | None = None):
    def keep(layer, block):
        wanted = ffn if block.kind == "ffn" else heads
        return torch.arange(wanted if wanted is not None else block.num_groups)

    return _compact(model, keep)


def test_plain_only_where_the_stock_config_can_state_the_widths():
    from transformers import AutoConfig, AutoModelForCausalLM

    def mha(model_type):  # 6 heads of 6 without grouping: 5 heads do not divide the hidden size 36
        config = AutoConfig.for_model(model_type, **{**DECODER_CONFIGS[model_type], "num_key_value_heads": 6})
        return AutoModelForCausalLM.from_config(config).eval()

    # LLaMA's config refuses 36 % 5 != 0 even with head_dim; Qwen2's takes the explicit head_dim.
    assert plain_config_updates(_uniform_prune(mha("llama"), heads=5)) is None
    assert plain_config_updates(_uniform_prune(mha("qwen2"), heads=5))["num_attention_heads"] == 5
    # A divisor of the hidden size is plain for LLaMA too.
    updates = plain_config_updates(_uniform_prune(tiny_decoder_model("llama"), heads=2))
    assert {"num_attention_heads": 4, "num_key_value_heads": 2}.items() <= updates.items()
    # BERT and GPT-2 derive the head size from the hidden size: pruned heads need the remote code ...
    assert plain_config_updates(_uniform_prune(tiny_text_model("bert"), heads=2)) is None
    assert plain_config_updates(_uniform_prune(tiny_decoder_model("gpt2"), heads=5)) is None
    # ... while a uniform FFN with every head kept is plain.
    assert plain_config_updates(_uniform_prune(tiny_text_model("bert"), ffn=20)) == {
        "num_attention_heads": 3, "intermediate_size": 20}
    assert plain_config_updates(_uniform_prune(tiny_decoder_model("gpt2"), ffn=20)) == {"n_head": 6, "n_inner": 20}
    # Non-uniform widths and added biases never are.
    assert plain_config_updates(_compact(tiny_decoder_model("qwen2"), _non_uniform)) is None
    assert plain_config_updates(_compact(tiny_decoder_model("llama"), lambda _, block: torch.arange(block.num_groups),
                                         added_bias=True)) is None


def test_checkpoints_without_portable_fields_still_load(tmp_path):
    """A checkpoint written before the portable files existed (record only) loads with load_pruned."""
    model = _compact(tiny_text_model("bert"), _non_uniform)
    save_pruned(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["auto_map"], config["transformers_weights"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / MODELING_FILE).unlink()
    batch = token_batches()[0]
    again = load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert not hasattr(again.config, "transformers_weights") and not hasattr(again.config, "auto_map")
