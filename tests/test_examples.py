"""The example scripts end to end on a tiny local dataset (real sentences, tiny random model): swap the data only."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "prune_text_classification.py"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A random 2-layer BERT classifier saved with the MiniLM tokenizer, and csv files of polarity sentences."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from hf_ispasp.assets import minilm_path, polarity_csv

    root = tmp_path_factory.mktemp("examples")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(polarity_csv(), encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = rows[:40] + rows[-40:]  # both labels ("1" / "-1", raw values: the script maps them to ids)
    rows = rows[::2] + rows[1::2]
    for name, part in (("train.csv", rows[:60]), ("dev.csv", rows[60:])):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "text"])
            writer.writerows(part)
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(root / "model"), "--train_file", str(root / "train.csv"),
        "--validation_file", str(root / "dev.csv"), "--output_dir", str(out), "--max_seq_length", "32",
        "--ffn_keep_ratio", "0.5", "--head_keep_ratio", "0.5", "--calibration_samples", "40",
        "--calibration_batch_size", "8", "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu",
        "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _check_output(out: Path) -> dict:
    from hf_ispasp import load_pruned

    results = json.loads((out / "pruning_results.json").read_text())
    assert set(results["metrics"]) == {"dense", "pruned", "fine-tuned"}
    assert results["widths"]["heads"] == [2, 2] and results["widths"]["ffn"] == [18, 18]  # round(0.5 * 37) = 18
    assert results["pruning"]["params_after"] < results["pruning"]["params_before"]
    model = load_pruned(out)
    assert model.bert.encoder.layer[1].intermediate.dense.out_features == 18
    card = (out / "README.md").read_text()
    assert "arXiv:2112.04905" in card and "attention-head keep ratio: 0.5" in card
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    assert model(input_ids=ids).logits.shape == (1, 2)
    return results


def test_text_classification_plain_python(tiny_setup, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), *_args(tiny_setup, out, "--distill_weight", "0.5", "--do_train_dense")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _check_output(out)
    assert 0.0 <= results["metrics"]["fine-tuned"]["finetuned_accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["accelerate", "torchrun"])
def test_text_classification_two_processes_iterative(tiny_setup, tmp_path, launch):
    out = tmp_path / "out"
    bindir = Path(sys.executable).parent
    if launch == "accelerate":
        launcher = [str(bindir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                    "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29741"]
    else:
        launcher = [str(bindir / "torchrun"), "--nproc_per_node", "2", "--master_port", "29742"]
    cmd = [*launcher, str(SCRIPT), *_args(tiny_setup, out, "--distill_weight", "0.5", "--hidden_weight", "0.1",
                                          "--iterative_steps", "2", "--iterative_max_steps", "1")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _check_output(out)["num_processes"] == 2
