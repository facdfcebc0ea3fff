"""The README's quick start runs as written and the set-up commands match CI."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_quick_start_runs(tmp_path, monkeypatch):
    section = README.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    pruned, same = namespace["pruned"], namespace["same"]
    assert (tmp_path / "minilm-pruned" / "config.json").exists()
    batch = namespace["tokenizer"](["not bad at all"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(same(**batch).logits, pruned(**batch).logits)
    report = namespace["pruner"].report
    assert report.flops_after <= 0.5 * report.flops_before and report.budget["allocation"] == "global"
    assert report.layer_params_after < 0.8 * report.layer_params_before


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1].strip()
    assert ci == "bash scripts/test.sh"
    assert "bash scripts/test.sh    # the test suite" in README
    assert "bash scripts/demo.sh    # main job" in README
