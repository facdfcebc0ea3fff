"""Section 1: the paper's synthetic experiment on two-layer ReLU networks with planted hidden sparsity.

``Y = ReLU(X W1^T + b1) W2^T``, hidden sizes 100 and 200, a fraction ``p`` in {0.3, 0.5, 0.7, 0.9} of the
hidden units active. Squared residual ``||V||_F^2 = ||Y - H_S W2_S^T||^2`` (relative to ``||Y||^2``) against
the pruned size ``s`` for i-SpaSP (paper rules and our robust variants), random and weight-magnitude
selection, all through ``hf_ispasp.algorithm.select_groups`` on ``BlockStatistics``.

Two ways of planting sparsity are measured:

* ``units``: the dense network has only ``p N`` live hidden units (the others have a bias that keeps them
  at zero on every input). This is how we read the paper's "fraction of active hidden units".
* ``samples``: every unit is live, but each sample activates only a random ``p N`` of them (an i.i.d.
  mask on H), i.e. per-sample sparsity without any unit being redundant.

    python benchmarks/synthetic.py [--tiny] [--output-dir DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from hf_ispasp.algorithm import BlockStatistics, select_groups  # noqa: E402

NAME = "synthetic"
RULES: dict[str, dict[str, Any]] = {
    "ispasp-paper (sum/sum)": {"selection": "ispasp", "proxy": "sum", "threshold": "sum"},
    "ispasp l2/output": {"selection": "ispasp", "proxy": "l2", "threshold": "output"},
    "ispasp l2/residual": {"selection": "ispasp", "proxy": "l2", "threshold": "residual"},
    "random": {"selection": "random"},
    "magnitude": {"selection": "weight_magnitude"},
}
RANDOM_SEEDS = 5
FLOOR = 1e-16  # relative residuals below this are float64 round-off; plotted at the floor


def network(hidden: int, p: float, mode: str, samples: int, dim_in: int, dim_out: int, seed: int) -> dict:
    """Weights and dense hidden representation of a two-layer ReLU network with planted sparsity."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, dim_in, generator=gen, dtype=torch.float64)
    w1 = torch.randn(hidden, dim_in, generator=gen, dtype=torch.float64) / dim_in**0.5
    w2 = torch.randn(dim_out, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    b1 = torch.zeros(hidden, dtype=torch.float64)
    active = max(1, round(p * hidden))
    if mode == "units":
        dead = torch.randperm(hidden, generator=gen)[active:]
        b1[dead] = -1e3  # never fires on any input: the unit is inactive in the dense network
        h = torch.relu(x @ w1.T + b1)
    elif mode == "samples":
        # ReLU with a threshold chosen per sample so that exactly `active` units fire on it
        pre = x @ w1.T + 0.05 * torch.randn(samples, hidden, generator=gen, dtype=torch.float64)
        kth = pre.topk(active, dim=1).values[:, -1:]
        h = torch.relu(pre - kth) + (pre >= kth) * 1e-3
        h = torch.where(pre >= kth, h, torch.zeros_like(h))
    else:
        raise ValueError(f"unknown sparsity mode {mode!r}")
    return {"x": x, "w1": w1, "b1": b1, "w2": w2, "h": h}


def residual(h: torch.Tensor, w2: torch.Tensor, keep: torch.Tensor) -> float:
    """``||H W2^T - H_S W2_S^T||_F^2`` computed directly on the samples (checks the statistics' value)."""
    mask = torch.ones(h.shape[1], dtype=torch.float64)
    mask[keep] = 0.0
    return float(((h * mask) @ w2.T).pow(2).sum())


def run(hidden_sizes: list[int], ps: list[float], modes: list[str], samples: int, steps: int,
        results: common.Results) -> None:
    for mode in modes:
        for hidden in hidden_sizes:
            for p in ps:
                net = network(hidden, p, mode, samples, dim_in=50, dim_out=10, seed=hidden)
                h, w2, w1 = net["h"], net["w2"], net["w1"]
                stats = BlockStatistics(hidden)
                stats.update(h, torch.float64)
                total = float((h @ w2.T).pow(2).sum())
                magnitude = w1.pow(2).sum(1) + w2.pow(2).sum(0)
                sizes = sorted({max(1, round(hidden * k / steps)) for k in range(1, steps + 1)})
                for rule, kwargs in RULES.items():
                    curve, check = [], 0.0
                    for s in sizes:
                        reps = RANDOM_SEEDS if rule == "random" else 1
                        values = []
                        for rep in range(reps):
                            gen = torch.Generator().manual_seed(rep)
                            res = select_groups(stats, w2, 1, s, weight_scores=magnitude, generator=gen, **kwargs)
                            direct = residual(h, w2, res.groups)
                            check = max(check, abs(direct - res.residual) / max(total, 1e-300))
                            values.append(direct / total)
                        curve.append(sum(values) / len(values))
                    results.add({"mode": mode, "hidden": hidden, "p": p, "rule": rule, "sizes": sizes,
                                 "relative_residual": curve, "stats_vs_direct_max_error": check})
                print(f"{mode} N={hidden} p={p} done", flush=True)


def size_to_reach(record: dict[str, Any], level: float) -> str:
    for s, r in zip(record["sizes"], record["relative_residual"], strict=True):
        if r <= level:
            return f"{s / record['hidden']:.2f}"
    return "-"


def plot(results: common.Results, output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    recs = results.records
    for mode in sorted({r["mode"] for r in recs}):
        hiddens = sorted({r["hidden"] for r in recs if r["mode"] == mode})
        ps = sorted({r["p"] for r in recs if r["mode"] == mode})
        fig, axes = plt.subplots(len(hiddens), len(ps), figsize=(3.2 * len(ps), 2.8 * len(hiddens)), squeeze=False,
                                 sharey=True)
        for i, hidden in enumerate(hiddens):
            for j, p in enumerate(ps):
                ax = axes[i][j]
                for r in recs:
                    if (r["mode"], r["hidden"], r["p"]) == (mode, hidden, p):
                        ys = [max(v, FLOOR) for v in r["relative_residual"]]
                        ax.semilogy([s / hidden for s in r["sizes"]], ys, label=r["rule"],
                                    linestyle="--" if r["rule"] in ("random", "magnitude") else "-")
                ax.set_title(f"N={hidden}, p={p}", fontsize=9)
                ax.axvline(p, color="grey", linewidth=0.5)
                if i == len(hiddens) - 1:
                    ax.set_xlabel("kept fraction s/N")
                if j == 0:
                    ax.set_ylabel("||V||² / ||Y||²")
        axes[0][0].legend(fontsize=6)
        fig.suptitle(f"Two-layer ReLU network, sparsity planted per {mode[:-1]}", fontsize=10)
        fig.tight_layout()
        path = Path(output_dir) / f"synthetic_{mode}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path.name)
    return files


def report(results: common.Results, images: list[str]) -> str:
    recs = results.records
    rows = []
    for r in recs:
        curve = dict(zip(r["sizes"], r["relative_residual"], strict=True))
        half = min(curve, key=lambda s: abs(s / r["hidden"] - 0.5))
        rows.append({"mode": r["mode"], "N": r["hidden"], "p": r["p"], "rule": r["rule"],
                     "at_half": curve[half], "to_1e-2": size_to_reach(r, 1e-2), "to_1e-6": size_to_reach(r, 1e-6),
                     "to_1e-12": size_to_reach(r, 1e-12)})
    worst = max((r["stats_vs_direct_max_error"] for r in recs), default=0.0)
    lines = [
        "## Synthetic two-layer ReLU networks (paper section: planted hidden sparsity)",
        "",
        "Relative squared residual `||V||_F^2 / ||Y||_F^2` at s = N/2, and the smallest kept fraction s/N "
        "that brings it below 1e-2, 1e-6 and 1e-12 ('-': never below 1). Random is the mean of "
        f"{RANDOM_SEEDS} seeds; magnitude ranks units by the squared norm of their input and output weights. "
        f"The residual from the streamed statistics matches the direct computation on the samples to "
        f"{worst:.1e} (relative).",
        "",
        common.markdown_table(rows, [("planted per", "mode"), ("N", "N"), ("p", "p"), ("rule", "rule"),
                                     ("residual at s=N/2", "at_half"), ("s/N for 1e-2", "to_1e-2"),
                                     ("s/N for 1e-6", "to_1e-6"), ("s/N for 1e-12", "to_1e-12")]),
        "",
    ]
    lines += [_findings(recs), ""]
    lines += [f"![synthetic {name}]({name})" for name in images]
    return "\n".join(lines)


def _findings(recs: list[dict[str, Any]]) -> str:
    """What the curves show, computed from the records (not written by hand)."""
    below, total, cliff = 0, 0, []
    for r in recs:
        if not r["rule"].startswith("ispasp"):
            continue
        for base in ("random", "magnitude"):
            other = next(o for o in recs if (o["mode"], o["hidden"], o["p"], o["rule"]) ==
                         (r["mode"], r["hidden"], r["p"], base))
            for a, b in zip(r["relative_residual"], other["relative_residual"], strict=True):
                total += 1
                below += int(a <= b + 1e-12)
        if r["mode"] == "units":
            first = next((s for s, v in zip(r["sizes"], r["relative_residual"], strict=True) if v < 1e-12), None)
            cliff.append(first is not None and abs(first / r["hidden"] - r["p"]) <= 1.0 / 20 + 1e-9)
    return (
        f"**Findings.** i-SpaSP (every variant) is at or below random and magnitude selection at {below} of {total} "
        f"(rule, size) points. With sparsity planted per unit, the residual of i-SpaSP drops to float64 round-off "
        f"exactly when s reaches the number of live units pN ({sum(cliff)} of {len(cliff)} curves), while random "
        "and magnitude selection need almost the whole layer: sparser layers are pruned losslessly much earlier, "
        "as in the paper. Below pN the curves fall only slowly (the live units are i.i.d., so no subset of them "
        "is much better than another), so the picture is a cliff at pN rather than the paper's steady fall over "
        "ten orders of magnitude: the paper's axis (about 1e-3 down to 1e-14 for p = 0.3) is an absolute residual "
        "whose low end is round-off, i.e. the same cliff; a steady polynomial decay needs unit importances that "
        "decay themselves, which i.i.d. planted sparsity does not give. With sparsity planted per sample (every "
        "unit useful on some samples) no rule reaches a small residual before s = N; see the table for how the "
        "robust variants (l2 proxy, output or residual threshold) compare with the paper's sum/sum rule at s = N/2."
    )


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    if args.tiny:
        hidden, ps, samples, steps = [20], [0.3, 0.9], 64, 5
    else:
        hidden, ps, samples, steps = [100, 200], [0.3, 0.5, 0.7, 0.9], 2000, 20
    results = common.Results(args.output_dir, NAME, {"tiny": args.tiny, "samples": samples, "dim_in": 50,
                                                     "dim_out": 10})
    run(hidden, ps, ["units", "samples"], samples, steps, results)
    images = plot(results, args.output_dir)
    text = report(results, images)
    common.write_fragment(args.output_dir, NAME, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
