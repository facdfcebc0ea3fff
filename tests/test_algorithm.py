"""i-SpaSP on statistics agrees with brute force on explicit hidden representations."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_ispasp.algorithm import (
    BlockStatistics,
    group_columns,
    refit_projection,
    residual_after_refit,
    select_groups,
)


def _stats(h: torch.Tensor, chunks: int = 3) -> BlockStatistics:
    stats = BlockStatistics(h.shape[1])
    for part in h.chunk(chunks):
        stats.update(part, torch.float64)
    return stats


def _planted(n_tokens: int = 400, width: int = 24, active: int = 6, out: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n_tokens, width, generator=gen, dtype=torch.float64))
    h[:, active:] *= 1e-3  # only `active` units carry signal
    perm = torch.randperm(width, generator=gen)
    h = h[:, perm]
    w = torch.randn(out, width, generator=gen, dtype=torch.float64)
    return h, w, torch.sort(torch.argsort(perm)[:active]).values


def test_residual_matches_explicit_computation():
    h, w, _ = _planted()
    stats = _stats(h)
    result = select_groups(stats, w, 1, 8, proxy="sum", threshold="sum")
    dropped = torch.ones(h.shape[1], dtype=torch.bool)
    dropped[result.groups] = False
    explicit = ((h[:, dropped] @ w[:, dropped].T) ** 2).sum()
    torch.testing.assert_close(torch.tensor(result.residual, dtype=torch.float64), explicit)
    assert 0 < result.relative_residual < 1


@pytest.mark.parametrize(
    "proxy,threshold", list(itertools.product(["sum", "l2"], ["sum", "l2", "output", "residual"]))
)
def test_ispasp_recovers_planted_support(proxy, threshold):
    h, w, active = _planted()
    result = select_groups(_stats(h), w, 1, len(active), proxy=proxy, threshold=threshold)
    assert torch.equal(result.groups, active)
    assert result.relative_residual < 1e-4


def test_ispasp_beats_random_on_planted_problem():
    h, w, active = _planted(active=8)
    stats = _stats(h)
    ours = select_groups(stats, w, 1, 6, proxy="l2", threshold="residual")
    gen = torch.Generator().manual_seed(0)
    rand = [select_groups(stats, w, 1, 6, selection="random", generator=gen).residual for _ in range(20)]
    assert ours.residual < min(rand)


def test_l2_proxy_is_the_gradient_norm():
    from hf_ispasp.algorithm import _Problem

    h, w, _ = _planted(width=12)
    problem = _Problem(_stats(h), w, 3)
    support = torch.tensor([1])
    dropped = torch.ones(12, dtype=torch.bool)
    dropped[group_columns(support, 3)] = False
    grad = (h[:, dropped] @ w[:, dropped].T) @ w  # V W, (tokens x width)
    expected = grad.pow(2).sum(0).reshape(4, 3).sum(-1).sqrt()
    torch.testing.assert_close(problem.proxy(support, "l2"), expected)
    expected_sum = grad.sum(0).reshape(4, 3).norm(dim=-1)
    torch.testing.assert_close(problem.proxy(support, "sum"), expected_sum)


def test_residual_threshold_is_exact_for_small_problem():
    """With a merged support of everything, backward elimination never does worse than the static scores."""
    h, w, _ = _planted(width=10, active=10)
    stats = _stats(h)
    best = min(
        select_groups(stats, w, 1, 4, proxy="l2", threshold=t).residual for t in ("sum", "l2", "output")
    )
    ours = select_groups(stats, w, 1, 4, proxy="l2", threshold="residual").residual
    assert ours <= best * 1.0001


def test_refit_is_least_squares_with_bias():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(300, 8, generator=gen, dtype=torch.float64) + 0.5
    w = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    groups = torch.tensor([0, 2, 5])
    new_w, new_b = refit_projection(_stats(h), w, b, groups, 1, damping=0.0)
    y = h @ w.T + b
    design = torch.cat([h[:, groups], torch.ones(300, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, y).solution
    torch.testing.assert_close(new_w, solution[:-1].T)
    torch.testing.assert_close(new_b, solution[-1])
    after = residual_after_refit(_stats(h), w, b, groups, 1, new_w, new_b)
    explicit = ((y - h[:, groups] @ new_w.T - new_b) ** 2).sum()
    torch.testing.assert_close(torch.tensor(after, dtype=torch.float64), explicit)
    plain = ((h[:, [1, 3, 4, 6, 7]] @ w[:, [1, 3, 4, 6, 7]].T) ** 2).sum()
    assert after < plain


def test_statistics_are_streamed_and_order_robust():
    h = torch.randn(100, 7, dtype=torch.float64)
    one, many = _stats(h, 1), _stats(h, 10)
    torch.testing.assert_close(one.gram, many.gram)
    torch.testing.assert_close(one.total, many.total)
    assert float(one.count) == float(many.count) == 100


def test_keep_all_and_bad_requests():
    h, w, _ = _planted()
    stats = _stats(h)
    assert torch.equal(select_groups(stats, w, 1, 24).groups, torch.arange(24))
    with pytest.raises(ValueError, match="cannot keep"):
        select_groups(stats, w, 1, 0)
    with pytest.raises(ValueError, match="multiple of the group size"):
        select_groups(stats, w, 5, 2)
    with pytest.raises(ValueError, match="unknown selection"):
        select_groups(stats, w, 1, 3, selection="nope")


@pytest.mark.parametrize("group_size", [1, 3])
def test_refit_threshold_matches_brute_force(group_size):
    """The OBS elimination reports the true re-fit residual and lands among the best subsets."""
    gen = torch.Generator().manual_seed(5)
    mix = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    h = torch.randn(500, 12, generator=gen, dtype=torch.float64) @ mix + 0.3  # correlated columns
    w = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    b = torch.zeros(6, dtype=torch.float64)
    stats = _stats(h)
    groups = 12 // group_size
    keep = groups // 2
    result = select_groups(stats, w, group_size, keep, proxy="l2", threshold="refit", damping=0.0)

    def refit_residual(kept):
        new_w, new_b = refit_projection(stats, w, b, kept, group_size, damping=0.0)
        return residual_after_refit(stats, w, b, kept, group_size, new_w, new_b)

    ours = refit_residual(result.groups)
    torch.testing.assert_close(torch.tensor(result.residual_history[-1]), torch.tensor(ours), rtol=1e-6, atol=1e-6)
    every = [refit_residual(torch.tensor(c)) for c in itertools.combinations(range(groups), keep)]
    assert ours <= sorted(every)[len(every) // 2]  # greedy, not exhaustive: in the better half
    static = select_groups(stats, w, group_size, keep, proxy="l2", threshold="output")
    assert ours <= refit_residual(static.groups) + 1e-9
