"""i-SpaSP on statistics agrees with brute force on explicit hidden representations."""

from __future__ import annotations

import itertools
import logging

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


# Partition constraint (grouped-query attention pruned by query heads: equal kept count per KV head) -------------
_RULES = [
    ("random", {}), ("weight_magnitude", {}), ("taylor", {}), ("llm_pruner", {}), ("activation", {}),
    ("output_energy", {}), ("wanda_sp", {}), ("flap", {}),
    *[("ispasp", {"proxy": proxy, "threshold": t}) for proxy in ("sum", "l2")
      for t in ("sum", "l2", "output", "residual", "refit")],
]


def _runs(groups: torch.Tensor, num_groups: int, partitions: int) -> list[int]:
    return torch.bincount(groups // (num_groups // partitions), minlength=partitions).tolist()


def _skewed(width: int = 24, group_size: int = 2, seed: int = 7):
    """A problem whose unconstrained choice is lopsided: the strong groups all sit in the first run."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(300, width, generator=gen, dtype=torch.float64)
    h[:, : width // 2] *= 5.0
    w = torch.randn(6, width, generator=gen, dtype=torch.float64)
    scores = torch.rand(width // group_size, generator=gen, dtype=torch.float64)
    scores[: width // group_size // 2] += 10.0
    return h, w, scores


@pytest.mark.parametrize("selection,kwargs", _RULES)
@pytest.mark.parametrize("partitions", [2, 3])
def test_partitions_keep_equal_counts_per_run(selection, kwargs, partitions):
    h, w, scores = _skewed()
    num_groups, keep = 12, 2 * partitions
    gen = torch.Generator().manual_seed(0)
    result = select_groups(_stats(h), w, 2, keep, selection=selection, weight_scores=scores, generator=gen,
                           partitions=partitions, **kwargs)
    assert len(result.groups) == keep and len(set(result.groups.tolist())) == keep
    assert _runs(result.groups, num_groups, partitions) == [keep // partitions] * partitions
    unconstrained = select_groups(_stats(h), w, 2, keep, selection=selection, weight_scores=scores,
                                  generator=torch.Generator().manual_seed(0), **kwargs)
    if selection != "random":  # the test problem is lopsided: without the constraint the first run wins
        assert _runs(unconstrained.groups, num_groups, partitions) != [keep // partitions] * partitions


def _balanced(partitions: int = 2, per_run: int = 2, run_size: int = 6, seed: int = 3):
    """Planted support with ``per_run`` active units in every run: the unconstrained choice is already balanced."""
    gen = torch.Generator().manual_seed(seed)
    width = partitions * run_size
    h = torch.relu(torch.randn(400, width, generator=gen, dtype=torch.float64)) * 1e-3
    active = torch.cat([torch.randperm(run_size, generator=gen)[:per_run] + r * run_size for r in range(partitions)])
    h[:, active] = torch.relu(torch.randn(400, len(active), generator=gen, dtype=torch.float64)) + 0.5
    w = torch.randn(5, width, generator=gen, dtype=torch.float64)
    return h, w, torch.sort(active).values


@pytest.mark.parametrize("selection,kwargs", [r for r in _RULES if r[0] != "random"])
def test_partitions_change_nothing_when_the_choice_is_balanced(selection, kwargs):
    h, w, active = _balanced()
    scores = torch.full((12,), 0.1, dtype=torch.float64)
    scores[active] = torch.arange(1.0, 5.0, dtype=torch.float64)
    stats = _stats(h)
    free = select_groups(stats, w, 1, 4, selection=selection, weight_scores=scores, **kwargs)
    assert torch.equal(free.groups, active)  # the test premise: the unconstrained choice is balanced
    constrained = select_groups(stats, w, 1, 4, selection=selection, weight_scores=scores, partitions=2, **kwargs)
    assert torch.equal(constrained.groups, free.groups)
    assert constrained.residual == pytest.approx(free.residual, rel=1e-12, abs=1e-12)


def test_partitions_rank_inside_each_run():
    """Top-k per run: each run keeps its own best groups even when another run's are all stronger."""
    h, w, _ = _planted(width=8, active=8)
    scores = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.4, 0.1, 0.3, 0.2], dtype=torch.float64)
    kept = select_groups(_stats(h), w, 1, 4, selection="weight_magnitude", weight_scores=scores, partitions=2).groups
    assert kept.tolist() == [0, 1, 4, 6]
    gen = torch.Generator().manual_seed(0)
    draws = {tuple(select_groups(_stats(h), w, 1, 2, selection="random", generator=gen, partitions=2).groups.tolist())
             for _ in range(30)}
    assert all(a < 4 <= b for a, b in draws) and len(draws) > 4  # one per run, several different draws


@pytest.mark.parametrize(
    "width,keep,partitions,match",
    [(12, 4, 5, "does not divide"), (12, 3, 2, "multiple of 2"), (12, 4, 0, "integer >= 1")],
)
def test_invalid_partitions_are_clear_errors(width, keep, partitions, match):
    h, w, _ = _planted(width=width, active=4)
    with pytest.raises(ValueError, match=match):
        select_groups(_stats(h), w, 1, keep, partitions=partitions)


@pytest.mark.parametrize(("group_size", "partitions", "width", "factored", "given"),
                         [(1, 1, 48, False, True), (3, 1, 48, False, True), (1, 2, 48, False, True),
                          (2, 4, 48, False, True), (1, 1, 700, False, True), (1, 1, 48, True, True),
                          (1, 2, 48, True, True), (1, 1, 700, True, True), (1, 1, 48, True, False),
                          (1, 2, 48, True, False), (1, 1, 700, True, False)])
def test_device_elimination_equals_host_elimination(group_size, partitions, width, factored, given, monkeypatch):
    """The accelerator loop of the exact-residual threshold (run here on CPU tensors) drops the same groups in the
    same order as the host loop, ties included, and reports the same residual path (width 700: the path is
    rebuilt from more drops than one block of rows). ``factored``: the accelerator's energy read from ``G`` and
    ``W^T W`` (forced on the CPU), never formed; ``given``: the caller's ``W^T W``, else its rows formed from ``W``
    as the steps need them."""
    from hf_ispasp import algorithm as alg
    from hf_ispasp.algorithm import _ROWS, _Problem

    monkeypatch.setattr(alg, "_factors_energy", lambda device: factored)
    gen = torch.Generator().manual_seed(group_size * 10 + partitions)
    h = torch.randn(200, width, generator=gen, dtype=torch.float64)
    h[:, 7] = h[:, 3]  # duplicated columns: exact ties the lower index must win
    w = torch.randn(6, width, generator=gen, dtype=torch.float64)
    stats = _stats(h)
    alg._mirror_lower(stats.gram)  # exactly symmetric, as an accelerator's panel sums are
    problem = _Problem(stats, w, group_size, alg._symmetric_gram(w) if given else None)
    assert (problem.factors is not None) is factored
    n = problem.num_groups
    merged = torch.sort(torch.randperm(n, generator=gen)[: n - n // (2 * partitions) * partitions // 2]).values
    merged = torch.arange(n) if partitions > 1 else merged
    keep = partitions * max(1, n // (3 * partitions))
    host_path: list[tuple[int, float]] = []
    device_path: list[tuple[int, float]] = []
    device = problem._eliminate_on_device(merged, keep, partitions, device_path)
    assert problem.energy_formed is not factored  # the factored loop never formed E
    host = problem.residual_threshold(merged, keep, partitions, host_path)
    assert width < 100 or len(device_path) > _ROWS + 1  # more drops than one block of rows
    assert torch.equal(torch.sort(host).values, device)
    assert [c for c, _ in host_path] == [c for c, _ in device_path]
    torch.testing.assert_close(torch.tensor([r for _, r in device_path]), torch.tensor([r for _, r in host_path]),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("width", [512, 700, 1030])
def test_symmetric_gram_equals_the_full_product(width):
    from hf_ispasp.algorithm import _gram, _symmetric_gram

    rows = torch.randn(300, width, generator=torch.Generator().manual_seed(width))
    gram = _symmetric_gram(rows)
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
    assert torch.equal(_gram(rows), gram)  # wide enough: the CPU takes the blocked product


@pytest.mark.parametrize("width", [40, 300, 700])  # one Cholesky leaf; one split; splits within splits
def test_spd_inverse_and_its_fallback(width):
    from hf_ispasp.algorithm import _spd_inverse

    a = torch.randn(width, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spd = a @ a.T + 0.1 * torch.eye(width, dtype=torch.float64)
    held = [spd.clone()]
    inverse = _spd_inverse(held, rebuild=lambda: pytest.fail("a positive definite matrix needs no rebuild"))
    assert held == []  # the caller's only reference is taken: the inverse is formed in its memory
    assert torch.equal(inverse, inverse.T)
    torch.testing.assert_close(inverse, torch.cholesky_inverse(torch.linalg.cholesky(spd)), rtol=1e-9, atol=1e-12)
    indefinite = spd - 5 * torch.eye(width, dtype=torch.float64) * float(torch.linalg.eigvalsh(spd).max())
    rebuilt = []
    inverse = _spd_inverse([indefinite.clone()], rebuild=lambda: rebuilt.append(1) or indefinite.clone())
    assert rebuilt == [1]
    torch.testing.assert_close(inverse, torch.linalg.inv(indefinite))


def test_a_given_weight_gram_changes_nothing():
    from hf_ispasp.algorithm import validate_refit, weight_gram

    h, w, _ = _planted(n_tokens=600, width=24)
    stats = BlockStatistics(24)
    for i, part in enumerate(h.chunk(4)):
        stats.update(part, torch.float64, fold=i % 2)
    gram_w = weight_gram(w, stats)
    torch.testing.assert_close(gram_w, w.T @ w)
    for threshold in ("residual", "refit"):
        plain = select_groups(stats, w, 1, 6, threshold=threshold)
        given = select_groups(stats, w, 1, 6, threshold=threshold, weight_gram=gram_w)
        assert torch.equal(plain.groups, given.groups) and plain.residual == given.residual
    bias = torch.zeros(w.shape[0], dtype=torch.float64)
    assert validate_refit(stats, w, bias, plain.groups, 1) == validate_refit(stats, w, bias, plain.groups, 1,
                                                                             weight_gram=gram_w)


def test_no_proxy_when_every_group_is_a_candidate(monkeypatch):
    """Keeping half or more, the candidate set is every group: the proxy would be computed for nothing."""
    from hf_ispasp import algorithm

    h, w, _ = _planted()
    stats = _stats(h)
    expected = algorithm._Problem(stats, w, 1).residual_threshold(torch.arange(24), 12)

    def fail(*args, **kwargs):
        raise AssertionError("proxy computed although every group is a candidate")

    monkeypatch.setattr(algorithm._Problem, "proxy", fail)
    result = select_groups(stats, w, 1, 12, threshold="residual")
    assert torch.equal(result.groups, torch.sort(expected).values.cpu())
    with pytest.raises(AssertionError, match="proxy computed"):
        select_groups(stats, w, 1, 5, threshold="residual")


def test_selection_workspace_is_a_few_width_squared_matrices():
    """The default selection path of one block (exact-residual threshold, both held-out validations, the re-fit
    threshold, the final re-fit) holds at most five width x width matrices at once beyond the block's
    statistics (it held ten before each was freed as soon as it was used); at LLaMA-7B FFN width one such
    float64 matrix is 0.9 GiB."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from selection_profile import _statistics, block_phases, peak_allocated

    cpu = torch.device("cpu")
    width = 512
    stats, weight, bias = _statistics(64, width, 4 * width, cpu)
    (_, chosen), peak = peak_allocated(lambda: block_phases(stats, weight, bias, 1, width // 2, torch.float64, cpu),
                                       cpu)
    assert chosen["ridge"] is not None  # the whole path ran: a re-fit was validated and installed
    assert 0 < peak <= 5 * width * width * 8


def test_on_an_accelerator_the_selection_forms_no_weight_gram(monkeypatch):
    """On an accelerator's paths (forced on the CPU) the default selection of a block of neurons never forms
    ``W^T W``: the elimination and the validation read the rows they need from ``W``. The selection holds one
    width x width matrix less at its peak and keeps the same groups with the same ridge."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from selection_profile import _statistics, block_phases, peak_allocated

    from hf_ispasp import algorithm as alg

    cpu = torch.device("cpu")
    width = 512
    stats, weight, bias = _statistics(64, width, 4 * width, cpu)
    alg._mirror_lower(stats.gram)  # exactly symmetric, as an accelerator's panel sums are
    results = {}
    host_loop, real = alg._Problem.residual_threshold, alg._weight_gram
    for accelerator in (False, True):
        monkeypatch.setattr(alg, "_factors_energy", lambda device, accelerator=accelerator: accelerator)
        monkeypatch.setattr(alg, "_mirrors_weight_gram", lambda device, accelerator=accelerator: accelerator)
        monkeypatch.setattr(alg._Problem, "residual_threshold", host_loop if not accelerator else
                            lambda self, merged, keep, partitions=1, path=None:
                            self._eliminate_on_device(merged, keep, partitions, path))
        formed = []
        monkeypatch.setattr(alg, "_weight_gram", lambda w, formed=formed: formed.append(w.shape) or real(w))
        results[accelerator] = (*peak_allocated(
            lambda: block_phases(stats, weight, bias, 1, width // 2, torch.float64, cpu), cpu), formed)
    ((_, on_cpu), cpu_peak, cpu_formed), ((_, on_device), device_peak, device_formed) = results[False], results[True]
    assert cpu_formed and not device_formed
    assert on_device["kept_digest"] == on_cpu["kept_digest"] and on_device["ridge"] == on_cpu["ridge"] is not None
    assert 0 < device_peak <= cpu_peak - 0.9 * width * width * 8
    # above the size where a step's read of W costs more than W^T W's memory is worth, it is formed, once
    monkeypatch.setattr(alg, "_ON_DEMAND_WEIGHT_BYTES", weight.numel() * 8 - 1)
    formed = []
    monkeypatch.setattr(alg, "_weight_gram", lambda w: formed.append(w.shape) or real(w))
    _, large = block_phases(stats, weight, bias, 1, width // 2, torch.float64, cpu)
    assert formed
    assert large["kept_digest"] == on_cpu["kept_digest"] and large["ridge"] == on_cpu["ridge"]


def test_statistics_halves_and_moments_take_no_extra_copies():
    gen = torch.Generator().manual_seed(0)
    stats = BlockStatistics(8)
    for i in range(6):
        stats.update(torch.randn(5, 8, generator=gen, dtype=torch.float64) + 1.0, torch.float64, fold=i % 2)
    first, second = stats.halves()
    assert first.gram.data_ptr() == stats.fold_gram.data_ptr()  # fold 0 is read where it is summed
    assert first.fold_gram.stride() == (0, 0) and float(first.fold_gram.abs().sum()) == 0.0  # zero, no memory
    assert first.halves() is None and second.halves() is None
    with pytest.raises(ValueError, match="halves"):  # adding to fold 0 would change the statistics it came from
        first.update(torch.ones(2, 8, dtype=torch.float64), torch.float64, fold=0)
    torch.testing.assert_close(second.gram, stats.gram - stats.fold_gram, rtol=0, atol=0)
    from hf_ispasp.algorithm import _moments

    n = float(stats.count)
    mean, cov = _moments(stats, centered=True)
    assert torch.equal(cov, stats.gram / n - torch.outer(mean, mean))  # the in-place rows: the same numbers
    assert torch.equal(_moments(stats, centered=False)[1], stats.gram / n)


@pytest.mark.parametrize("width", [600, 1030])
def test_panel_sums_equal_whole_gram_sums_bit_for_bit(width):
    """CPU blocks of 512+ columns sum only the lower Gram blocks per batch and mirror once (``panels``): the same
    sums, fold sums and halves as adding whole symmetric Gram matrices, and anything that reads them finishes
    them first."""
    gen = torch.Generator().manual_seed(0)
    whole, panels = BlockStatistics(width), BlockStatistics(width, panels=True)
    for i in range(5):
        rows = torch.randn(37 + i, width, generator=gen) * torch.rand(width, generator=gen) + 0.3
        for stats in (whole, panels):
            stats.update(rows, fold=i % 2)
    assert not torch.equal(panels.gram, panels.gram.T)  # only the lower blocks so far
    halves = panels.halves()  # reads the sums: finishes them
    for name in BlockStatistics._SHAPES:
        assert torch.equal(getattr(panels, name), getattr(whole, name)), name
    assert torch.equal(panels.gram, panels.gram.T)
    for ours, theirs in zip(halves, whole.halves(), strict=True):
        assert torch.equal(ours.gram, theirs.gram)
    extra = torch.randn(3, width, generator=gen)
    for stats in (whole, panels):  # more rows after finishing: still exact
        stats.update(extra, fold=0)
    for ours, theirs in zip(panels.tensors(), whole.tensors(), strict=True):
        assert torch.equal(ours, theirs)
    again = BlockStatistics(width, panels=True)
    again.update(extra, fold=1)
    assert torch.equal(again.to().gram, again.gram.T)  # to() finishes too


@pytest.mark.parametrize("half", [False, True])
def test_accelerator_panel_sums_agree_with_whole_sums(monkeypatch, half):
    """An accelerator's wide blocks (``_DEVICE_PANEL_WIDTH``) add 512-column lower panels per batch, without
    deferring rows, half-precision rows through float32-result products: the sums agree with whole Gram sums to
    float32 rounding and are exactly symmetric once read. Run on the CPU with the accelerator's choices forced."""
    import hf_ispasp.algorithm as algorithm

    width = algorithm._DEVICE_PANEL_WIDTH + 52
    monkeypatch.setattr(algorithm, "_panel_block",
                        lambda rows: algorithm._DEVICE_GRAM_BLOCK if rows.shape[1] >= width else None)
    monkeypatch.setattr(algorithm, "_defers_rows", lambda rows: False)
    products = []
    if half:
        real_mm = torch.mm

        def mm(a, b, out_dtype=None):  # what CUDA's out_dtype product computes: exact products, float32 sums
            products.append(out_dtype)
            return real_mm(a.float(), b.float()) if out_dtype is not None else real_mm(a, b)

        monkeypatch.setattr(algorithm, "_half_product", lambda rows, dtype: rows.dtype == torch.bfloat16)
        monkeypatch.setattr(torch, "mm", mm)
    gen = torch.Generator().manual_seed(2)
    whole = BlockStatistics(width)
    panels = BlockStatistics(width, panels=True, deferred_rows=64)
    for i in range(4):
        rows = torch.randn(40 + i, width, generator=gen) + 0.1
        if half:
            rows = rows.to(torch.bfloat16)
        panels.update(rows, fold=i % 2)
        whole.update(rows.float(), fold=i % 2)
        assert not panels._pending  # nothing is deferred off the CPU's path
    assert not torch.equal(panels.gram, panels.gram.T)  # lower panels only, until read
    assert len(products) == (4 * -(-width // algorithm._DEVICE_GRAM_BLOCK) if half else 0)
    assert all(dtype == torch.float32 for dtype in products)
    halves = panels.halves()
    assert torch.equal(panels.gram, panels.gram.T) and torch.equal(panels.fold_gram, panels.fold_gram.T)
    for name in ("count", "total", "fold_count", "fold_total"):
        torch.testing.assert_close(getattr(panels, name), getattr(whole, name), rtol=1e-6, atol=1e-4)
    for name in ("gram", "fold_gram"):
        torch.testing.assert_close(getattr(panels, name), getattr(whole, name), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(halves[1].gram, whole.halves()[1].gram, rtol=1e-6, atol=1e-3)


def test_deferred_rows_multiply_whole_buffers():
    """``deferred_rows``: a fold's rows are multiplied a full buffer at a time (the fold sums are exactly those of
    adding 64-row chunks), the rest when the sums are first read; counts and column sums are untouched, the Gram
    sums agree with per-batch products to float32 rounding, and the buffers are freed."""
    gen = torch.Generator().manual_seed(1)
    width, size = 600, 64
    batches = [torch.randn(37 + i, width, generator=gen) + 0.2 for i in range(7)]
    deferred = BlockStatistics(width, panels=True, deferred_rows=size)
    per_batch = BlockStatistics(width, panels=True)
    for i, rows in enumerate(batches):
        for stats in (deferred, per_batch):
            stats.update(rows, fold=i % 2)
    assert float(deferred.gram.abs().sum()) > 0  # full buffers were multiplied already
    chunks = BlockStatistics(width, panels=True)
    fold0 = torch.cat(batches[0::2])
    for start in range(0, len(fold0), size):  # what the fold-0 buffer saw, a buffer at a time
        chunks.update(fold0[start : start + size], fold=0)
    halves = deferred.halves()
    assert not deferred._pending
    assert torch.equal(deferred.fold_gram, chunks.to().fold_gram)
    for name in ("count", "total", "fold_count", "fold_total"):
        assert torch.equal(getattr(deferred, name), getattr(per_batch, name)), name
    torch.testing.assert_close(deferred.gram, per_batch.to().gram, rtol=1e-6, atol=1e-3)
    assert torch.equal(deferred.gram, deferred.gram.T)
    torch.testing.assert_close(halves[1].gram, per_batch.halves()[1].gram, rtol=1e-6, atol=1e-3)
    deferred.update(batches[0][:5], fold=1)  # more rows after reading: buffered again, added when read
    assert torch.equal(deferred.tensors()[0], per_batch.count + 5)
    torch.testing.assert_close(deferred.gram, per_batch.gram + batches[0][:5].double().T @ batches[0][:5].double(),
                               rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("with_bias", [True, False])
def test_refit_with_residual_equals_the_two_steps(with_bias):
    """The final re-fit (no carried coefficients) equals refit_projection and residual_after_refit to rounding."""
    from hf_ispasp.algorithm import refit_with_residual

    h, w, active = _planted(width=32, out=12)
    b = torch.randn(12, dtype=torch.float64) if with_bias else None
    stats = _stats(h)
    for anchored in (False, True):
        fitted = refit_projection(stats, w, b, active, 1, 1e-2, anchored)
        expected = residual_after_refit(stats, w, b, active, 1, *fitted)
        new_w, new_b, residual = refit_with_residual(stats, w, b, active, 1, 1e-2, anchored)
        # one product M W^T and a Cholesky solve instead of an LU solve and a residual product: equal to rounding
        torch.testing.assert_close(new_w, fitted[0], rtol=1e-10, atol=1e-12)
        assert residual == pytest.approx(expected, rel=1e-9) and expected > 0
        assert (new_b is None) == (fitted[1] is None)
        if new_b is not None:
            torch.testing.assert_close(new_b, fitted[1], rtol=1e-10, atol=1e-12)


def test_all_finite():
    from hf_ispasp.algorithm import all_finite

    x = torch.randn(64, 48)
    assert all_finite(x) and all_finite(x.to(torch.bfloat16))
    for bad in (float("inf"), float("-inf"), float("nan")):
        y = x.clone()
        y[17, 3] = bad
        assert not all_finite(y)
    big = torch.full((8,), 3e38)  # finite entries whose sum overflows: the elementwise check decides
    assert torch.isinf(big.sum()) and all_finite(big)
    mixed = torch.tensor([float("inf"), float("-inf")])  # the sum is NaN, not inf
    assert not all_finite(mixed)
    # several tensors: one read for all of them, the same answer as one check each
    y = x.clone()
    y[0, 0] = float("nan")
    assert all_finite(x, big, x.to(torch.bfloat16)) and all_finite()
    assert not all_finite(x, big, y) and not all_finite(y, x)


def test_host_counts_follow_the_sums():
    """The token counts read once per block are those of the sums, also after they change (a batch, a reduction
    across processes through ``tensors()``)."""
    stats = BlockStatistics(4)
    assert stats.host_counts() == (0.0, 0.0, 0.0) and stats.rows == 0.0
    stats.update(torch.randn(5, 4), fold=0)
    stats.update(torch.randn(3, 4), fold=1)
    assert stats.host_counts() == (8.0, 5.0, 0.0)
    stats.update(torch.randn(2, 4))
    assert stats.host_counts() == (10.0, 5.0, 2.0)
    for tensor in stats.tensors():  # what a sum over two processes does to them
        tensor.mul_(2)
    assert stats.host_counts() == (20.0, 10.0, 4.0) and stats.rows == float(stats.count)
    folded = BlockStatistics(4)
    folded.update(torch.randn(12, 4), fold=0)
    folded.update(torch.randn(18, 4), fold=1)
    first, second = folded.halves(torch.float32)
    assert (first.rows, second.rows) == (12.0, 18.0) and second.rows == float(second.count)


@pytest.mark.parametrize("group_size", [1, 2])
def test_refit_threshold_raises_on_a_singular_downdate(monkeypatch, group_size):
    """The downdates' solver status is read once, after the elimination: where the factored downdates and the
    in-place ones both fail, ``LinAlgError`` is raised (the pruner then selects again in float64)."""
    h, w, _ = _planted()
    stats = _stats(h)
    real = {name: getattr(torch.linalg, name) for name in ("cholesky_ex", "solve_ex")}

    def failing(name):
        def solver(*args, **kwargs):
            solution, info = real[name](*args, **kwargs)
            return solution, torch.ones_like(info)
        return solver

    for name in real:
        monkeypatch.setattr(torch.linalg, name, failing(name))
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        select_groups(stats, w, group_size, 6 // group_size, threshold="refit")
    for name, solver in real.items():
        monkeypatch.setattr(torch.linalg, name, solver)
    assert len(select_groups(stats, w, group_size, 6 // group_size, threshold="refit").groups) == 6 // group_size


@pytest.mark.parametrize("group_size", [1, 2])
def test_an_indefinite_factored_pivot_eliminates_again_in_place(monkeypatch, caplog, group_size):
    """A pivot block that rounding made indefinite fails the factored downdates' Cholesky factorisation; the
    elimination then runs again with the in-place (LU) downdates, from the same inverse, and selects as before."""
    h, w, _ = _planted()
    stats = _stats(h)
    kwargs = dict(threshold="refit", damping=1e-3, anchored=True)
    expected = select_groups(stats, w, group_size, 6 // group_size, **kwargs)
    real = torch.linalg.cholesky_ex
    calls = []

    def indefinite(a, **kw):  # only the downdates' pivot blocks (the inverse's leaves are the whole 24 columns)
        factor, info = real(a, **kw)
        calls.append(a.shape[0])
        return (factor, torch.ones_like(info)) if a.shape[0] < 24 else (factor, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", indefinite)
    with caplog.at_level(logging.DEBUG, logger="hf_ispasp"):
        again = select_groups(stats, w, group_size, 6 // group_size, **kwargs)
    assert any(c < 24 for c in calls) and "eliminating again with in-place downdates" in caplog.text
    assert torch.equal(again.groups, expected.groups)
    torch.testing.assert_close(again.residual_history, expected.residual_history, rtol=1e-9, atol=0)


@pytest.mark.parametrize(("group_size", "partitions", "anchored"), [(1, 1, True), (1, 2, False), (3, 1, True),
                                                                     (3, 2, True)])
def test_factored_downdates_equal_the_in_place_ones(group_size, partitions, anchored):
    """The factored elimination (P_0 less the downdates' factors) and the in-place Schur downdates of P drop the
    same groups and reach the same objective and re-fitted coefficients, up to rounding."""
    from hf_ispasp.algorithm import _moments, _Problem

    gen = torch.Generator().manual_seed(11)
    width = 48
    h = torch.randn(900, width, generator=gen, dtype=torch.float64) @ torch.randn(width, width, generator=gen,
                                                                                 dtype=torch.float64)
    w = torch.randn(10, width, generator=gen, dtype=torch.float64)
    stats = _stats(torch.relu(h))
    problem = _Problem(stats, w, group_size)
    groups = width // group_size
    cov = _moments(stats, True)[1]
    ridge = 1e-2 * float(cov.diagonal().mean())
    inv = torch.linalg.inv(cov + ridge * torch.eye(width, dtype=torch.float64))
    column_sq = w.pow(2).sum(0)
    support = torch.arange(groups)
    results = []
    for factored in (True, False):
        path: list = []
        coef = inv @ (cov @ w.T + ridge * w.T)
        augmented = torch.tensor(0.0, dtype=torch.float64)
        kept, positions, value, failed = problem._eliminate(
            inv.clone(), coef, augmented, support, groups // 4, ridge, column_sq, anchored, partitions, 5, path,
            lambda kept, a: float(a), factored=factored)
        assert not failed and len(kept) == groups // 4
        results.append((kept, coef[group_columns(positions, group_size)], float(value), path))
    (kept_f, coef_f, value_f, path_f), (kept_i, coef_i, value_i, path_i) = results
    assert torch.equal(kept_f, kept_i)
    torch.testing.assert_close(coef_f, coef_i, rtol=1e-9, atol=1e-9)
    assert [k for k, _ in path_f] == [k for k, _ in path_i]
    torch.testing.assert_close(torch.tensor([v for _, v in path_f]), torch.tensor([v for _, v in path_i]),
                               rtol=1e-9, atol=1e-9)
    assert value_f == pytest.approx(value_i, rel=1e-9)


def test_a_given_output_energy_measures_the_refit_residual_on_the_dropped_columns():
    from hf_ispasp.algorithm import output_energy

    h, w, _ = _planted(width=32, out=12)
    stats = _stats(h)
    kwargs = dict(threshold="refit", centered=True, damping=1e-2, anchored=True)
    formed = select_groups(stats, w, 4, 4, **kwargs)  # forms E = G * W^T W for its residual
    full = output_energy(stats, w, None)
    given = select_groups(stats, w, 4, 4, output_energy=full, **kwargs)
    assert torch.equal(given.groups, formed.groups) and given.output_energy == full
    torch.testing.assert_close(given.output_energy, formed.output_energy, rtol=1e-12, atol=0)
    torch.testing.assert_close(given.residual, formed.residual, rtol=1e-10, atol=0)
    torch.testing.assert_close(given.relative_residual, formed.relative_residual, rtol=1e-10, atol=0)
    dropped = torch.ones(32, dtype=torch.bool)
    dropped[group_columns(given.groups, 4)] = False
    explicit = float((h[:, dropped] @ w[:, dropped].T).pow(2).sum())  # sum_b ||W_D h_D||^2
    torch.testing.assert_close(given.residual, explicit, rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_validation_forms_no_width_squared_matrix_of_either_half(dtype):
    """The held-out validation reads each half's covariance a block of rows at a time (HeldOutHalves) instead of
    forming it: at MiniLM's FFN width with half the columns kept it holds under two width x width matrices of its
    precision at once beyond the statistics and W^T W (3.0 in float32 and 2.9 in float64 when each half was formed
    whole; what remains is the eigenbasis' k x k matrices), and the statistics are left as they were."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from selection_profile import _statistics, peak_allocated

    from hf_ispasp.algorithm import validate_refit, weight_gram

    cpu, width = torch.device("cpu"), 1536
    stats, weight, bias = _statistics(64, width, 2 * width, cpu)
    sums = [t.clone() for t in stats.tensors()]
    gram_w = weight_gram(weight, stats).to(dtype)
    choice, peak = peak_allocated(lambda: validate_refit(stats, weight, bias, torch.arange(0, width, 2), 1,
                                                         weight_gram=gram_w, dtype=dtype), cpu)
    assert choice.ridge is not None and 0 < peak <= 2.2 * width * width * gram_w.element_size()
    assert all(torch.equal(a, b) for a, b in zip(sums, stats.tensors(), strict=True))
    again = validate_refit(stats, weight, bias, torch.arange(0, width, 2), 1, weight_gram=gram_w, dtype=dtype)
    assert again.scores == choice.scores  # nothing the first validation read was spent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("centered", [True, False])
def test_held_out_halves_read_what_the_halves_moments_hold(dtype, centered):
    """Each fold of HeldOutHalves, read a block of rows at a time from the sums, holds the values of the halves'
    moments formed whole (BlockStatistics.halves, then the mean's outer product subtracted): the kept rows times
    W^T and the kept block bit for bit, mean and count too; the scale and tr(W C W^T) to the rounding of their
    sums."""
    from hf_ispasp.algorithm import HeldOutHalves, _moments, _submatrix, weight_gram

    gen = torch.Generator().manual_seed(4)
    width = 600  # over two row blocks
    h = torch.randn(1500, 40, generator=gen, dtype=torch.float64) @ torch.randn(40, width, generator=gen,
                                                                               dtype=torch.float64) + 0.3
    w = torch.randn(7, width, generator=gen, dtype=torch.float64)
    stats = BlockStatistics(width)
    for i, part in enumerate(h.split(100)):
        stats.update(part, torch.float64, fold=i % 2)
    gram_w = weight_gram(w, stats).to(dtype)
    cols = torch.randperm(width, generator=gen)[:290].sort().values
    halves = HeldOutHalves.of(stats, w.to(dtype), gram_w, centered, dtype, both_ways=True)  # both halves tested
    for index, half in enumerate(stats.halves(dtype)):
        mean, moment = _moments(half, centered)
        fold = halves.fold(index, cols)
        assert torch.equal(fold.mean, mean) and fold.count == half.rows
        assert torch.equal(fold.cov_w, moment[cols] @ w.to(dtype).T)
        assert torch.equal(fold.cov_ss, _submatrix(moment, cols, cols))
        rtol = 1e-5 if dtype == torch.float32 else 1e-12  # sums taken in another order
        torch.testing.assert_close(fold.unit, torch.diagonal(moment).mean().clamp_min(0), rtol=rtol, atol=0)
        torch.testing.assert_close(fold.total, (moment * gram_w).sum(), rtol=rtol, atol=0)
    unsplit = BlockStatistics(width)
    unsplit.update(h, torch.float64)
    assert HeldOutHalves.of(unsplit, w, weight_gram(w, unsplit), centered, torch.float64) is None


def test_accelerator_weight_gram_is_exactly_symmetric_and_saves_the_transposed_copy(monkeypatch):
    """On an accelerator W^T W comes from its lower blocks, mirrored (forced on the CPU here): exactly symmetric
    where a plain float64 GEMM is not (width 64 on this CPU), equal to that product to rounding, so the
    elimination reads the energy's rows in place instead of a transposed copy; a tiny prune keeps the same
    groups."""
    from conftest import tiny_text_model, token_batches

    from hf_ispasp import ISpaSPPruner, PrunerConfig
    from hf_ispasp import algorithm as alg

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen, dtype=torch.float64)
    config = PrunerConfig(show_progress=False, ffn_keep_ratio=0.4, head_keep_ratio=0.67)
    data = token_batches(num=24, batch_size=8)
    plain = ISpaSPPruner(tiny_text_model("bert"), config)
    plain.prune(data)
    assert not alg._mirrors_weight_gram(w.device) and torch.equal(alg._weight_gram(w), w.T @ w)
    monkeypatch.setattr(alg, "_mirrors_weight_gram", lambda device: True)
    gram = alg._weight_gram(w)
    assert torch.equal(gram, gram.T) and not torch.equal(w.T @ w, (w.T @ w).T)  # the case the mirror is for
    torch.testing.assert_close(gram, w.T @ w, rtol=1e-12, atol=1e-12)
    stats = BlockStatistics(64)
    stats.update(torch.randn(200, 64, generator=gen, dtype=torch.float64), torch.float64)
    alg._mirror_lower(stats.gram)  # symmetric statistics, as the accelerator's panel sums are
    energy, before = alg._Problem(stats, w, 1, gram).energy, alg._Problem(stats, w, 1, w.T @ w).energy
    assert alg._columns_as_rows(energy) is energy  # no transposed copy
    assert alg._columns_as_rows(before) is not before  # which the plain product cost
    mirrored = ISpaSPPruner(tiny_text_model("bert"), config)
    mirrored.prune(data)
    assert [b.kept for b in mirrored.report.blocks] == [b.kept for b in plain.report.blocks]


def test_factored_energy_holds_no_width_squared_matrix(monkeypatch):
    """The accelerator's elimination with the energy read from its factors (forced on the CPU) holds one block of
    rows of E at most (a quarter of a width x width matrix here, a twelfth at BERT-base's FFN width), where forming
    E holds a whole one; the same drops."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from peak_memory import peak_allocated

    from hf_ispasp import algorithm as alg

    gen = torch.Generator().manual_seed(5)
    width = 1024
    h = torch.randn(1200, width, generator=gen, dtype=torch.float64)
    w = torch.randn(64, width, generator=gen, dtype=torch.float64)
    stats = _stats(h)
    alg._mirror_lower(stats.gram)
    weight_gram = alg._symmetric_gram(w)
    merged, matrix = torch.arange(width), width * width * 8
    results = {}
    for factored in (False, True):
        monkeypatch.setattr(alg, "_factors_energy", lambda device, factored=factored: factored)
        problem = alg._Problem(stats, w, 1, weight_gram)
        results[factored] = peak_allocated(lambda problem=problem: problem._eliminate_on_device(merged, 200, 1, None),
                                           torch.device("cpu"))
    assert torch.equal(results[True][0], results[False][0])
    assert results[False][1] >= matrix and results[True][1] <= 1.05 * alg._ROWS * width * 8 <= matrix / 3


def test_factored_downdates_hold_no_factor_matrix():
    """The factored elimination keeps its factors in the rows of P that left (nothing reads them again): beyond
    P and Z it holds a block of factor rows and a chunk's rows at a time, about what the in-place downdates hold
    plus one block of rows (under two fifths of a width x width matrix here), not the width x dropped-columns
    matrix of factors (three quarters of one)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from peak_memory import peak_allocated

    from hf_ispasp import algorithm as alg

    gen = torch.Generator().manual_seed(3)
    width = 2048
    h = torch.relu(torch.randn(2600, width, generator=gen, dtype=torch.float64))
    w = torch.randn(32, width, generator=gen, dtype=torch.float64)
    stats = _stats(h)
    cov = alg._moments(stats, True)[1]
    ridge = 1e-2 * float(cov.diagonal().mean())
    cov.diagonal().add_(ridge)
    inverse = torch.linalg.inv(cov)
    del cov
    problem = alg._Problem(stats, w, 1)
    column_sq = w.pow(2).sum(0)
    results = {}
    for factored in (True, False):
        inv = inverse.clone()

        def eliminate(inv=inv, factored=factored):
            return problem._eliminate(inv, w.T.clone(), torch.zeros((), dtype=torch.float64), torch.arange(width),
                                      width // 4, ridge, column_sq, True, 1, 16, None, lambda kept, a: float(a),
                                      factored=factored)

        results[factored] = peak_allocated(eliminate, torch.device("cpu"))
    (kept, _, _, failed), peak = results[True]
    assert not failed and torch.equal(kept, results[False][0][0])
    matrix, block = width * width * 8, alg._ROWS * width * 8
    assert 0 < peak <= results[False][1] + 1.25 * block <= 0.4 * matrix


def test_the_final_refit_solves_by_lu_where_cholesky_fails(monkeypatch):
    """A system that rounding made indefinite for its Cholesky factorisation is solved by LU, as refit_projection."""
    from hf_ispasp.algorithm import refit_with_residual

    h, w, active = _planted(width=32, out=12)
    b = torch.randn(12, dtype=torch.float64)
    stats = _stats(h)
    fitted = refit_projection(stats, w, b, active, 1, 1e-2, True)
    factorise = torch.linalg.cholesky_ex
    failed = []

    def failing(matrix, *args, **kwargs):
        factor, info = factorise(matrix, *args, **kwargs)
        failed.append(True)
        return factor, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    new_w, new_b, residual = refit_with_residual(stats, w, b, active, 1, 1e-2, True)
    assert failed
    torch.testing.assert_close(new_w, fitted[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new_b, fitted[1], rtol=1e-10, atol=1e-12)
    assert residual == pytest.approx(residual_after_refit(stats, w, b, active, 1, *fitted), rel=1e-9)
