"""The LLM pruning baselines `wanda_sp`, `flap` (with its bias compensation) and `llm_pruner`; GQA query groups."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_text_model, token_batches

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for, supported_model_types
from hf_ispasp.algorithm import BlockStatistics, group_columns, select_groups
from hf_ispasp.baselines import flap_scores, mean_compensation, wanda_sp_scores
from hf_ispasp.importance import group_salience, is_causal_lm, llm_pruner_scores, taylor_scores
from hf_ispasp.serialization import load_pruned, save_pruned

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"show_progress": False}
NEW_RULES = ("wanda_sp", "flap", "llm_pruner")

# Hand-computable block: three tokens, three columns, two outputs.
H = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 0.0], [1.0, 4.0, 1.0]], dtype=torch.float64)
W = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 0.0, 0.5]], dtype=torch.float64)


def _stats(h: torch.Tensor) -> BlockStatistics:
    stats = BlockStatistics(h.shape[1])
    stats.update(h, torch.float64)
    return stats


def _labelled(batches: list[dict[str, torch.Tensor]], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{**b, "labels": torch.randint(0, 3, (b["input_ids"].shape[0],), generator=gen)} for b in batches]


# Scores on tensors ------------------------------------------------------------------------------------------------
def test_wanda_sp_by_hand():
    # ||X_j||_2 = sqrt(3), sqrt(20), sqrt(5); sum_i |W_ij| = 2, 1, 1.
    expected = torch.tensor([2 * 3**0.5, 20**0.5, 5**0.5], dtype=torch.float64)
    torch.testing.assert_close(wanda_sp_scores(torch.diagonal(H.T @ H), W, 1), expected)
    assert select_groups(_stats(H), W, 1, 1, selection="wanda_sp").groups.tolist() == [1]
    assert select_groups(_stats(H), W, 1, 2, selection="wanda_sp").groups.tolist() == [0, 1]
    # Groups of columns: the sum of their column scores.
    torch.testing.assert_close(wanda_sp_scores(torch.diagonal(H.T @ H)[:2], W[:, :2], 2),
                               torch.tensor([2 * 3**0.5 + 20**0.5], dtype=torch.float64))


def test_flap_by_hand():
    # Sample variances 0, 4, 1; ||W_:,j||^2 = 2, 1, 0.5: fluctuation 0, 4, 0.5 (squared per column: 0, 16, 0.25).
    stats = _stats(H)
    scores = flap_scores(float(stats.count), stats.total, torch.diagonal(stats.gram), W, 1)
    torch.testing.assert_close(scores, torch.tensor([0.0, 16.0, 0.25], dtype=torch.float64))
    # A constant column is the first to go under FLAP even though its magnitude is the largest (Wanda keeps it).
    assert select_groups(stats, W, 1, 2, selection="flap").groups.tolist() == [1, 2]
    grouped = flap_scores(float(stats.count), stats.total[1:], torch.diagonal(stats.gram)[1:], W[:, 1:], 2)
    torch.testing.assert_close(grouped, torch.tensor([16.25], dtype=torch.float64))


def test_flap_mean_compensation_by_hand():
    mean = H.mean(0)  # 1, 2, 1
    bias = torch.tensor([0.25, -0.5], dtype=torch.float64)
    new_weight, new_bias = mean_compensation(W, bias, mean, torch.tensor([1]))
    torch.testing.assert_close(new_weight, W[:, [1]])
    # dropped columns 0 and 2: W[:, [0, 2]] @ [1, 1] = [1.5, -0.5]
    torch.testing.assert_close(new_bias, bias + torch.tensor([1.5, -0.5], dtype=torch.float64))
    _, added = mean_compensation(W, None, mean, torch.tensor([1]))
    torch.testing.assert_close(added, torch.tensor([1.5, -0.5], dtype=torch.float64))
    # The compensated block is exact at the calibration mean and its mean output error vanishes.
    kept = H[:, [1]] @ new_weight.T + new_bias
    torch.testing.assert_close(kept.mean(0), (H @ W.T + bias).mean(0))


# llm_pruner: |W * dL/dW| summed over the group's weights ------------------------------------------------------------
def test_group_salience_by_hand():
    linear = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]))
    grad = torch.tensor([[1.0, -1.0], [0.0, 1.0], [2.0, 0.0], [-1.0, -1.0]])
    # |W * G| = [[1, 2], [0, 4], [10, 0], [7, 8]]: row sums 3, 4, 10, 15; column sums 18, 14.
    expect = {
        (True, (2,)): [7.0, 25.0],  # two heads of two rows
        (True, (1, 1)): [13.0, 19.0],  # fused [gate | up]: rows 0, 2 are group 0's
        (True, (1,)): [3.0, 4.0, 10.0, 15.0],  # one row per neuron
        (False, (1,)): [18.0, 14.0],  # input side: one column per group
    }
    for (output, sizes), expected in expect.items():
        count = (4 if output else 2) // sum(sizes)
        torch.testing.assert_close(group_salience(linear, grad, output, count, sizes),
                                   torch.tensor(expected, dtype=torch.float64))
    # Units past the grouped segments (Cut.whole) count for no group: four rows, one group of two.
    torch.testing.assert_close(group_salience(linear, grad, True, 1, (2,)), torch.tensor([7.0], dtype=torch.float64))


def _manual_llm_pruner(model, batches, layer: int = 0) -> dict[str, torch.Tensor]:
    """The scores by hand for a BERT layer: backward of the summed loss, then the group's rows and columns."""
    model.zero_grad(set_to_none=True)
    for batch in batches:
        out = model(**batch)
        (out.loss * batch["labels"].numel()).backward()
    bert = model.bert.encoder.layer[layer]
    salience = {name: (m.weight * m.weight.grad).abs().detach().double() for name, m in {
        "q": bert.attention.self.query, "k": bert.attention.self.key, "v": bert.attention.self.value,
        "o": bert.attention.output.dense, "up": bert.intermediate.dense, "down": bert.output.dense}.items()}
    model.zero_grad(set_to_none=True)
    heads = sum(salience[n].sum(1).reshape(3, 10).sum(1) for n in "qkv") + salience["o"].sum(0).reshape(3, 10).sum(1)
    neurons = salience["up"].sum(1) + salience["down"].sum(0)
    return {f"layer.{layer}.attention": heads, f"layer.{layer}.ffn": neurons}


def test_llm_pruner_scores_match_manual_gradients():
    model = tiny_text_model("bert")
    batches = _labelled(token_batches(num=12, batch_size=4))
    scores = llm_pruner_scores(model, adapter_for(model), batches, torch.device("cpu"))
    assert not any(p.grad is not None for p in model.parameters())  # .grad is left alone
    for name, expected in _manual_llm_pruner(model, batches).items():
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-9)
    assert set(scores) == {b.name for b in adapter_for(model).iter_blocks()}


def test_llm_pruner_is_one_gradient_over_the_whole_set():
    """Like LLM-Pruner's single backward over all its examples: the batching does not change the scores."""
    model = tiny_text_model("bert")
    batches = _labelled(token_batches(num=8, batch_size=8, min_len=9, max_len=9))
    halves = [{k: v[i : i + 4] for k, v in batches[0].items()} for i in (0, 4)]
    adapter = adapter_for(model)
    whole = llm_pruner_scores(model, adapter, batches, torch.device("cpu"))
    split = llm_pruner_scores(model, adapter, halves, torch.device("cpu"))
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-9)


def test_llm_pruner_on_a_frozen_model_restores_the_flags():
    model = tiny_text_model("bert")
    model.requires_grad_(False)
    scores = llm_pruner_scores(model, adapter_for(model), _labelled(token_batches(num=8)), torch.device("cpu"))
    assert all(float(s.sum()) > 0 for s in scores.values())
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="needs labels"):
        llm_pruner_scores(model, adapter_for(model), token_batches(num=8), torch.device("cpu"))


# End to end on a tiny BERT ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", NEW_RULES)
def test_bert_prunes_to_the_budget(selection):
    model = tiny_text_model("bert")
    batches = _labelled(token_batches())
    pruner = ISpaSPPruner(model, PrunerConfig(selection=selection, refit=False, ffn_keep_ratio=0.5,
                                              head_keep_ratio=0.7, **QUIET))
    pruned = pruner.prune(batches)
    for layer in pruned.bert.encoder.layer:
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 18  # round(0.5 * 37)
        assert layer.attention.self.num_attention_heads == 2  # round(0.7 * 3)
        assert layer.attention.output.dense.in_features == 20
    with torch.no_grad():
        assert torch.isfinite(pruned(**batches[0]).logits).all()
    flap = selection == "flap"
    assert all((b.refit_ridge == float("inf")) == flap for b in pruner.report.blocks)  # bias-only compensation


def _mean_input(model, module, batches) -> torch.Tensor:
    """Mean over real tokens of ``module``'s input in ``model``."""
    rows = []
    handle = module.register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    return torch.cat([h[b["attention_mask"].bool()] for h, b in zip(rows, batches, strict=True)]).mean(0)


def test_flap_compensation_is_exact_at_the_calibration_mean(tmp_path):
    model = tiny_text_model("bert")
    batches = token_batches()
    pruner = ISpaSPPruner(model, PrunerConfig(selection="flap", refit=False, head_keep_ratio=0.4, **QUIET))
    pruned = pruner.prune(batches)
    dense = model.bert.encoder.layer[0].attention.output.dense  # the first block: its input is not pruned upstream
    small = pruned.bert.encoder.layer[0].attention.output.dense
    report = pruner.report.blocks[0]
    assert report.name == "layer.0.attention" and report.groups_after == 1
    mean = _mean_input(model, dense, batches)
    columns = group_columns(torch.tensor(report.kept), 10)
    with torch.no_grad():
        target = dense(mean)
        compensated = small(mean[columns])
        plain = mean[columns] @ small.weight.T + dense.bias
    assert (compensated - target).norm() < 1e-4 * target.norm()
    assert (compensated - target).norm() < 0.1 * (plain - target).norm()
    # Save / load round trip with the compensated biases.
    save_pruned(pruned, tmp_path / "flap")
    loaded = load_pruned(tmp_path / "flap")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, pruned(**batches[0]).logits)


def test_flap_with_refit_installs_the_refit():
    model = tiny_text_model("bert")
    pruner = ISpaSPPruner(model, PrunerConfig(selection="flap", refit=True, refit_validation=False, **QUIET))
    pruner.prune(token_batches())
    assert all(b.refit_ridge == pytest.approx(1e-4) for b in pruner.report.blocks if b.groups_after < b.groups_before)


def test_causal_lm_detection():
    bert = tiny_text_model("bert")
    assert not is_causal_lm(bert, adapter_for(bert))

    class GPTLMHeadModel(torch.nn.Module):
        pass

    assert is_causal_lm(GPTLMHeadModel())


# Tiny LLaMA (GQA: 4 query heads over 2 KV heads) ------------------------------------------------------------------
needs_decoders = pytest.mark.skipif("llama" not in supported_model_types(), reason="no decoder adapter registered")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=37, vocab_size=101, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def _prune_llama(selection: str, **kwargs):
    model = _llama()
    config = PrunerConfig(selection=selection, refit=False, ffn_keep_ratio=0.5, head_keep_ratio=0.5,
                          **{**QUIET, **kwargs})
    pruner = ISpaSPPruner(model, config)
    return model, pruner.prune(token_batches()), pruner


@needs_decoders
@pytest.mark.parametrize("selection", [*NEW_RULES, "taylor", "ispasp"])
@pytest.mark.parametrize("gqa_groups", ["kv", "query"])
def test_llama_prunes_to_the_budget(selection, gqa_groups):
    _, pruned, pruner = _prune_llama(selection, gqa_groups=gqa_groups)
    for layer in pruned.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 18
        if gqa_groups == "kv":  # one of the two KV heads, with both its query heads
            assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (32, 16, 16)
        else:  # both KV heads, one query head each
            assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (32, 32, 32)
        assert attn.o_proj.in_features == 32
    for block in pruner.report.blocks:
        if block.kind == "heads" and gqa_groups == "query":
            assert block.groups_before == 4 and [g // 2 for g in block.kept] == [0, 1]
    batch = token_batches()[0]
    with torch.no_grad():
        assert torch.isfinite(pruned(**batch).logits).all()


@needs_decoders
def test_llama_flap_adds_biases_that_survive_save_and_load(tmp_path):
    model, pruned, pruner = _prune_llama("flap")
    assert model.model.layers[0].self_attn.o_proj.bias is None  # the caller's model is untouched
    added = pruned.config.ispasp["added_biases"]
    assert added == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.o_proj"))
    for path in added:
        assert pruned.get_submodule(path).bias is not None
    # The first block is exact at its calibration mean (its input is the dense model's).
    mean = _mean_input(model, model.model.layers[0].self_attn.o_proj, token_batches())
    columns = group_columns(torch.tensor(pruner.report.blocks[0].kept), 32)
    with torch.no_grad():
        target = model.model.layers[0].self_attn.o_proj(mean)
        compensated = pruned.model.layers[0].self_attn.o_proj(mean[columns])
    torch.testing.assert_close(compensated, target, rtol=1e-4, atol=1e-5)
    save_pruned(pruned, tmp_path / "llama")
    loaded = load_pruned(tmp_path / "llama")
    batch = token_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, pruned(**batch).logits)


@needs_decoders
@pytest.mark.parametrize("scorer", [taylor_scores, llm_pruner_scores])
def test_causal_lm_labels_default_to_the_inputs(scorer):
    model = _llama()
    adapter = adapter_for(model)
    assert is_causal_lm(model, adapter)
    batches = token_batches(num=8)
    explicit = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in batches]
    implicit = scorer(model, adapter, batches, torch.device("cpu"))
    labelled = scorer(model, adapter, explicit, torch.device("cpu"))
    for name in implicit:
        torch.testing.assert_close(implicit[name], labelled[name])
        assert float(implicit[name].sum()) > 0


@needs_decoders
def test_llm_pruner_reads_conv1d_weights_the_right_way_round():
    """GPT-2 stores Conv1D weights as (in, out): the FFN's c_fc loses columns, its c_proj rows."""
    from conftest import tiny_decoder_model

    model = tiny_decoder_model("gpt2")
    batches = token_batches(num=8)
    scores = llm_pruner_scores(model, adapter_for(model), batches, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        (model(**batch, labels=labels).loss * float((labels[:, 1:] != -100).sum())).backward()
    mlp = model.transformer.h[0].mlp
    up, down = ((m.weight * m.weight.grad).abs().detach().double() for m in (mlp.c_fc, mlp.c_proj))
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(scores["layer.0.ffn"], up.sum(0) + down.sum(1), rtol=1e-4, atol=1e-9)


@needs_decoders
@pytest.mark.parametrize("selection", NEW_RULES)
@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "phi3", "gpt2"])
def test_every_decoder_prunes_with_query_groups(model_type, selection):
    """Query-head groups (3 KV heads x 2 queries; GPT-2: 6 heads) on every decoder, for every new rule."""
    from conftest import tiny_decoder_model

    model = tiny_decoder_model(model_type)
    config = PrunerConfig(selection=selection, refit=False, head_keep_ratio=0.5, gqa_groups="query", **QUIET)
    pruner = ISpaSPPruner(model, config)
    pruned = pruner.prune(token_batches())
    heads = [b for b in pruner.report.blocks if b.kind == "heads"]
    assert all(b.groups_after == 3 for b in heads)
    if model_type != "gpt2":  # one query head kept in each KV group
        assert all([g // 2 for g in b.kept] == [0, 1, 2] for b in heads)
    with torch.no_grad():
        assert torch.isfinite(pruned(**token_batches()[0]).logits).all()


@needs_decoders
def test_phi3_flap_with_query_groups_round_trips(tmp_path):
    """Fused qkv_proj (keys and values whole), added o_proj / down_proj biases, save and reload."""
    from conftest import tiny_decoder_model

    config = PrunerConfig(selection="flap", refit=False, head_keep_ratio=0.5, gqa_groups="query", **QUIET)
    pruned = ISpaSPPruner(tiny_decoder_model("phi3"), config).prune(token_batches())
    assert len(pruned.config.ispasp["added_biases"]) == 4
    save_pruned(pruned, tmp_path / "phi3")
    loaded = load_pruned(tmp_path / "phi3")
    batch = token_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, pruned(**batch).logits)


@needs_decoders
def test_llama_flap_with_refit_adds_the_refitted_bias():
    """With a re-fit installed, the re-fit (centred, so with a bias) replaces the compensation; the bias is added."""
    model = _llama()
    config = PrunerConfig(selection="flap", refit=True, refit_validation=False, ffn_keep_ratio=0.5,
                          head_keep_ratio=0.5, **QUIET)
    pruner = ISpaSPPruner(model, config)
    pruned = pruner.prune(token_batches())
    assert len(pruned.config.ispasp["added_biases"]) == 4
    assert all(b.refit_ridge == pytest.approx(1e-4) for b in pruner.report.blocks)
    assert all(b.relative_residual_refit < b.relative_residual for b in pruner.report.blocks)
    assert float(pruned.model.layers[0].mlp.down_proj.bias.detach().abs().sum()) > 0
