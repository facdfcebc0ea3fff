"""Section 3: every selection rule on a grid of budgets, one-shot, with and without the least-squares re-fit.

MiniLM-L6 fine-tuned on sentence polarity; the same 512 calibration sentences for every rule; metrics on
the 800 test sentences: accuracy (± standard error), agreement with the dense model, mean KL(dense ||
pruned), FLOPs. Rules are ranked by KL (accuracy on 800 sentences cannot separate close rules). Then a
1-epoch fine-tune of the default rule and of the best baseline at FFN 0.5 / heads 0.75.

    python benchmarks/selection_rules.py                 # full grid (~40 min on 2 cores), resumable
    python benchmarks/selection_rules.py --finetune-only # only the fine-tune comparison
    python benchmarks/selection_rules.py --report-only   # rewrite the markdown from the JSON
    python benchmarks/selection_rules.py --tiny --output-dir /tmp/x
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from demo import recipes  # noqa: E402
from hf_ispasp import ISpaSPPruner, PrunerConfig  # noqa: E402

NAME = "selection_rules"
RULES: dict[str, dict[str, Any]] = {
    "random": {"selection": "random"},
    "weight_magnitude": {"selection": "weight_magnitude"},
    "activation": {"selection": "activation"},
    "taylor": {"selection": "taylor"},
    "output_energy": {"selection": "output_energy"},
    "ispasp-paper (sum/sum)": {"selection": "ispasp", "proxy": "sum", "threshold": "sum"},
    "ispasp l2/output": {"selection": "ispasp", "proxy": "l2", "threshold": "output"},
    "ispasp l2/residual": {"selection": "ispasp", "proxy": "l2", "threshold": "residual"},
    "ispasp sum/residual": {"selection": "ispasp", "proxy": "sum", "threshold": "residual"},
    "ispasp l2/refit": {"selection": "ispasp", "proxy": "l2", "threshold": "refit"},
}
BASELINES = ("random", "weight_magnitude", "activation", "taylor", "output_energy")
MAIN_BUDGET = (0.5, 0.75)
DEFAULT_RULE = ("ispasp l2/refit", True)  # the engine's default (PrunerConfig())


# Most informative budgets first, so that a run cut short still covers the extremes of the grid.
ORDER = [MAIN_BUDGET, (0.25, 0.5), (0.75, 1.0), (0.25, 0.75), (0.75, 0.75), (0.5, 0.5), (0.5, 1.0), (0.25, 1.0),
         (0.75, 0.5)]
# When 2 * keep >= groups in every block, i-SpaSP's candidate set (the 2s groups with the largest proxy, plus the
# support) is the whole layer, so the proxy plays no part and the rule is its threshold alone: these pairs then
# select exactly the same groups (deterministically), and the second is recorded from the first.
SAME_WHEN_WIDE = {"ispasp l2/output": "output_energy", "ispasp sum/residual": "ispasp l2/residual"}


def budgets(tiny: bool) -> list[tuple[float, float]]:
    if tiny:
        return [MAIN_BUDGET]
    assert sorted(ORDER) == sorted(common.BUDGETS)
    return ORDER


def _wide(ffn: float, heads: float) -> bool:
    """2 * keep >= groups for MiniLM's FFN (1536 neurons) and attention (12 heads) blocks."""
    return 2 * round(ffn * 1536) >= 1536 and 2 * round(heads * 12) >= 12


def prune(task: common.Task, rule: str, refit: bool, ffn: float, heads: float) -> tuple[Any, Any]:
    config = PrunerConfig(ffn_keep_ratio=ffn, head_keep_ratio=heads, refit=refit, show_progress=False,
                          **RULES[rule])
    pruner = ISpaSPPruner(task.model, config)
    model = pruner.prune(task.calibration_loader())
    return model, pruner.report


def run_grid(task: common.Task, results: common.Results, rules: list[str], tiny: bool) -> None:
    done = {(r["rule"], r["refit"], r["ffn_keep"], r["head_keep"]): r for r in results.records}
    # re-fit first over all budgets: it is the candidate default and the more informative half of the grid
    for refit in (True, False):
        for ffn, heads in budgets(tiny):
            for rule in rules:
                key = (rule, refit, ffn, heads)
                if key in done:
                    continue
                twin = done.get((SAME_WHEN_WIDE.get(rule), refit, ffn, heads))
                if twin is not None and _wide(ffn, heads) and not tiny:
                    record = {**twin, "rule": rule, "same_selection_as": twin["rule"]}
                    results.add(record)
                    done[key] = record
                    continue
                model, report = prune(task, rule, refit, ffn, heads)
                metrics = task.evaluate(model)
                record = {"rule": rule, "refit": refit, "ffn_keep": ffn, "head_keep": heads, **metrics,
                          "prune_seconds": report.seconds}
                results.add(record)
                done[key] = record
                print(f"{ffn:.2f}/{heads:.2f} {rule:24s} refit={refit!s:5s} acc={metrics['accuracy']:.3f} "
                      f"agree={metrics['agreement']:.3f} kl={metrics['kl']:.4f} ({report.seconds:.1f}s)", flush=True)
                del model


def run_finetune(task: common.Task, results: common.Results, tiny: bool) -> None:
    """1-epoch fine-tune at the main budget: the default rule against the best baseline (lowest KL)."""
    ffn, heads = MAIN_BUDGET
    one_shot = [r for r in results.records if (r["ffn_keep"], r["head_keep"]) == MAIN_BUDGET]
    default = next((r for r in one_shot if (r["rule"], r["refit"]) == DEFAULT_RULE), None)
    # a baseline that selects exactly what the default selects (same KL) would fine-tune to the same model
    base = [r for r in one_shot if r["rule"] in BASELINES and (default is None or abs(r["kl"] - default["kl"]) > 1e-9)]
    if not base:
        return
    best = min(base, key=lambda r: r["kl"])
    candidates = [DEFAULT_RULE, (best["rule"], best["refit"])]
    # the best i-SpaSP variant too, when it is not the default
    ours = [r for r in one_shot if r["rule"] not in BASELINES]
    if ours:
        top = min(ours, key=lambda r: r["kl"])
        if (top["rule"], top["refit"]) not in candidates:
            candidates.append((top["rule"], top["refit"]))
    done = {(r["rule"], r["refit"]) for r in results.data.get("finetune", [])}
    finetune = list(results.data.get("finetune", []))
    if ("dense", False) not in done:
        dense = _finetune_and_eval(task, task.model, tiny)
        finetune.append({"rule": "dense", "refit": False, **dense})
        results.set("finetune", finetune)
    for rule, refit in candidates:
        if (rule, refit) in done:
            continue
        model, _ = prune(task, rule, refit, ffn, heads)
        before = task.evaluate(model)
        after = _finetune_and_eval(task, model, tiny)
        finetune.append({"rule": rule, "refit": refit, "ffn_keep": ffn, "head_keep": heads,
                         "one_shot_accuracy": before["accuracy"], "one_shot_kl": before["kl"], **after})
        results.set("finetune", finetune)
        print(f"fine-tuned {rule} refit={refit}: {before['accuracy']:.3f} -> {after['accuracy']:.3f}", flush=True)


def _finetune_and_eval(task: common.Task, model: Any, tiny: bool) -> dict[str, float]:
    import copy

    model = copy.deepcopy(model)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = recipes.finetune_classifier(model, task.tokenizer, task.train, tmp, epochs=1.0,
                                            max_steps=2 if tiny else -1)
    model.eval()
    return task.evaluate(model)


def report(results: common.Results, dense: dict[str, float]) -> str:
    recs = results.records
    lines = [
        "## One-shot quality of the selection rules (MiniLM-L6, sentence polarity)",
        "",
        f"Dense model: accuracy {common.pct(dense['accuracy'])} ± {common.pct(dense['accuracy_stderr'])} on "
        f"{int(dense['n'])} test sentences. Calibration: the same {results.data['meta'].get('calibration_size')} "
        "training sentences for every rule. KL = mean KL(dense || pruned) over the test sentences; "
        "agreement = share of test sentences where the pruned model predicts what the dense one predicts. "
        "Within a budget, rows are ranked by KL. `refit` = least-squares re-fit of the output projection.",
        "",
        "Note: i-SpaSP merges the current support with the 2s groups of largest proxy before thresholding. When "
        "2s >= N (keep >= 0.5 of the FFN neurons *and* of the heads) that candidate set is the whole layer, so the "
        "proxy plays no part and i-SpaSP selects exactly what its threshold score selects on its own: `ispasp "
        "l2/output` = `output_energy`, `ispasp sum/residual` = `ispasp l2/residual` (such rows are copied, marked "
        "'not re-run'). The proxy only matters at FFN keep 0.25 in this grid.",
        "",
    ]
    budgets_seen = sorted({(r["ffn_keep"], r["head_keep"]) for r in recs}, key=lambda b: (-b[0], -b[1]))
    wins = []
    for ffn, heads in budgets_seen:
        rows = sorted([r for r in recs if (r["ffn_keep"], r["head_keep"]) == (ffn, heads)], key=lambda r: r["kl"])
        table = [
            {
                "rank": i + 1, "refit": "yes" if r["refit"] else "no",
                "rule": r["rule"] + (f" (= {r['same_selection_as']}, not re-run)" if "same_selection_as" in r else ""),
                "kl": r["kl"], "agreement": common.pct(r["agreement"]),
                "accuracy": f"{common.pct(r['accuracy'])} ± {common.pct(r['accuracy_stderr'])}",
                "flops": f"{r['flops_ratio']:.3f}", "seconds": f"{r['prune_seconds']:.1f}",
            }
            for i, r in enumerate(rows)
        ]
        lines += [f"### FFN keep {ffn} / heads keep {heads}", "", common.markdown_table(table, [
            ("#", "rank"), ("rule", "rule"), ("re-fit", "refit"), ("KL", "kl"), ("agreement %", "agreement"),
            ("accuracy %", "accuracy"), ("FLOPs ratio", "flops"), ("prune s", "seconds")]), ""]
        default = next((r for r in rows if (r["rule"], r["refit"]) == DEFAULT_RULE), None)
        base = [r for r in rows if r["rule"] in BASELINES]
        if default and base:
            best = min(base, key=lambda r: r["kl"])
            best_acc = max(base, key=lambda r: r["accuracy"])
            wins.append({
                "budget": f"{ffn}/{heads}", "default_kl": default["kl"], "best_baseline": _label(best),
                "baseline_kl": best["kl"], "default_acc": common.pct(default["accuracy"]),
                "best_baseline_acc": f"{common.pct(best_acc['accuracy'])} ({_label(best_acc)})",
                "kl_win": "yes" if default["kl"] < best["kl"] else "no",
                "acc_win": "yes" if default["accuracy"] >= best_acc["accuracy"] else "no",
            })
    if wins:
        lines += ["### Default rule (ispasp l2/refit + re-fit) against the best baseline at each budget", "",
                  common.markdown_table(wins, [
                      ("FFN/heads", "budget"), ("default KL", "default_kl"), ("best baseline (KL)", "best_baseline"),
                      ("its KL", "baseline_kl"), ("lower KL?", "kl_win"), ("default acc %", "default_acc"),
                      ("best baseline acc %", "best_baseline_acc"), ("acc >= ?", "acc_win")]), ""]
    summary = _rule_summary(recs)
    if summary:
        lines += ["### Mean rank over all budgets (by KL; 1 = best)", "", common.markdown_table(summary, [
            ("rule", "rule"), ("re-fit", "refit"), ("mean rank", "rank"), ("mean KL", "kl"),
            ("mean agreement %", "agreement")]), ""]
    ft = results.data.get("finetune")
    if ft:
        rows = [{
            "rule": r["rule"], "refit": "yes" if r.get("refit") else "no",
            "one_shot": common.pct(r["one_shot_accuracy"]) if "one_shot_accuracy" in r else "-",
            "after": f"{common.pct(r['accuracy'])} ± {common.pct(r['accuracy_stderr'])}",
            "kl": r["kl"], "flops": f"{r['flops_ratio']:.3f}",
        } for r in ft]
        lines += [f"### After a 1-epoch fine-tune (FFN {MAIN_BUDGET[0]} / heads {MAIN_BUDGET[1]})", "",
                  "The dense row is the dense model fine-tuned for one more epoch with the same recipe.", "",
                  common.markdown_table(rows, [("rule", "rule"), ("re-fit", "refit"), ("one-shot acc %", "one_shot"),
                                               ("fine-tuned acc %", "after"), ("KL vs original dense", "kl"),
                                               ("FLOPs ratio", "flops")]), ""]
    return "\n".join(lines)


def _label(r: dict[str, Any]) -> str:
    return r["rule"] + (" + re-fit" if r["refit"] else "")


def _rule_summary(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_budget: dict[tuple, list] = {}
    for r in recs:
        by_budget.setdefault((r["ffn_keep"], r["head_keep"]), []).append(r)
    ranks: dict[tuple, list] = {}
    for rows in by_budget.values():
        for i, r in enumerate(sorted(rows, key=lambda r: r["kl"])):
            ranks.setdefault((r["rule"], r["refit"]), []).append((i + 1, r["kl"], r["agreement"]))
    out = []
    for (rule, refit), vals in ranks.items():
        n = len(vals)
        out.append({"rule": rule, "refit": "yes" if refit else "no", "rank": sum(v[0] for v in vals) / n,
                    "kl": sum(v[1] for v in vals) / n, "agreement": common.pct(sum(v[2] for v in vals) / n)})
    return sorted(out, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="*", default=list(RULES), help="subset of rules")
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--finetune-only", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="ignore records of an earlier run")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args(argv)
    if args.report_only:
        import json

        results = common.Results.__new__(common.Results)
        results.path = args.output_dir / f"{NAME}.json"
        results.data = json.loads(results.path.read_text())
        text = report(results, results.data["meta"]["dense"])
        common.write_fragment(args.output_dir, NAME, text)
        print(text)
        return 0
    task = common.load_task(tiny=args.tiny, work_dir=args.output_dir)
    results = common.Results(args.output_dir, NAME, {"tiny": args.tiny, "calibration_size": len(task.calibration),
                                                     "dense": task.dense_metrics}, resume=not args.fresh)
    if not args.finetune_only:
        run_grid(task, results, args.rules, args.tiny)
    if not args.no_finetune:
        run_finetune(task, results, args.tiny)
    text = report(results, task.dense_metrics)
    common.write_fragment(args.output_dir, NAME, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
