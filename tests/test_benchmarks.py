"""Every benchmark script runs end to end on a tiny setting and writes JSON + a markdown fragment."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


def _load(tmp_path: Path, name: str) -> dict:
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.md").read_text().startswith("## ")
    assert data["meta"]["tiny"] is True
    return data


def test_synthetic(tmp_path: Path) -> None:
    import synthetic

    assert synthetic.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    data = _load(tmp_path, "synthetic")
    recs = data["records"]
    assert {r["rule"] for r in recs} == set(synthetic.RULES)
    # the residual from the streamed statistics is the residual on the samples
    assert max(r["stats_vs_direct_max_error"] for r in recs) < 1e-8
    # planted dead units: the paper's rule reaches zero residual once every live unit fits in the budget
    paper = next(r for r in recs if r["mode"] == "units" and r["p"] == 0.3 and r["rule"].startswith("ispasp-paper"))
    live = round(0.3 * paper["hidden"])
    assert all(v < 1e-12 for s, v in zip(paper["sizes"], paper["relative_residual"], strict=True) if s >= live)
    curve = paper["relative_residual"]
    assert all(b >= a - 1e-12 for a, b in zip(curve[1:], curve[:-1], strict=True))
    assert (tmp_path / "synthetic_units.png").stat().st_size > 1000


def test_selection_rules(tmp_path: Path) -> None:
    import selection_rules

    assert selection_rules.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    data = _load(tmp_path, "selection_rules")
    keys = {(r["rule"], r["refit"]) for r in data["records"]}
    assert keys == {(rule, refit) for rule in selection_rules.RULES for refit in (False, True)}
    for r in data["records"]:
        assert 0 < r["flops_ratio"] < 1 and r["kl"] >= 0 and 0 <= r["agreement"] <= 1
    assert {r["rule"] for r in data["finetune"]} >= {"dense", selection_rules.DEFAULT_RULE[0]}
    # a second run resumes: nothing is pruned again
    before = len(data["records"])
    assert selection_rules.main(["--tiny", "--output-dir", str(tmp_path), "--no-finetune"]) == 0
    assert len(json.loads((tmp_path / "selection_rules.json").read_text())["records"]) == before


def test_peer_torch_pruning(tmp_path: Path) -> None:
    pytest.importorskip("torch_pruning")
    import peer_torch_pruning

    assert peer_torch_pruning.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    recs = _load(tmp_path, "peer_torch_pruning")["records"]
    assert {r["method"] for r in recs} >= {"Torch-Pruning magnitude", "Torch-Pruning taylor"}
    assert len({r["widths"] for r in recs}) == 1  # every method prunes to the same widths
    ours = [r for r in recs if r["method"].startswith("hf_ispasp")]
    assert ours and all(r["reload_ok"] for r in ours), [r["reload_error"] for r in ours]


def test_pruning_speed(tmp_path: Path) -> None:
    import pruning_speed

    assert pruning_speed.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    (rec,) = _load(tmp_path, "pruning_speed")["records"]
    assert rec["ratio"] > 1 and rec["forward_s"] > 0
    # the naive reference implementation selects exactly what the streamed statistics select
    assert rec["blocks_same_support"] == rec["blocks"]


def test_engine_shapes(tmp_path: Path) -> None:
    import engine_shapes

    assert engine_shapes.main(["--tiny", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    (rec,) = _load(tmp_path, "engine_shapes")["records"]
    assert rec["ratio"] > 1 and rec["forward_s"] > 0 and rec["pruned_mb"] < rec["model_mb"]
    # where the memory peaks: every marked phase ran, and the largest is the prune's peak
    phases = rec["peak_by_phase_mb"]
    assert {"statistics", "propagate", "select_residual", "validate_1", "other"} <= set(phases)
    assert max(phases.values()) == rec["peak_extra_allocated_mb"]
    # the device path (here the CPU itself) selects what the float64 CPU reference selects
    assert rec["same_as_cpu"] == rec["blocks"]


def test_phase_peaks_attribute_memory_to_phases() -> None:
    """PhasePeaks books every byte held at once to the phase it falls in (CPU: profiler events between instant
    marks, with Python's frees inside a phase counted where they happen); wrapped functions are phases, and the
    wrapping is undone."""
    import types

    import torch
    from peak_memory import PhasePeaks

    peaks = PhasePeaks(torch.device("cpu"))
    kept = []
    space = types.SimpleNamespace(make=lambda n: torch.ones(n))
    original = space.make
    undo = peaks.wrap(space, "make", "made")
    assert space.make is not original
    assert peaks.wrap(space, "missing") is not None  # another tree's missing name: left alone

    def run() -> torch.Tensor:
        with peaks.phase("a"):
            kept.append(torch.ones(2**18))  # 1 MB, kept
        with peaks.phase("b"):
            temporary = torch.ones(2**20)  # 4 MB, freed inside the phase
            del temporary
        kept.append(space.make(2**17))  # 0.5 MB, a wrapped call
        return torch.ones(2**19)  # 2 MB, outside every phase

    peaks.run(run)
    undo()
    mb = {name: value / 2**20 for name, value in peaks.peaks.items()}
    assert mb == pytest.approx({"a": 1.0, "b": 5.0, "made": 1.5, "other": 3.5}, abs=0.05)
    assert space.make is original


def test_engine_shapes_on_the_accelerator_paths(tmp_path: Path) -> None:
    """--accelerator-paths: a CPU worker takes every code path an accelerator takes (so its memory is the GPU's),
    with the layer count overridden; the CPU reference is skipped (it would take them too)."""
    import engine_shapes

    argv = ["--tiny", "--device", "cpu", "--accelerator-paths", "--layers", "1", "--output-dir", str(tmp_path)]
    assert engine_shapes.main(argv) == 0
    data = _load(tmp_path, "engine_shapes")
    (rec,) = data["records"]
    assert set(rec["accelerator_paths"]) == {"_panel_block", "_defers_rows", "_by_blocks", "_mirrors_weight_gram",
                                             "_factors_energy", "residual_threshold"}
    assert "same_as_cpu" not in rec and rec["peak_by_phase_mb"]["select_residual"] > 0
    assert "accelerator's code paths" in data["meta"]["where"] and "num_hidden_layers=1" in data["meta"]["where"]


def test_selection_profile(tmp_path: Path) -> None:
    import selection_profile

    argv = ["--device", "cpu", "--shapes", "tiny-ffn", "--profile", "tiny-ffn", "--tokens", "512", "--repeats", "1",
            "--dtype", "float64", "float32", "--output-dir", str(tmp_path)]
    assert selection_profile.main(argv) == 0
    records = json.loads((tmp_path / "selection_profile.json").read_text())["records"]
    assert [r["dtype"] for r in records] == ["float64", "float32"]
    for rec in records:
        phases = rec["phases"]
        path = {k: v for k, v in phases.items() if k not in ("total", "refit_solved")}
        assert phases["total"] == pytest.approx(sum(path.values()))
        # the re-fit solved afresh (as after a float32 selection) is timed beside the path, not in its total
        assert ("refit_solved" in phases) == (rec["chosen"]["ridge"] is not None)
        assert phases.get("refit_solved", 1.0) > 0
        assert rec["primitives_at_kept_width"]["eigh"] > 0 and "profile" in rec
    # the two precisions choose the same groups on this well-conditioned block
    assert records[0]["kept"] == records[1]["kept"]


def test_engine_profile(tmp_path: Path) -> None:
    """The whole-prune profile (its CPU mode) counts the host reads the selection makes and names the busiest
    operators."""
    import engine_profile

    argv = ["--device", "cpu", "--shape", "tiny", "--sequences", "8", "--length", "8", "--batch-size", "4",
            "--top", "3", "--sites-sequences", "4", "--output-dir", str(tmp_path)]
    assert engine_profile.main(argv) == 0
    (rec,) = json.loads((tmp_path / "engine_profile.json").read_text())["records"]
    assert rec["read_sites_sequences"] == 4  # the counted prune: one batch of the two
    assert rec["prune_s"] > 0 and rec["profiled_prune_s"] > 0 and rec["device_busy_s"] == 0
    assert rec["host_syncs"]["aten::item"] > 0 and len(rec["by_host_time"]) == 3 and rec["by_device_time"] == []
    assert "| tiny | float32 |" in (tmp_path / "engine_profile.md").read_text()
    # the read sites name the library's own frames (here CPU reads; on a GPU the waits)
    assert rec["read_sites"] and all(".py:" in row["site"] and row["count"] > 0 for row in rec["read_sites"])


def test_read_sites_count_implicit_waits() -> None:
    """Calls that wait for a CUDA device without returning a value (data-dependent shapes, checked factorisations)
    are counted as ``wait`` sites on any device; value-free calls with static shapes are not."""
    import engine_profile
    import torch

    x = torch.randn(6, 6)

    def run() -> None:
        torch.nonzero(x > 0)
        _ = x[x > 0]
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]), dim=0)
        x.repeat_interleave(2, dim=0)  # a static shape: no wait
        torch.linalg.eigh(x @ x.T)
        torch.linalg.solve_ex(x @ x.T + torch.eye(6), x)  # the status is returned, not checked: no wait
        x.sum().item()

    sites = {row["site"]: row["count"] for row in engine_profile.read_sites(run, x.device, 50)}
    assert sites == {"wait nonzero": 1, "wait __getitem__": 1, "wait repeat_interleave": 1, "wait linalg_eigh": 1,
                     "item": 1}
    # a device named with its index counts the tensors that report none, and the reverse ('cuda' against the
    # 'cuda:0' of every CUDA tensor counted nothing on the H200)
    indexed = {row["site"]: row["count"] for row in engine_profile.read_sites(run, torch.device("cpu", 0), 50)}
    assert indexed == sites
    # copies onto another device ('meta' stands in for an accelerator here): host tensors and Python data
    meta = torch.device("meta")

    def copies() -> None:
        x.to(meta)
        x.to(device=meta, dtype=torch.float64)
        torch.tensor([1.0, 2.0], device=meta)
        torch.tensor([1.0, 2.0])  # stays on the host: no copy
        x.to(torch.float64)  # no device change
        torch.empty(3, device=meta).to(meta)  # already there

    sites = {row["site"]: row["count"] for row in engine_profile.read_sites(copies, meta, 50)}
    assert sites == {"h2d to": 2, "h2d tensor": 1}


def test_inference_speed(tmp_path: Path) -> None:
    import inference_speed

    assert inference_speed.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    data = _load(tmp_path, "inference_speed")
    (rec,) = data["records"]
    # No timed assertion (the machine is shared): the bookkeeping of the measurement must be consistent.
    assert 0 < rec["flops_ratio"] < 1 and rec["flops_speedup"] == pytest.approx(1 / rec["flops_ratio"])
    for batch in (1, 32):
        b = {key[len(f"b{batch}_"):]: value for key, value in rec.items() if key.startswith(f"b{batch}_")}
        assert b["pairs"] >= 2 and b["dense_ms"] > 0 and b["pruned_ms"] > 0
        # the median per-pair ratio sits inside its inter-quartile range, which sits inside the pairs' range
        assert b["speedup_min"] <= b["speedup_q25"] <= b["speedup"] <= b["speedup_q75"] <= b["speedup_max"]
        # the ratio of the two medians is bracketed by the per-pair ratios (the median is monotone)
        assert b["speedup_min"] * (1 - 1e-9) <= b["dense_ms"] / b["pruned_ms"] <= b["speedup_max"] * (1 + 1e-9)
    assert rec["throughput_pruned_seq_s"] == pytest.approx(32_000 / rec["b32_pruned_ms"])
    assert rec["b32_speedup_over_flops_speedup"] == pytest.approx(rec["b32_speedup"] / rec["flops_speedup"])
    assert "matmul (linear layers)" in data["profile_main_budget_batch32_ms"]["dense"]
    text = (tmp_path / "inference_speed.md").read_text()
    assert f"{rec['b1_speedup']:.2f} ({rec['b1_speedup_q25']:.2f}-{rec['b1_speedup_q75']:.2f})" in text


def test_make_report(tmp_path: Path) -> None:
    import make_report

    results = tmp_path / "results"
    results.mkdir()
    (results / "inference_speed.md").write_text("## Inference\n\n![plot](plot.png)\n")
    (results / "synthetic.md").write_text("## Synthetic\n")
    (results / "vision_x.md").write_text("## Vision\n")
    out = tmp_path / "BENCHMARKS.md"
    assert make_report.main(["--results-dir", str(results), "--output", str(out)]) == 0
    text = out.read_text()
    assert text.index("## Synthetic") < text.index("## Inference") < text.index("## Vision")
    assert "](results/plot.png)" in text
    assert "`selection_rules`" in text  # listed as not run


def test_calibration_size(tmp_path: Path) -> None:
    import calibration_size

    assert calibration_size.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    data = _load(tmp_path, "calibration_size")
    keys = {(r["sequences"], r["variant"]) for r in data["records"]}
    assert keys == {(n, v) for n in calibration_size.TINY_SIZES for v in calibration_size.ORDER}
    for r in data["records"]:
        assert 0 < r["flops_ratio"] < 1 and r["kl"] >= 0 and 0 <= r["agreement"] <= 1
    # one calibration sequence: no held-out half, so the default re-fits nothing
    (one,) = [r for r in data["records"] if r["sequences"] == 1 and r["variant"] == calibration_size.DEFAULT]
    assert "0.0001" not in one["ridges"] and "none x" in one["ridges"]
    assert calibration_size.main(["--report-only", "--output-dir", str(tmp_path)]) == 0
    assert "same selection, no re-fit" in (tmp_path / "calibration_size.md").read_text()


def test_selection_precision(tmp_path: Path) -> None:
    import selection_precision as bench

    assert bench.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    data = _load(tmp_path, "selection_precision")
    by = {(r["sequences"], r["precision"]): r for r in data["records"]}
    assert set(by) == {(n, p) for n in bench.TINY_SIZES for p in bench.PRECISIONS}
    for n in bench.TINY_SIZES:
        assert by[(n, "float64")]["float32_blocks"] == []
        assert len(by[(n, "float32")]["float32_blocks"]) == by[(n, "float32")]["blocks"]
        auto = by[(n, "auto")]
        if auto["kept"] == by[(n, "float64")]["kept"] and auto["ridges"] == by[(n, "float64")]["ridges"]:
            assert auto["digest"] == by[(n, "float64")]["digest"]  # the re-fit reads the float64 statistics
    assert bench.main(["--report-only", "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "selection_precision.md").read_text()
    assert "| same model |" in text and "`auto`: the same pruned model as float64" in text


def test_decoder_perplexity(tmp_path: Path, monkeypatch) -> None:
    import decoder_perplexity

    monkeypatch.setenv("HF_ISPASP_CACHE", str(tmp_path / "cache"))
    assert decoder_perplexity.main(["--tiny", "--output-dir", str(tmp_path), "--models", "llama"]) == 0
    data = _load(tmp_path, "decoder_perplexity")
    one_shot = [r for r in data["records"] if r.get("stage") == "one-shot"]
    assert {r["rule"] for r in one_shot} == set(decoder_perplexity.RULES)
    assert {r["target"] for r in one_shot} == set(decoder_perplexity.targets(tiny=True))
    for r in one_shot:  # every rule at the same widths, near the budgeted share of the layer parameters
        assert abs(r["layer_params_removed"] - r["target"]) < 0.1 and r["ppl"] > 1
    widths = {(r["target"], str(r["widths"]["heads"]), str(r["widths"]["ffn"])) for r in one_shot}
    assert len(widths) == len(decoder_perplexity.targets(tiny=True))  # FLAP's added biases aside, the same model sizes
    assert {r["rule"] for r in data["records"] if r.get("stage") == "fine-tuned"} >= {decoder_perplexity.DEFAULT}
    timing = data["timing"][0]
    assert timing["ratio"] > 0 and timing["peak_extra_host_mb"] >= 0


def test_engine_shapes_decoder(tmp_path: Path) -> None:
    import engine_shapes

    argv = ["--device", "cpu", "--shape", "tiny-llama", "--sequences", "8", "--length", "16", "--repeats", "1",
            "--reference", "8", "--output-dir", str(tmp_path)]
    assert engine_shapes.main(argv) == 0
    (rec,) = json.loads((tmp_path / "engine_shapes.json").read_text())["records"]
    assert rec["shape"] == "tiny-llama" and rec["pruned_mb"] < rec["model_mb"]
    assert rec["same_as_cpu"] == rec["blocks"]  # the selection of the CPU float64 reference


@pytest.mark.slow  # four exports of about 15 s each on a shared 2-core machine; tests/test_onnx.py is the fast check
def test_onnx_latency(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import onnx_latency

    assert onnx_latency.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    recs = _load(tmp_path, "onnx_latency")["records"]
    assert [(r["model"], r["batch"]) for r in recs] == [(m, b) for m, bs in onnx_latency.BATCHES.items() for b in bs]
    for r in recs:
        # onnxruntime computes what PyTorch computes, at batch sizes and lengths the export never saw
        assert r["checks_ok"] and max(r["dense_max_abs_diff"], r["pruned_max_abs_diff"]) <= r["atol"]
        assert r["pruned_params"] < r["dense_params"] and r["pruned_mb"] < r["dense_mb"]
        assert r["speedup_min"] <= r["speedup_q25"] <= r["speedup"] <= r["speedup_q75"] <= r["speedup_max"]
        assert r["pairs"] >= 2 and r["dense_ms"] > 0 and r["pruned_ms"] > 0 and r["flops_speedup"] > 1
    text = (tmp_path / "onnx_latency.md").read_text()
    assert f"{recs[0]['speedup']:.2f} ({recs[0]['speedup_q25']:.2f}-{recs[0]['speedup_q75']:.2f})" in text


@pytest.mark.slow  # four loads, each in a fresh process (about 10 s each on a shared 2-core machine)
def test_load_memory(tmp_path: Path) -> None:
    import load_memory

    assert load_memory.main(["--tiny", "--repeats", "1", "--output-dir", str(tmp_path)]) == 0
    recs = _load(tmp_path, "load_memory")["records"]
    assert {r["method"] for r in recs} == set(load_memory.METHODS)
    for r in recs:
        assert r["checkpoint"] == "remote code" and r["finite"]  # non-uniform widths: the remote-code path
        assert 0 < r["size_mb"] < r["dense_mb"] and r["peak_extra_mb"] > 0


@pytest.mark.slow  # three tiny models, two allocations, prune + fine-tune + latency each: about 2 minutes
def test_budget_allocation(tmp_path: Path, monkeypatch) -> None:
    import budget_allocation

    monkeypatch.setenv("HF_ISPASP_CACHE", str(tmp_path / "cache"))
    argv = ["--tiny", "--targets", "0.95", "--output-dir", str(tmp_path)]  # the tiny LLaMA is mostly its LM head
    assert budget_allocation.main(argv) == 0
    data = _load(tmp_path, "budget_allocation")
    recs = data["records"]
    points = {(r["model"], r["allocation"], r["stage"]) for r in recs if r["stage"] != "dense"}
    assert points == {(m, a, s) for m in budget_allocation.MODELS for a in budget_allocation.ALLOCATIONS
                      for s in ("one-shot", "fine-tuned")}
    for r in (r for r in recs if r["stage"] == "one-shot"):
        dense = next(d for d in recs if d["model"] == r["model"] and d["stage"] == "dense")
        # the target is met (the tiny BERT has 4 heads: coarse steps), the widths name every block, some is cut
        assert 0.5 < r["flops_ratio"] <= 0.95 + 1e-9 and r["flops_ratio"] == pytest.approx(r["predicted"]["flops"])
        assert set(r["widths"]) == set(dense["blocks"])
        assert any(r["widths"][n] < b["groups"] for n, b in dense["blocks"].items())
        lat = r["latency"]
        assert lat["speedup_q25"] <= lat["speedup"] <= lat["speedup_q75"] and lat["pruned_ms"] > 0
    assert len(data["comparisons"]) == 2 * len(budget_allocation.MODELS)
    assert {c["winner"] for c in data["comparisons"]} <= {"global", "uniform", "tie"}
    assert (tmp_path / "budget_allocation_widths.png").stat().st_size > 1000
    assert "Goal 'global beats uniform" in (tmp_path / "budget_allocation.md").read_text()
    # resuming measures nothing again; the report rebuilds from the JSON alone
    assert budget_allocation.main([*argv, "--resume", "--models", "minilm"]) == 0
    assert len(json.loads((tmp_path / "budget_allocation.json").read_text())["records"]) == len(recs)
    # timed again from the recorded widths alone: the dense model cut to them costs what the pruned model did
    assert budget_allocation.main([*argv, "--latency-only", "--models", "minilm"]) == 0
    recs = json.loads((tmp_path / "budget_allocation.json").read_text())["records"]
    for r in (r for r in recs if r["model"] == "minilm" and r["stage"] == "one-shot"):
        assert r["latency"]["flops_ratio"] == pytest.approx(r["flops_ratio"]) and r["latency"]["threads"] == 1
    text = (tmp_path / "budget_allocation.md").read_text()
    assert budget_allocation.main(["--report-only", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "budget_allocation.md").read_text() == text and "![kept fraction" in text


def test_gradual_pruning(tmp_path: Path) -> None:
    import gradual_pruning

    assert gradual_pruning.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    recs = _load(tmp_path, "gradual_pruning")["records"]
    by = {r["method"]: r for r in recs}
    one, gradual = by["one-shot + fine-tune"], by["gradual (3 prunes)"]
    assert gradual["pruned_at"] == [0, 2, 4]
    assert one["widths"] == gradual["widths"]  # the schedule ends at the one-shot budget
    assert one["flops_ratio"] == pytest.approx(gradual["flops_ratio"]) and one["flops_ratio"] < 1
    assert gradual["params_after_each"] == sorted(gradual["params_after_each"], reverse=True)
    assert gradual["seconds"] > gradual["prune_seconds"] > 0
    assert "| gradual (3 prunes) |" in (tmp_path / "gradual_pruning.md").read_text()


@pytest.mark.slow  # two engine_shapes runs in subprocesses: about 30 s on a shared 2-core machine
def test_gpu_check_script_plumbing(tmp_path: Path) -> None:
    """The prepared device check runs end to end (its --tiny CPU mode: same steps, tiny shapes) and writes the
    fragments it names."""
    import os
    import subprocess

    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--tiny"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, shape in (("engine_shapes_check_tiny", "tiny"), ("engine_shapes_check_tiny_llama", "tiny-llama")):
        (record,) = json.loads((tmp_path / f"{name}.json").read_text())["records"]
        assert record["shape"] == shape and record["pruned_mb"] < record["model_mb"]
        assert (tmp_path / f"{name}.md").read_text().startswith("## ")


def test_engine_shapes_alternates_configs_and_engines_within_rounds(tmp_path: Path, monkeypatch) -> None:
    """Every round runs each config with each engine, the next round in reverse order (ABBA): two configs are
    measured side by side, not one whole run after the other."""
    import subprocess
    import types

    import engine_shapes

    order = []

    def fake_run(cmd, **kwargs):
        order.append((cmd[cmd.index("--config") + 1], cmd[cmd.index("--engine") + 1], "--no-memory" in cmd))
        return types.SimpleNamespace(returncode=1, stdout="", stderr="not run")

    monkeypatch.setattr(subprocess, "run", fake_run)
    argv = ["--tiny", "--device", "cpu", "--output-dir", str(tmp_path), "--baseline-path", str(tmp_path),
            "--config", "default", "selection_dtype=float32", "--rounds", "2"]
    assert engine_shapes.main(argv) == 1  # nothing measured
    first = [("default", "current"), ("default", "before"), ("selection_dtype=float32", "current"),
             ("selection_dtype=float32", "before")]
    assert [(c, e) for c, e, _ in order] == first + first[::-1]
    assert [memory for *_, memory in order] == [False] * 4 + [True] * 4  # memory phases in the first round only


def test_selection_profile_against_a_baseline_tree(tmp_path: Path) -> None:
    """--baseline-path: both engines run in worker processes in alternation, and each row pools an engine's repeats
    over the rounds (here the baseline is this tree itself)."""
    import selection_profile

    argv = ["--device", "cpu", "--shapes", "tiny-ffn", "--profile", "--tokens", "512", "--repeats", "1",
            "--dtype", "float64", "--output-dir", str(tmp_path), "--baseline-path", str(BENCH.parent),
            "--baseline-label", "this tree", "--rounds", "2"]
    assert selection_profile.main(argv) == 0
    records = json.loads((tmp_path / "selection_profile.json").read_text())["records"]
    assert [r["engine"] for r in records] == ["current", "before"]
    for rec in records:
        assert len(rec["runs"]) == 2 and rec["rounds"] == 2  # one repeat per round, pooled
        assert rec["phases"]["total"] == pytest.approx(statistics.median(run["total"] for run in rec["runs"]))
    assert records[0]["kept"] == records[1]["kept"]  # the same engine selects alike
    text = (tmp_path / "selection_profile.md").read_text()
    assert "| tiny-ffn | float64 | before |" in text and "before = this tree, alternating over 2 round(s)" in text
