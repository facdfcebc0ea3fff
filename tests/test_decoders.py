"""Decoder LLM adapters: task heads, tied embeddings, GQA group modes, causal calibration (padding on either side,
no KV cache, datasets text splits), bf16 models, offloaded models and generation after pruning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import DECODER_CONFIGS, VOCAB, tiny_decoder_model, token_batches
from transformers import AutoModelForCausalLM, Qwen2Config

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for, load_pruned, save_pruned
from hf_ispasp.adapters.decoders import DecoderAdapter
from hf_ispasp.budget import uniform_compaction
from hf_ispasp.offload import has_offload
from hf_ispasp.record import METADATA_KEY

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = sorted(DECODER_CONFIGS)
HEADS = ["AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"]
CONFIG = PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.67, show_progress=False)


def _outputs(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _kept(pruner):
    return [b.kept for b in pruner.report.blocks]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", HEADS)
def test_task_heads_prune_save_and_load(family, head, tmp_path):
    model = tiny_decoder_model(family, head)
    data = token_batches(num=16)
    pruned = ISpaSPPruner(model, CONFIG).prune(data)
    record = adapter_for(pruned).widths()
    assert record["heads"] == [2, 2] if family != "gpt2" else record["heads"] == [4, 4]
    assert record["ffn"] == [18, 18]
    pruned.save_pretrained(tmp_path)
    again = load_pruned(tmp_path)
    assert type(again) is type(pruned) and adapter_for(again).widths() == record
    with torch.no_grad():
        torch.testing.assert_close(_outputs(again, data[0]), _outputs(pruned, data[0]))


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_tied_embeddings_stay_tied(family, tmp_path):
    model = tiny_decoder_model(family)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    pruned = ISpaSPPruner(model, CONFIG).prune(token_batches(num=8))
    assert pruned.lm_head.weight is pruned.get_input_embeddings().weight
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the caller's model too
    save_pruned(pruned, tmp_path)
    again = load_pruned(tmp_path)
    assert again.lm_head.weight is again.get_input_embeddings().weight


def _left_padded(batches):
    """The same sequences with their padding moved to the left."""
    result = []
    for batch in batches:
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            ids[i] = torch.cat([ids[i, n:], ids[i, :n]])
            mask[i] = torch.cat([mask[i, n:], mask[i, :n]])
        result.append({"input_ids": ids, "attention_mask": mask})
    return result


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_left_and_right_padding_calibrate_alike(family):
    """Positions count from the first real token and padding is masked: the side of the padding is irrelevant."""
    right = token_batches(num=16, pad_fill=None)
    left = _left_padded(right)
    assert not bool(left[0]["attention_mask"][:, 0].all())  # some sequences really are left-padded
    model = tiny_decoder_model(family)
    a, b = ISpaSPPruner(model, CONFIG), ISpaSPPruner(model, CONFIG)
    a.prune(right)
    b.prune(left)
    assert _kept(a) == _kept(b)
    for x, y in zip(a.report.blocks, b.report.blocks, strict=True):
        assert x.relative_residual == pytest.approx(y.relative_residual, rel=1e-4, abs=1e-7)


def test_padding_content_never_enters_the_statistics():
    model = tiny_decoder_model("llama")
    a, b = ISpaSPPruner(model, CONFIG), ISpaSPPruner(model, CONFIG)
    a.prune(token_batches(num=16))
    b.prune(token_batches(num=16, pad_fill=7))  # garbage ids under the padding
    assert _kept(a) == _kept(b)
    assert [x.relative_residual for x in a.report.blocks] == pytest.approx(
        [x.relative_residual for x in b.report.blocks], rel=1e-6)


def test_calibration_runs_without_a_kv_cache():
    model = tiny_decoder_model("llama")
    model.config.use_cache = True
    seen = []
    handle = model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs.get("use_cache"), kwargs.get("cache"))), with_kwargs=True)
    try:
        ISpaSPPruner(model, CONFIG).prune(token_batches(num=8))
    finally:
        handle.remove()
    assert seen and all(use is False and cache is None for use, cache in seen)
    _, kwargs, _ = adapter_for(model).prepare_batch(token_batches(num=8)[0], torch.device("cpu"))
    assert kwargs["use_cache"] is False


def test_keep_all_generates_exactly_and_pruned_model_generates():
    model = tiny_decoder_model("llama")
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    data = token_batches(num=8)
    same = ISpaSPPruner(model, PrunerConfig(ffn_keep_ratio=1.0, head_keep_ratio=1.0, show_progress=False)).prune(data)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(same.generate(prompt, **kwargs), model.generate(prompt, **kwargs))
        pruned = ISpaSPPruner(model, CONFIG).prune(data)
        assert pruned.generate(prompt, **kwargs).shape == (2, 11)  # the KV cache takes each layer's own widths


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_query_mode_keeps_every_kv_head(family, tmp_path):
    """gqa_groups="query": query heads go, the same number inside each KV group; the record round-trips."""
    model = tiny_decoder_model(family)
    adapter = adapter_for(model)
    adapter.configure(SimpleNamespace(gqa_groups="query"))
    block = adapter.blocks(0)[0]
    assert (block.num_groups, block.partitions, block.group_size) == (6, 3, 6)
    adapter.compact(block, torch.tensor([1, 2, 4]))  # one query head of each KV head
    record = adapter.widths()
    assert record["heads"] == [3, 3] and record["q_per_kv"] == [1, 2]
    attention = adapter.attention(0)
    assert attention.num_key_value_groups == 1
    batch = token_batches(num=4)[0]
    with torch.no_grad():
        expected = _outputs(model, batch)
    setattr(model.config, METADATA_KEY, {"widths": record})  # what the pruner records
    save_pruned(model, tmp_path)
    again = load_pruned(tmp_path)
    assert adapter_for(again).widths() == record
    with torch.no_grad():
        torch.testing.assert_close(_outputs(again, batch), expected)


def test_phi3_layers_read_their_own_head_counts():
    model = tiny_decoder_model("phi3")
    config = PrunerConfig(ffn_keep_ratio=1.0, head_keep_ratio=1.0, layer_overrides={"0": {"head_keep_ratio": 0.34}},
                          show_progress=False)
    pruned = ISpaSPPruner(model, config).prune(token_batches(num=8))
    layer_config = pruned.model.layers[0].self_attn.config
    assert layer_config.num_key_value_heads == 1 and layer_config.num_attention_heads == 2
    assert pruned.config.num_attention_heads == 6  # the model config is not touched
    pruned.config._attn_implementation = "eager"  # the layers read the live config of the returned model
    assert layer_config._attn_implementation == "eager"
    assert model.config._attn_implementation != "eager"


@pytest.mark.parametrize("inplace", [False, True])
def test_pruned_layers_share_the_models_config(inplace):
    model = tiny_decoder_model("llama")
    pruned = ISpaSPPruner(model, CONFIG).prune(token_batches(num=8), inplace=inplace)
    assert all(layer.self_attn.config is pruned.config for layer in pruned.model.layers)
    if not inplace:
        assert all(layer.self_attn.config is model.config for layer in model.model.layers)
    with torch.no_grad():
        assert torch.isfinite(_outputs(pruned, token_batches(num=4)[0])).all()


def test_mixed_sliding_window_layers_refuse_long_sequences():
    config = Qwen2Config(**{**DECODER_CONFIGS["qwen2"], "use_sliding_window": True, "sliding_window": 4,
                            "layer_types": ["full_attention", "sliding_attention"]})
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="sliding window"):
        ISpaSPPruner(model, CONFIG).prune(token_batches(num=8))


def test_datasets_text_split_calibrates():
    datasets = pytest.importorskip("datasets")
    gen = torch.Generator().manual_seed(0)
    stream = torch.randint(3, VOCAB, (16 * 24,), generator=gen).tolist()
    chunks = [stream[i : i + 24] for i in range(0, len(stream), 24)]
    dataset = datasets.Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * 24 for _ in chunks]})
    pruned = ISpaSPPruner(tiny_decoder_model("llama"), CONFIG).prune(dataset)
    assert adapter_for(pruned).widths()["ffn"] == [18, 18]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_prunes_with_finite_statistics(dtype):
    model = tiny_decoder_model("llama").to(dtype)
    pruner = ISpaSPPruner(model, CONFIG)
    pruned = pruner.prune(token_batches(num=8))
    assert pruned.dtype == dtype
    assert all(0 <= b.relative_residual < 1.5 for b in pruner.report.blocks)


def test_offloaded_decoder_prunes_like_the_in_memory_one(tmp_path):
    model = tiny_decoder_model("llama")
    model.save_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert has_offload(offloaded)
    data = token_batches(num=16)
    reference = ISpaSPPruner(model, CONFIG)
    pruned = reference.prune(data)
    pruner = ISpaSPPruner(offloaded, CONFIG)
    pruner.prune(data, inplace=True)
    assert _kept(pruner) == _kept(reference)
    with torch.no_grad():
        torch.testing.assert_close(_outputs(offloaded, data[0]), _outputs(pruned, data[0]), rtol=1e-5, atol=1e-5)


def test_decoder_adapters_are_registered_by_model_type():
    for family in FAMILIES:
        assert isinstance(adapter_for(tiny_decoder_model(family)), DecoderAdapter)


def test_uniform_compaction_prices_both_gqa_modes():
    model = tiny_decoder_model("llama")
    kv = adapter_for(uniform_compaction(model, 0.5, 0.67)).widths()
    assert (kv["heads"], kv["q_per_kv"], kv["ffn"]) == ([2, 2], [2, 2], [18, 18])
    query = adapter_for(uniform_compaction(model, 0.5, 0.5, PrunerConfig(gqa_groups="query"))).widths()
    assert (query["heads"], query["q_per_kv"]) == ([3, 3], [1, 1])
    assert adapter_for(model).widths()["q_per_kv"] == [2, 2]  # on a copy
