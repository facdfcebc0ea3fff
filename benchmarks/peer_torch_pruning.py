"""Section 4: Torch-Pruning 1.6.1 on the same fine-tuned MiniLM, same groups (FFN neurons, whole heads), same
widths, next to hf_ispasp in the same run.

Torch-Pruning gets the same 512 calibration sentences (Taylor needs their labels and a backward pass;
magnitude needs none). Its BERT example leaves ``num_attention_heads`` stale after head pruning; here the
attention modules and the config are brought in line with the sliced q/k/v (transformers 5 reshapes with
``-1`` heads, so a stale count still runs but the checkpoint could not be reloaded): the benchmark checks
that the pruned model survives ``save_pretrained`` / ``from_pretrained`` with equal outputs.

    python benchmarks/peer_torch_pruning.py [--budgets 0.5/0.75 ...] [--tiny] [--output-dir DIR]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from hf_ispasp import ISpaSPPruner, PrunerConfig  # noqa: E402

NAME = "peer_torch_pruning"
OURS = {
    "hf_ispasp default (l2/refit + re-fit)": {},
    "hf_ispasp paper (sum/sum, no re-fit)": {"proxy": "sum", "threshold": "sum", "refit": False},
    "hf_ispasp taylor + re-fit": {"selection": "taylor"},
}


def torch_pruning_prune(task: common.Task, importance: str, ffn_keep: float, head_keep: float) -> tuple[Any, float]:
    """Prune a copy with Torch-Pruning's MetaPruner: whole heads of q/k/v and FFN neurons, nothing else."""
    import torch_pruning as tp

    start = time.perf_counter()
    model = copy.deepcopy(task.model)
    model.eval()
    bert = model.base_model
    example = {k: v for k, v in common.example_inputs(task.tiny, 1, 16).items()}
    heads = model.config.num_attention_heads
    num_heads, ffn_ratio = {}, {}
    for layer in bert.encoder.layer:
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            num_heads[lin] = heads
        ffn_ratio[layer.intermediate.dense] = 1.0 - ffn_keep
    # Same kept head count as hf_ispasp (round(ratio * heads)); Torch-Pruning removes ceil(ratio * heads).
    kept_heads = max(1, round(head_keep * heads))
    head_ratio = (heads - kept_heads) / heads
    if head_ratio > 0:
        # With pruning_ratio=0 Torch-Pruning skips the attention groups altogether (n_pruned = 0 happens before
        # its head pruning); a non-zero ratio on the query layer enables head removal, and prune_head_dims=False
        # keeps it from also slicing head dimensions.
        for layer in bert.encoder.layer:
            ffn_ratio[layer.attention.self.query] = head_ratio
    if importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    else:
        imp = tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=imp,
        pruning_ratio=0.0,  # the hidden size (residual stream) is not pruned, as in hf_ispasp
        pruning_ratio_dict=ffn_ratio,
        num_heads=num_heads,
        prune_num_heads=head_ratio > 0,
        prune_head_dims=False,
        head_pruning_ratio=head_ratio,
        ignored_layers=[model.classifier, bert.pooler] if bert.pooler is not None else [model.classifier],
        output_transform=lambda out: out.logits.sum(),
    )
    if importance == "taylor":
        model.zero_grad()
        for batch in task.calibration_loader():
            out = model(**batch)
            out.loss.backward()  # gradients accumulate over the calibration set
    pruner.step()
    model.zero_grad(set_to_none=True)
    fix_attention_heads(model)
    return model, time.perf_counter() - start


def fix_attention_heads(model: Any) -> None:
    """Make head counts and config widths match the sliced weights (Torch-Pruning's example leaves them stale)."""
    bert = model.base_model
    ffn: set[int] = set()
    heads_per_layer = []
    for layer in bert.encoder.layer:
        attn = layer.attention.self
        width = attn.query.out_features
        attn.num_attention_heads = width // attn.attention_head_size
        attn.all_head_size = width
        heads_per_layer.append(attn.num_attention_heads)
        ffn.add(layer.intermediate.dense.out_features)
    if len(ffn) == 1:
        model.config.intermediate_size = ffn.pop()
    heads = heads_per_layer[0]
    if len(set(heads_per_layer)) == 1 and model.config.hidden_size % heads == 0:
        # BertConfig refuses a hidden size that is not a multiple of the head count (384 / 9 heads): then the
        # config cannot describe the pruned model at all and only the modules are fixed.
        model.config.num_attention_heads = heads


def reload_check(model: Any, ours: bool) -> tuple[bool, str]:
    """Does a save + reload give the same outputs? (``save_pruned``/``load_pruned`` for hf_ispasp models, plain
    ``save_pretrained``/``from_pretrained`` for Torch-Pruning's, which has no shape record of its own)."""
    from transformers import AutoModelForSequenceClassification

    from hf_ispasp import load_pruned, save_pruned

    inputs = common.example_inputs(False, 2, 16)
    inputs["input_ids"] = inputs["input_ids"] % model.config.vocab_size
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if ours:
                save_pruned(model, tmp)
                again = load_pruned(tmp).eval()
            else:
                model.save_pretrained(tmp)
                again = AutoModelForSequenceClassification.from_pretrained(tmp).eval()
            with torch.no_grad():
                torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits)
        return True, ""
    except Exception as exc:  # the point is to record *why* a reload fails
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def widths(model: Any) -> str:
    layer = model.base_model.encoder.layer[0]
    return f"{layer.attention.self.query.out_features // layer.attention.self.attention_head_size}h/" \
           f"{layer.intermediate.dense.out_features}"


def run(task: common.Task, results: common.Results, budgets: list[tuple[float, float]]) -> None:
    for ffn, heads in budgets:
        for name, kwargs in OURS.items():
            config = PrunerConfig(ffn_keep_ratio=ffn, head_keep_ratio=heads, show_progress=False, **kwargs)
            start = time.perf_counter()
            model = ISpaSPPruner(task.model, config).prune(task.calibration_loader())
            seconds = time.perf_counter() - start
            _record(task, results, name, model, seconds, ffn, heads)
        for importance in ("magnitude", "taylor"):
            model, seconds = torch_pruning_prune(task, importance, ffn, heads)
            _record(task, results, f"Torch-Pruning {importance}", model, seconds, ffn, heads)


def _record(task: common.Task, results: common.Results, name: str, model: Any, seconds: float, ffn: float,
            heads: float) -> None:
    metrics = task.evaluate(model)
    ok, why = reload_check(model, ours=name.startswith("hf_ispasp"))
    results.add({"method": name, "ffn_keep": ffn, "head_keep": heads, "seconds": seconds, "widths": widths(model),
                 "reload_ok": ok, "reload_error": why, **metrics})
    print(f"{ffn}/{heads} {name:40s} acc={metrics['accuracy']:.3f} kl={metrics['kl']:.4f} {seconds:.1f}s "
          f"{widths(model)} reload={ok}", flush=True)


def report(results: common.Results, dense: dict[str, float]) -> str:
    lines = [
        "## Side by side with Torch-Pruning 1.6.1",
        "",
        "Same fine-tuned MiniLM-L6, same groups (whole attention heads of q/k/v, FFN neurons; hidden size "
        "untouched), same kept widths, same 512 calibration sentences; wall time of the whole prune measured in "
        "the same process (Torch-Pruning's includes building its dependency graph and, for Taylor, the backward "
        "passes; ours includes calibration and, for Taylor, the backward passes). "
        f"Dense: accuracy {common.pct(dense['accuracy'])} ± {common.pct(dense['accuracy_stderr'])}. "
        "'reload' = saving and reloading gives the same logits (hf_ispasp: `save_pruned` / `load_pruned`, "
        "which rebuild the per-layer widths; Torch-Pruning: `save_pretrained` / `from_pretrained` after we fixed "
        "the modules' head counts and `intermediate_size` by hand; with 9 of 12 heads `BertConfig` refuses "
        "`num_attention_heads=9` for hidden size 384, so a plain transformers config cannot describe that model).",
        "",
    ]
    for ffn, heads in sorted({(r["ffn_keep"], r["head_keep"]) for r in results.records}, key=lambda b: (-b[0], -b[1])):
        rows = sorted([r for r in results.records if (r["ffn_keep"], r["head_keep"]) == (ffn, heads)],
                      key=lambda r: r["kl"])
        table = [{"method": r["method"], "kl": r["kl"], "agreement": common.pct(r["agreement"]),
                  "accuracy": f"{common.pct(r['accuracy'])} ± {common.pct(r['accuracy_stderr'])}",
                  "widths": r["widths"], "seconds": f"{r['seconds']:.1f}", "flops": f"{r['flops_ratio']:.3f}",
                  "reload": "yes" if r["reload_ok"] else "no"} for r in rows]
        lines += [f"### FFN keep {ffn} / heads keep {heads}", "", common.markdown_table(table, [
            ("method", "method"), ("KL", "kl"), ("agreement %", "agreement"), ("accuracy %", "accuracy"),
            ("heads/FFN per layer", "widths"), ("FLOPs ratio", "flops"), ("prune s", "seconds"),
            ("reload", "reload")]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="*", default=["0.5/0.75", "0.75/1.0", "0.25/0.5"],
                        help="FFN/heads keep ratios")
    args = parser.parse_args(argv)
    budgets = [tuple(float(x) for x in b.split("/")) for b in args.budgets]
    if args.tiny:
        budgets = budgets[:1]
    task = common.load_task(tiny=args.tiny, work_dir=args.output_dir)
    results = common.Results(args.output_dir, NAME, {"tiny": args.tiny, "dense": task.dense_metrics})
    run(task, results, budgets)
    text = report(results, task.dense_metrics)
    common.write_fragment(args.output_dir, NAME, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
