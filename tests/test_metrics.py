"""Latency comparison under load, with a fake clock: nothing here is timed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from hf_ispasp.metrics import LatencyComparison, latency_ratio, measure_latency


class FakeClock:
    """A clock that only moves when a fake model runs; ``load(call)`` scales the cost of the n-th forward call."""

    def __init__(self, load: Callable[[int], float] = lambda call: 1.0) -> None:
        self.now = 0.0
        self.calls = 0
        self.load = load
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def run(self, name: str, cost: float) -> None:
        self.now += cost * self.load(self.calls)
        self.calls += 1
        self.log.append(name)


class FakeModel(nn.Module):
    def __init__(self, clock: FakeClock, name: str, cost: float) -> None:
        super().__init__()
        self.clock, self.name, self.cost = clock, name, cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.run(self.name, self.cost)
        return x


def _pair(load: Callable[[int], float] = lambda call: 1.0, dense: float = 2.0, pruned: float = 1.0):
    clock = FakeClock(load)
    return clock, FakeModel(clock, "dense", dense), FakeModel(clock, "pruned", pruned)


def test_steady_two_fold_difference_is_two():
    clock, dense, pruned = _pair()
    result = latency_ratio(dense, pruned, torch.zeros(1), repeats=5, rounds=2, warmup=1, clock=clock)
    assert isinstance(result, LatencyComparison)
    assert result.pairs == 10
    assert (result.baseline_s, result.candidate_s) == (2.0, 1.0)
    assert result.speedup == result.speedup_q25 == result.speedup_q75 == result.speedup_min == 2.0
    base, cand, speedup = result  # the tuple callers used to unpack
    assert (base, cand, speedup) == (2.0, 1.0, 2.0) and result[2] == 2.0
    assert result.to_dict()["speedup_q75"] == 2.0


def test_calls_interleave_and_alternate_which_model_goes_first():
    clock, dense, pruned = _pair()
    latency_ratio(dense, pruned, torch.zeros(1), repeats=3, rounds=1, warmup=1, clock=clock)
    timed = clock.log[2:]  # after one warm-up call of each
    assert timed == ["dense", "pruned", "pruned", "dense", "dense", "pruned"]


def test_a_burst_of_load_does_not_move_the_median_ratio():
    # 8x load on 25 consecutive calls out of 60 (the pruned model's whole share, had the two been timed one
    # after the other): it loads both calls of the 12 pairs inside it and one call of the 2 pairs at its edges.
    burst = range(21, 46)
    clock, dense, pruned = _pair(load=lambda call: 8.0 if call in burst else 1.0)
    result = latency_ratio(dense, pruned, torch.zeros(1), repeats=30, rounds=1, warmup=0, clock=clock)
    assert result.speedup == 2.0
    assert result.speedup_q25 == result.speedup_q75 == 2.0
    assert result.speedup_min < 2.0  # the edge pairs show up in the range, not in the median
    assert (result.baseline_s, result.candidate_s) == (2.0, 1.0)


def test_load_on_one_side_of_a_few_pairs_stays_outside_the_median():
    # Every 7th call runs 20x slower, hitting dense in some pairs and pruned in others.
    clock, dense, pruned = _pair(load=lambda call: 20.0 if call % 7 == 3 else 1.0, dense=3.0, pruned=2.0)
    result = latency_ratio(dense, pruned, torch.zeros(1), repeats=20, rounds=2, warmup=2, clock=clock)
    assert result.speedup == pytest.approx(1.5)
    assert result.speedup_q25 == pytest.approx(1.5) and result.speedup_q75 == pytest.approx(1.5)
    assert result.speedup_min < 1 < 10 < result.speedup_max


def test_spread_is_the_interquartile_range_of_the_per_pair_ratios():
    # Dense always costs 1; pruned costs 1 / r in its n-th call, r = 1.0, 1.5, 2.0, 2.5, 3.0 (no warm-up).
    ratios = [1.0, 1.5, 2.0, 2.5, 3.0]
    clock = FakeClock()

    class Scheduled(FakeModel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.clock.run(self.name, 1.0 / ratios[self.clock.log.count(self.name)])
            return x

    dense, pruned = FakeModel(clock, "dense", 1.0), Scheduled(clock, "pruned", 0.0)
    result = latency_ratio(dense, pruned, torch.zeros(1), repeats=5, rounds=1, warmup=0, clock=clock)
    assert result.speedup == pytest.approx(2.0)
    assert result.speedup_q25 == pytest.approx(1.5) and result.speedup_q75 == pytest.approx(2.5)
    assert (result.speedup_min, result.speedup_max) == pytest.approx((1.0, 3.0))
    assert result.candidate_s == pytest.approx(0.5)  # median of the pruned calls: 1 / 2
    # the ratio of the medians lies in the range of the per-pair ratios
    assert result.speedup_min <= result.baseline_s / result.candidate_s <= result.speedup_max


def test_training_flags_are_restored_and_measure_latency_takes_a_clock():
    clock, dense, pruned = _pair()
    dense.train()
    pruned.eval()
    latency_ratio(dense, pruned, torch.zeros(1), repeats=2, rounds=1, warmup=0, clock=clock)
    assert dense.training and not pruned.training
    assert measure_latency(dense, torch.zeros(1), repeats=4, warmup=1, clock=clock) == 2.0


def test_demo_prints_the_median_speedup_with_its_spread():
    from hf_ispasp.cli import _speedup_cell

    result = LatencyComparison(0.0144, 0.01, 1.44, 1.40, 1.47, 1.1, 1.9, 60)
    assert _speedup_cell(result) == "1.44x faster (IQR 1.40-1.47)"


def test_timing_waits_for_queued_accelerator_work(monkeypatch):
    """On a GPU a forward call returns once its kernels are queued: every timed call is bracketed by a
    synchronisation, or the clock measures the launches (a latency table on a GPU would price nothing)."""
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: events.append("sync"))

    def clock() -> float:
        events.append("clock")
        return float(len(events))

    def model(x):
        events.append("call")
        return x

    measure_latency(model, torch.zeros(1), repeats=2, warmup=0, clock=clock)
    assert events == ["sync", "clock", "call", "sync", "clock"] * 2
