"""Selection precision on a real model: float64, ``selection_dtype="auto"`` (the default) and float32.

MiniLM-L6 fine-tuned on sentence polarity, FFN keep 0.5 / heads keep 0.75, the first 8 ... 512 of the same
shuffled training sentences as calibration data. For every size and precision: which blocks compute in float32
(auto: the held-out validation of blocks with at least 2 calibration tokens per column; float32: everything),
how many blocks keep the same groups as float64,
whether the pruned model is bit-identical to the float64 one (the re-fit always reads the float64 statistics),
KL(dense || pruned) and accuracy on the 800 test sentences, and the selection seconds (one prune each, the
precisions run one after the other per size; `engine_shapes.py` measures the speed properly, interleaved).

    python benchmarks/selection_precision.py                 # ~5 min on 2 cores
    python benchmarks/selection_precision.py --report-only   # rewrite the markdown from the JSON
    python benchmarks/selection_precision.py --tiny --output-dir /tmp/x
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for  # noqa: E402
from hf_ispasp.algorithm import WELL_POSED_ROWS_PER_COLUMN  # noqa: E402

NAME = "selection_precision"
SIZES = [8, 32, 128, 512]
TINY_SIZES = [4, 16]
PRECISIONS = ["float64", "auto", "float32"]
BUDGET = (0.5, 0.75)


def state_digest(model: Any) -> str:
    """Digest of every parameter and buffer, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def columns(model: Any) -> dict[str, int]:
    """Columns of every prunable block (the width its statistics have)."""
    return {b.name: b.num_groups * b.group_size for b in adapter_for(model).iter_blocks()}


def run(task: common.Task, results: common.Results, sizes: list[int]) -> None:
    done = {(r["sequences"], r["precision"]) for r in results.records}
    widths = columns(task.model)
    ffn, heads = BUDGET
    for n in sizes:
        for precision in PRECISIONS:
            if (n, precision) in done:
                continue
            config = PrunerConfig(ffn_keep_ratio=ffn, head_keep_ratio=heads, show_progress=False,
                                  selection_dtype=precision)
            pruner = ISpaSPPruner(task.model, config)
            model = pruner.prune(task.calibration_loader(n, labels=False))
            report = pruner.report
            tokens = report.calibration_tokens
            in_float32 = [b.name for b in report.blocks if precision == "float32" or (
                precision == "auto" and tokens >= WELL_POSED_ROWS_PER_COLUMN * widths[b.name])]
            record = {
                "sequences": n, "tokens": tokens, "precision": precision, "blocks": len(report.blocks),
                "float32_blocks": in_float32, "kept": {b.name: b.kept for b in report.blocks},
                "ridges": {b.name: b.refit_ridge for b in report.blocks}, "digest": state_digest(model),
                **task.evaluate(model), "prune_seconds": report.seconds,
                "selection_seconds": report.seconds_selection,
            }
            results.add(record)
            print(f"n={n:4d} {precision:8s} float32 blocks {len(in_float32):2d} kl={record['kl']:.6f} "
                  f"selection {record['selection_seconds']:.1f}s digest {record['digest']}", flush=True)
            del model


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["sequences"], r["precision"]): r for r in records}
    rows = []
    for r in sorted(records, key=lambda r: (r["sequences"], PRECISIONS.index(r["precision"]))):
        ref = by.get((r["sequences"], "float64"))
        same = sum(r["kept"][k] == ref["kept"][k] for k in r["kept"]) if ref else None
        rows.append({
            "n": r["sequences"], "tokens": r["tokens"], "precision": r["precision"],
            "float32": f"{len(r['float32_blocks'])}/{r['blocks']}",
            "same": "-" if same is None else f"{same}/{r['blocks']}",
            "model": "-" if ref is None else ("yes" if r["digest"] == ref["digest"] else "no"),
            "kl": r["kl"], "accuracy": common.pct(r["accuracy"]),
            "selection": f"{r['selection_seconds']:.1f}",
            "speed": f"{ref['selection_seconds'] / r['selection_seconds']:.2f}x" if ref else "-",
        })
    return rows


def findings(records: list[dict[str, Any]]) -> list[str]:
    """What the table shows, computed from the records."""
    by = {(r["sequences"], r["precision"]): r for r in records}
    sizes = sorted({r["sequences"] for r in records})
    lines = []
    for precision in ("auto", "float32"):
        pairs = [(n, by[(n, precision)], by[(n, "float64")]) for n in sizes
                 if (n, precision) in by and (n, "float64") in by]
        if not pairs:
            continue
        identical = [n for n, r, ref in pairs if r["digest"] == ref["digest"]]
        differ = [f"{n} ({sum(r['kept'][k] != ref['kept'][k] for k in r['kept'])} blocks, KL {r['kl']:.5f} vs "
                  f"{ref['kl']:.5f})" for n, r, ref in pairs if r["kept"] != ref["kept"]]
        speed = [f"{n}: {ref['selection_seconds'] / r['selection_seconds']:.2f}x" for n, r, ref in pairs]
        lines.append(f"- `{precision}`: the same pruned model as float64 (bit for bit) at "
                     f"{', '.join(map(str, identical)) or 'no size'} sequences; other groups kept at "
                     f"{'; '.join(differ) or 'no size'}. Selection speed against float64: {', '.join(speed)}.")
    return lines


def report(data: dict[str, Any]) -> str:
    table = _rows(data["records"])
    lines = [
        "## Selection precision: float64, auto (the default) and float32 (MiniLM-L6, sentence polarity)",
        "",
        f"FFN keep {BUDGET[0]} / heads keep {BUDGET[1]}; calibration = the first *n* of the same shuffled training "
        f"sentences; {data['meta'].get('threads')} threads. `auto` selects in float64 and validates the re-fit "
        f"in float32 where the calibration has at least {WELL_POSED_ROWS_PER_COLUMN:g} tokens per column of the "
        "block (MiniLM: 384 columns per attention block, 1536 per FFN block), in float64 below; `float32` does "
        "both in float32. *float32 blocks* = blocks computed (partly) in float32; *same kept* = "
        "blocks keeping the same groups as float64; *same model* = every weight bit-identical to the float64 prune "
        "(the re-fit reads the float64 statistics in every precision); selection seconds of one prune each.",
        "",
        common.markdown_table(table, [
            ("sequences", "n"), ("tokens", "tokens"), ("selection_dtype", "precision"), ("float32 blocks", "float32"),
            ("same kept", "same"), ("same model", "model"), ("KL", "kl"), ("accuracy %", "accuracy"),
            ("selection s", "selection"), ("selection speed vs float64", "speed")]),
        "",
        *findings(data["records"]),
        "",
        "`python benchmarks/selection_precision.py` (`--report-only` rebuilds this fragment from the JSON).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return common.size_sweep(argv, __doc__.splitlines()[0], NAME, SIZES, TINY_SIZES, run, report)


if __name__ == "__main__":
    raise SystemExit(main())
