"""`hf-ispasp prune`: keeps the task head, never deletes the user's files, one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_classifier
from lm_fixtures import polarity_sentences, save_tiny_causal_lm

from hf_ispasp import load_pruned
from hf_ispasp.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; a busy 2-core machine stalls 2 threads


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A random 2-layer BERT sentence classifier with the MiniLM tokenizer, and a csv of real sentences."""
    from demo.assets import polarity_csv

    root = tmp_path_factory.mktemp("cli")
    save_tiny_classifier(root / "model")
    with open(polarity_csv(), encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))[:40]
    with open(root / "data.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "sentence"])
        writer.writerows(rows)
    (root / "empty.csv").write_text("")
    return root


def _prune(setup: Path, out: Path, *extra: str, data: str = "data.csv", column: str = "sentence") -> int:
    return main(["prune", "--model", str(setup / "model"), "--data", str(setup / data), "--text-column", column,
                 "--output-dir", str(out), "--calibration-samples", "16", *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    return err[-1]


def test_prune_keeps_the_task_head(setup, tmp_path):
    out = tmp_path / "pruned"
    assert _prune(setup, out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    model = load_pruned(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.ispasp["widths"]["ffn"] == [18, 18]
    assert (out / "tokenizer_config.json").exists()  # saved in the same atomic step


def test_prune_to_a_flops_target(setup, tmp_path):
    out = tmp_path / "pruned"
    code = _prune(setup, out, "--flops-keep", "0.6", "--allocation", "uniform", "--json", str(tmp_path / "r.json"))
    assert code == 0
    budget = json.loads((out / "config.json").read_text())["ispasp"]["budget"]
    assert budget["allocation"] == "uniform" and budget["achieved"]["flops"] <= 0.6
    assert json.loads((tmp_path / "r.json").read_text())["budget"]["target"] == {"flops": 0.6}


def test_prune_refuses_a_folder_with_user_files(setup, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_data.csv").write_text("a,b\n")
    (project / "train.py").write_text("print(1)\n")
    monkeypatch.chdir(project)
    code = main(["prune", "--model", str(setup / "model"), "--data", str(setup / "data.csv"), "--text-column",
                 "sentence", "--output-dir", ".", "--calibration-samples", "8"])
    assert code == 2
    line = _error(capsys)
    assert "my_data.csv" in line and "--overwrite" in line
    assert sorted(p.name for p in project.iterdir()) == ["my_data.csv", "train.py"]
    # With --overwrite the checkpoint goes beside the user's files, which stay byte for byte.
    code = main(["prune", "--model", str(setup / "model"), "--data", str(setup / "data.csv"), "--text-column",
                 "sentence", "--output-dir", ".", "--calibration-samples", "8", "--overwrite"])
    assert code == 0
    assert (project / "my_data.csv").read_text() == "a,b\n" and (project / "train.py").read_text() == "print(1)\n"
    assert (project / "model.safetensors").exists()
    # Our own earlier output is not "foreign": re-running into it needs no flag.
    out = tmp_path / "again"
    assert _prune(setup, out) == 0 and _prune(setup, out) == 0


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_model", "no such checkpoint folder"),
        ("missing_column", "has no column 'text'"),
        ("empty_data", "is empty"),
        ("missing_data", "no such file"),
        ("bad_extension", "unsupported file type"),
        ("bad_ratio", "--ffn-keep"),
        ("allocation_without_target", "also give --flops-keep, --params-keep or --latency-keep"),
        ("infeasible_target", "ask for"),
        ("output_is_file", "is an existing file"),
        ("model_without_config", "cannot read its config.json"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(setup, tmp_path, capsys, case, expected):
    out = tmp_path / "out"
    if case == "missing_model":
        code = main(["prune", "--model", str(tmp_path / "nope"), "--data", str(setup / "data.csv"),
                     "--output-dir", str(out)])
    elif case == "missing_column":
        code = _prune(setup, out, column="text")
    elif case == "empty_data":
        code = _prune(setup, out, data="empty.csv")
    elif case == "missing_data":
        code = _prune(setup, out, data="missing.csv")
    elif case == "bad_extension":
        (tmp_path / "data.xlsx").write_text("x")
        code = main(["prune", "--model", str(setup / "model"), "--data", str(tmp_path / "data.xlsx"),
                     "--output-dir", str(out)])
    elif case == "bad_ratio":
        code = _prune(setup, out, "--ffn-keep", "1.5")
    elif case == "allocation_without_target":
        code = _prune(setup, out, "--allocation", "global")
    elif case == "infeasible_target":
        code = _prune(setup, out, "--params-keep", "0.01")
    elif case == "output_is_file":
        out.write_text("mine")
        code = _prune(setup, out)
        assert out.read_text() == "mine"
    else:
        (tmp_path / "empty_model").mkdir()
        code = main(["prune", "--model", str(tmp_path / "empty_model"), "--data", str(setup / "data.csv"),
                     "--output-dir", str(out)])
    assert code == 2
    line = _error(capsys)
    assert line.startswith("hf-ispasp prune: error:") and expected in line, line
    if case == "missing_column":
        assert "--text-column" in line and "sentence" in line
    if case != "output_is_file":
        assert not out.exists()


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory) -> Path:
    """A random 2-layer LLaMA whose tokenizer has no pad token (as LLaMA's), and a text file of real sentences."""
    root = tmp_path_factory.mktemp("cli_lm")
    sentences = polarity_sentences(120)
    save_tiny_causal_lm(root / "model", sentences, pad_token=False)
    (root / "text.txt").write_text("\n\n".join(sentences) + "\n", encoding="utf-8")  # blank lines are skipped
    (root / "short.txt").write_text("one short line\n", encoding="utf-8")
    return root


def test_prune_causal_lm_calibrates_on_text_chunks(lm_setup, tmp_path):
    out, report = tmp_path / "pruned", tmp_path / "report.json"
    code = main(["prune", "--model", str(lm_setup / "model"), "--data", str(lm_setup / "text.txt"), "--output-dir",
                 str(out), "--calibration-samples", "12", "--block-size", "16", "--head-keep", "0.5",
                 "--gqa-groups", "query", "--json", str(report)])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # 12 chunks of exactly 16 tokens: concatenated text, no padding (the tokenizer has no pad token).
    assert json.loads(report.read_text())["calibration_tokens"] == 12 * 16
    model = load_pruned(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    widths = model.config.ispasp["widths"]
    assert widths["ffn"] == [18, 18] and widths["heads"] == [2, 2] and widths["q_per_kv"] == [1, 1]  # query groups
    assert model.config.ispasp["pruner_config"]["gqa_groups"] == "query"
    assert (out / "tokenizer_config.json").exists()
    with torch.no_grad():
        assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_prune_causal_lm_with_too_little_text_is_a_user_error(lm_setup, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", "--model", str(lm_setup / "model"), "--data", str(lm_setup / "short.txt"), "--output-dir",
                 str(out), "--block-size", "16"])
    assert code == 2
    line = _error(capsys)
    assert line.startswith("hf-ispasp prune: error:") and "fewer than one chunk" in line and "--block-size" in line
    assert not out.exists()
