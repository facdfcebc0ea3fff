from __future__ import annotations

import pytest

from hf_ispasp import PrunerConfig
from hf_ispasp.config import kept_count


@pytest.mark.parametrize("field", ["ffn_keep_ratio", "head_keep_ratio"])
@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_ratio_out_of_range_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PrunerConfig(**{field: value})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_iterations": 0}, "num_iterations"),
        ({"selection": "best"}, "selection"),
        ({"proxy": "max"}, "proxy"),
        ({"threshold": "x"}, "threshold"),
        ({"round_to": 0}, "round_to"),
        ({"layer_overrides": {0: {"ffn_keep_ratio": 2.0}}}, "layer_overrides"),
        ({"layer_overrides": {0: {"bogus": 0.5}}}, "bogus"),
        ({"layer_overrides": {"a": {}}}, "layer index"),
        ({"activation_cache": "gpu"}, "activation_cache"),
        ({"refit_damping": -1.0}, "refit_damping"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrunerConfig(**kwargs)


def test_json_round_trip_and_unknown_keys(tmp_path, caplog):
    config = PrunerConfig(ffn_keep_ratio=0.3, layer_overrides={1: {"head_keep_ratio": 0.5}}, round_to=8)
    path = tmp_path / "c.json"
    config.to_json_file(path)
    assert PrunerConfig.from_json_file(path) == config
    data = config.to_dict() | {"from_the_future": 1}
    with caplog.at_level("WARNING"):
        assert PrunerConfig.from_dict(data) == config
    assert "from_the_future" in caplog.text


def test_keep_ratio_with_overrides():
    config = PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.75, layer_overrides={2: {"ffn_keep_ratio": 0.9}})
    assert config.keep_ratio(2, "ffn") == 0.9
    assert config.keep_ratio(2, "heads") == 0.75
    assert config.keep_ratio(0, "ffn") == 0.5


@pytest.mark.parametrize(
    "groups,ratio,round_to,expected",
    [(37, 0.5, 1, 18), (12, 0.01, 1, 1), (1536, 0.5, 8, 768), (1536, 0.3, 64, 448), (37, 0.3, 8, 8), (5, 0.5, 8, 2),
     (37, 1.0, 8, 37)],
)
def test_kept_count(groups, ratio, round_to, expected):
    assert kept_count(groups, ratio, round_to) == expected


def test_gqa_groups_choice():
    assert PrunerConfig().gqa_groups == "kv"
    config = PrunerConfig(gqa_groups="query")
    assert PrunerConfig.from_dict(config.to_dict()).gqa_groups == "query"
    with pytest.raises(ValueError, match="gqa_groups='heads'.*'kv', 'query'"):
        PrunerConfig(gqa_groups="heads")


@pytest.mark.parametrize("selection", ["wanda_sp", "flap", "llm_pruner"])
def test_llm_baselines_are_selections(selection):
    assert PrunerConfig(selection=selection).selection == selection


@pytest.mark.parametrize(
    "groups,ratio,round_to,partitions,expected",
    [(8, 0.5, 1, 2, 4), (8, 0.3, 1, 2, 2), (8, 0.01, 1, 4, 4), (32, 0.4, 2, 4, 16), (8, 1.0, 1, 2, 8)],
)
def test_kept_count_with_partitions(groups, ratio, round_to, partitions, expected):
    keep = kept_count(groups, ratio, round_to, partitions)
    assert keep == expected and keep % partitions == 0
    assert keep == partitions * kept_count(groups // partitions, ratio, round_to)
    with pytest.raises(ValueError, match="equal runs"):
        kept_count(9, 0.5, 1, 2)
