"""FLOPs / parameter targets: pricing of groups, uniform and global allocation, reports, records, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_decoder_model, tiny_factories, tiny_text_model, token_batches

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for, load_pruned, save_pruned
from hf_ispasp.algorithm import BlockStatistics, residual_curve
from hf_ispasp.allocation import (
    BudgetBlock,
    InfeasibleBudgetError,
    LinearPricing,
    allocate_global,
    allocate_uniform,
)
from hf_ispasp.budget import block_costs, cut_copy
from hf_ispasp.config import kept_count
from hf_ispasp.metrics import count_flops, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def _example(model):
    return adapter_for(model).example_inputs()


def _cut(model, widths, options=None):
    return cut_copy(model, widths, options)


def _random_widths(model, seed, options=None):
    adapter = adapter_for(model)
    if options is not None:
        adapter.configure(options)
    gen = torch.Generator().manual_seed(seed)
    widths = {}
    for block in adapter.iter_blocks():
        runs = block.partitions
        widths[block.name] = runs * int(torch.randint(1, block.num_groups // runs + 1, (1,), generator=gen))
    return widths


def _factories():
    factories = tiny_factories()
    try:
        from vision_fixtures import extra_timm_models

        factories.update(extra_timm_models())  # a bottleneck ResNet: two prunable blocks in one layer
    except ImportError:
        pass
    return factories


@pytest.mark.parametrize("key", sorted(_factories()))
def test_costs_are_linear_in_the_kept_groups(key):
    """The corners measured on one layer copy at a time predict any other cut exactly (multilinear prices)."""
    model = _factories()[key]().eval()
    costs = block_costs(model)
    assert costs.dense["params"] == count_parameters(model)
    assert costs.dense["flops"] == count_flops(model, _example(model))
    for seed in (0, 1):
        widths = _random_widths(model, seed)
        cut = _cut(model, widths)
        assert costs.predict("params", widths) == pytest.approx(count_parameters(cut), rel=1e-9)
        assert costs.predict("flops", widths) == pytest.approx(count_flops(cut, _example(model)), rel=1e-9)


def test_costs_of_query_heads_under_gqa():
    model = tiny_decoder_model("llama")
    options = PrunerConfig(gqa_groups="query")
    costs = block_costs(model, options=options)
    kv = block_costs(model)
    dense = {name: n for name, n in kv.num_groups.items()}
    # a KV group is its 2 query heads plus its key and value heads
    one_kv = kv.predict("params", dense) - kv.predict("params", {**dense, "layer.0.attention": 2})
    queries = {name: n for name, n in costs.num_groups.items()}
    one_query = costs.predict("params", queries) - costs.predict("params", {**queries, "layer.0.attention": 5})
    assert one_kv > 2 * one_query
    widths = _random_widths(model, 3, options)
    assert costs.predict("flops", widths) == count_flops(_cut(model, widths, options), _example(model))


def _block(name, n, errors, step=1, floor=1):
    counts = list(range(n + 1)) if errors else []
    return BudgetBlock(name, n, floor=floor, step=step, counts=counts, errors=errors)


def test_global_allocation_removes_where_error_is_cheap():
    # a: error grows fast when groups leave; b: slowly. Same price per group.
    a = _block("a", 10, [100.0 * (10 - k) ** 2 for k in range(11)])
    b = _block("b", 10, [1.0 * (10 - k) ** 2 for k in range(11)])
    widths = allocate_global([a, b], LinearPricing(5.0, {"a": 1.0, "b": 1.0}), target=15.0)
    assert 5 + widths["a"] + widths["b"] <= 15
    assert widths["a"] > widths["b"]
    # water-filling: the marginal errors per group are balanced (100 (10-a) ~ (10-b)), so a loses about one group
    assert widths["a"] >= 9 and widths["b"] <= 2


def test_global_allocation_respects_steps_floors_and_fills_the_target():
    a = _block("a", 12, [float((12 - k) ** 2) for k in range(13)], step=4, floor=4)
    b = _block("b", 7, [float((7 - k) ** 2) for k in range(8)])
    widths = allocate_global([a, b], LinearPricing(0.0, {"a": 2.0, "b": 1.0}), target=20.0)
    assert widths["a"] % 4 == 0 and widths["a"] >= 4 and widths["b"] >= 1
    total = 2 * widths["a"] + widths["b"]
    assert total <= 20
    # nothing left that fits: adding one step to any block would break the target
    assert total + 1 > 20 or widths["b"] == 7
    assert total + 8 > 20 or widths["a"] == 12


def test_infeasible_target_names_the_smallest_reachable_value():
    blocks = [_block("a", 4, [4.0, 3.0, 2.0, 1.0, 0.0]), _block("b", 4, [4.0, 3.0, 2.0, 1.0, 0.0])]
    pricing = LinearPricing(8.0, {"a": 1.0, "b": 1.0})
    with pytest.raises(InfeasibleBudgetError, match=r"ask for 0\.625 or more"):
        allocate_global(blocks, pricing, target=8.5)  # dense 16, at least 8 + 1 + 1 = 10
    with pytest.raises(InfeasibleBudgetError, match="embeddings"):
        allocate_uniform(blocks, pricing, 8.5, lambda b, r: kept_count(b.num_groups, r))


def test_uniform_allocation_is_one_ratio_that_meets_the_target():
    blocks = [_block("a", 10, []), _block("b", 20, [])]
    widths, ratio = allocate_uniform(blocks, LinearPricing(10.0, {"a": 1.0, "b": 3.0}), 45.0,
                                     lambda b, r: kept_count(b.num_groups, r))
    assert widths == {"a": kept_count(10, ratio), "b": kept_count(20, ratio)}
    assert 10 + widths["a"] + 3 * widths["b"] <= 45
    bigger = {b.name: kept_count(b.num_groups, ratio + 0.05) for b in blocks}
    assert 10 + bigger["a"] + 3 * bigger["b"] > 45


@pytest.mark.parametrize("refit", [True, False])
def test_residual_curve_grows_as_groups_leave(refit):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.relu(torch.randn(500, 24, generator=gen, dtype=torch.float64))
    weight = torch.randn(6, 24, generator=gen, dtype=torch.float64)
    stats = BlockStatistics(24, dtype=torch.float64)
    stats.update(hidden, torch.float64)
    counts, errors = residual_curve(stats, weight, 2, refit=refit, steps=4)
    assert counts[0] == 12 and counts[-1] == 1 and counts == sorted(counts, reverse=True)
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] > errors[0]
    if not refit:
        assert errors[0] == pytest.approx(0.0, abs=1e-9)


def _prune(model, **kwargs):
    pruner = ISpaSPPruner(model, PrunerConfig(show_progress=False, **kwargs))
    return pruner.prune(token_batches()), pruner.report


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("target", ["flops_keep_ratio", "params_keep_ratio"])
def test_targets_are_met_and_reported(allocation, target):
    model = tiny_text_model("bert")
    pruned, report = _prune(model, **{target: 0.6}, allocation=allocation)
    metric = target.removesuffix("_keep_ratio")
    achieved = report.budget["achieved"][metric]
    assert achieved <= 0.6 + 1e-12
    assert report.budget["predicted"] == pytest.approx(report.budget["achieved"], rel=1e-9)
    assert report.budget["allocation"] == allocation and report.budget["target"] == {metric: 0.6}
    widths = {b.name: b.groups_after for b in report.blocks}
    assert widths == report.budget["widths"]
    if allocation == "global":  # within one group of every block: no block could keep one more group
        costs = block_costs(model)
        for name, kept in widths.items():
            if kept < costs.num_groups[name]:
                assert costs.predict(metric, {**widths, name: kept + 1}) / costs.dense[metric] > 0.6
    record = pruned.config.ispasp
    assert record["budget"]["achieved"] == report.budget["achieved"]
    assert record["pruner_config"][target] == 0.6


def test_global_allocation_on_a_decoder_is_deterministic_and_reloads(tmp_path):
    model = tiny_decoder_model("llama")
    first, report = _prune(model, flops_keep_ratio=0.55)
    second, again = _prune(model, flops_keep_ratio=0.55)
    assert report.budget["widths"] == again.budget["widths"]
    assert report.budget["achieved"]["flops"] <= 0.55
    save_pruned(first, tmp_path / "ckpt")
    loaded = load_pruned(tmp_path / "ckpt")
    batch = token_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, first(**batch).logits)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["ispasp"]["budget"]["allocation"] == "global"


def test_infeasible_target_is_a_clear_error_and_leaves_the_model_untouched():
    model = tiny_text_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InfeasibleBudgetError, match="ask for"):
        _prune(model, params_keep_ratio=0.01)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    ({"flops_keep_ratio": 0.5, "params_keep_ratio": 0.5}, "one budget target"),
    ({"allocation": "global"}, "also give flops_keep_ratio"),
    ({"latency_keep_ratio": 0.5, "flops_keep_ratio": 0.5}, "one budget target"),
    ({"flops_keep_ratio": 0.5, "allocation": "best"}, "allocation"),
    ({"flops_keep_ratio": 0.5, "layer_overrides": {0: {"ffn_keep_ratio": 0.5}}}, "drop layer_overrides"),
    ({"flops_keep_ratio": 0.0}, "flops_keep_ratio"),
    ({"params_keep_ratio": 1.5}, "params_keep_ratio"),
])
def test_bad_budget_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrunerConfig(**kwargs)


def _flops_clock():
    """A clock that advances by the FLOPs computed so far: 'latency' becomes FLOPs, deterministically."""
    from hf_ispasp.metrics import flop_counter

    counter = flop_counter(depth=None)
    return counter, lambda: float(counter.get_total_flops())


def test_latency_tables_price_widths_and_are_measured_once(tmp_path):
    from hf_ispasp import latency_budget

    model = tiny_text_model("bert")
    counter, clock = _flops_clock()
    latency_budget._TABLES.clear()
    with counter:
        costs = latency_budget.latency_costs(model, clock=clock, cache_dir=tmp_path, repeats=2)
    dense = {name: n for name, n in costs.num_groups.items()}
    assert costs.total(dense) == pytest.approx(costs.dense)
    assert costs.dense == pytest.approx(count_flops(model, _example(model)))
    # FLOPs are linear in every block's width, so the interpolated tables are exact off the grid too
    for seed in (0, 1):
        widths = _random_widths(model, seed)
        assert costs.total(widths) == pytest.approx(count_flops(_cut(model, widths), _example(model)), rel=1e-6)
    # identical layers share one table, cached in the process and on disk
    assert len(list(tmp_path.glob("*.json"))) == 1
    calls = []

    def counting_clock():
        calls.append(1)
        return float(len(calls))

    latency_budget.latency_costs(model, clock=counting_clock, cache_dir=tmp_path, repeats=2)
    assert len(calls) == 2 * 2  # only the dense model's forward was timed again
    latency_budget._TABLES.clear()
    calls.clear()
    latency_budget.latency_costs(model, clock=counting_clock, cache_dir=tmp_path, repeats=2)
    assert len(calls) == 2 * 2  # read back from disk


def test_latency_target_prunes_to_fast_widths(monkeypatch):
    from hf_ispasp import latency_budget, pruner

    counter, clock = _flops_clock()
    real = latency_budget.latency_costs
    monkeypatch.setattr(pruner, "latency_costs",
                        lambda *args, **kwargs: real(*args, clock=clock, cache_dir="", repeats=2, **kwargs))
    model = tiny_decoder_model("llama", seed=1)
    with counter:
        pruned, report = _prune(model, latency_keep_ratio=0.7)
    assert report.budget["target"] == {"latency": 0.7}
    assert report.budget["predicted"]["latency"] <= 0.7 + 1e-9
    assert report.budget["achieved"]["latency"] > 0 and report.budget["latency"]["pairs"] > 0
    multiple = latency_budget.fast_multiple("cpu")
    for block in report.blocks:
        if block.kind == "ffn" and block.groups_after < block.groups_before:
            assert block.groups_after % multiple == 0


def test_output_energy_is_the_energy_of_the_dense_block_output():
    from hf_ispasp.algorithm import output_energy

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 10, generator=gen, dtype=torch.float64) + 0.2
    weight = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    stats = BlockStatistics(10, dtype=torch.float64)
    stats.update(hidden, torch.float64)
    assert output_energy(stats, weight, bias) == pytest.approx(float((hidden @ weight.T + bias).pow(2).sum()))
    assert output_energy(stats, weight, None) == pytest.approx(float((hidden @ weight.T).pow(2).sum()))


def test_error_curves_normalise_by_the_stream_a_block_writes_into():
    """A block that writes most of the stream is measured against what it writes: scaling its output projection
    by 10 leaves its curve as it was. While the curves were divided by the energy of the layer input alone, a
    decoder's first FFN that writes 10^5 times the energy of the embeddings (as in the LLaMA trained here) looked
    10^5 times costlier than every later block, and the global allocation emptied the later FFNs."""
    from hf_ispasp.budget import error_curves

    def at_half(scale):
        model = tiny_decoder_model("llama")
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(scale)
        config = PrunerConfig(show_progress=False)
        counts, errors = error_curves(model, adapter_for(model), token_batches(), torch.device("cpu"),
                                      config)["layer.0.ffn"]
        return next(e for c, e in zip(counts, errors, strict=True) if c <= counts[0] // 2)

    low, high = at_half(1e3), at_half(1e4)
    assert 0 < low and high == pytest.approx(low, rel=0.05)


def test_post_norm_layers_measure_errors_against_the_layer_input():
    """BERT-family layers normalise every block's output with its input: their curves are not rescaled by what a
    block writes (scaling the FFN's output projection scales its curve with it), unlike a pre-norm decoder's."""
    from hf_ispasp.budget import error_curves

    assert adapter_for(tiny_text_model("bert")).post_norm and not adapter_for(tiny_decoder_model("llama")).post_norm

    def at_half(scale):
        model = tiny_text_model("bert")
        with torch.no_grad():
            model.bert.encoder.layer[0].output.dense.weight.mul_(scale)
            model.bert.encoder.layer[0].output.dense.bias.mul_(scale)
        counts, errors = error_curves(model, adapter_for(model), token_batches(), torch.device("cpu"),
                                      PrunerConfig(show_progress=False))["layer.0.ffn"]
        return next(e for c, e in zip(counts, errors, strict=True) if c <= counts[0] // 2)

    assert at_half(10.0) == pytest.approx(100 * at_half(1.0), rel=0.05)
