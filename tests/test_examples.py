"""The example scripts end to end on tiny local datasets (real sentences, tiny random models): swap the data only."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_classifier
from lm_fixtures import polarity_sentences, save_tiny_causal_lm, write_text_files

pytestmark = pytest.mark.usefixtures("one_thread")  # the scripts run with OMP_NUM_THREADS=1 too

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "prune_text_classification.py"
LM_SCRIPT = ROOT / "examples" / "prune_causal_lm.py"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A random 2-layer BERT classifier saved with the MiniLM tokenizer, and csv files of polarity sentences."""
    from demo.assets import polarity_csv

    root = tmp_path_factory.mktemp("examples")
    save_tiny_classifier(root / "model")
    with open(polarity_csv(), encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    # Both labels ("1" / "-1", raw values: the script maps them to ids), alternating, so that the train split
    # (30 + 30) and the dev split (10 + 10) are balanced and a dev accuracy means something.
    rows = [row for pair in zip(rows[:40], rows[-40:], strict=True) for row in pair]
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


def _dev_metrics(root: Path, out: Path) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the saved model on dev.csv, computed here, not by the script."""
    import datasets
    from transformers import AutoTokenizer

    from hf_ispasp import load_pruned
    from hf_ispasp.classification import predict_logits

    model = load_pruned(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    dev = datasets.load_dataset("csv", data_files=str(root / "dev.csv"), split="train")
    label_ids = {name: i for i, name in enumerate(sorted({str(v) for v in dev["label"]}))}  # as the script maps
    labels = torch.tensor([label_ids[str(v)] for v in dev["label"]])
    tokenized = dev.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True,
                        remove_columns=dev.column_names)
    with torch.no_grad():
        logits = predict_logits(model, tokenized, tokenizer, batch_size=16)  # the script's eval batching
    accuracy = float((logits.argmax(-1) == labels).double().mean())  # exact k/n, as the accuracy module
    return accuracy, float(torch.nn.functional.cross_entropy(logits, labels))


def test_text_classification_plain_python(tiny_setup, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), *_args(tiny_setup, out, "--distill_weight", "0.5", "--do_train_dense")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = _check_output(out)["metrics"]
    dense, pruned, tuned = metrics["dense"], metrics["pruned"], metrics["fine-tuned"]
    # A random 2-layer model after 3 steps is at chance, so accuracy bounds would be luck; instead the numbers
    # must be the saved model's own: re-evaluated here, independently of the script, they agree exactly.
    accuracy, loss = _dev_metrics(tiny_setup, out)
    assert tuned["finetuned_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert tuned["finetuned_loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    # Fine-tuning changed the pruned model: a no-op trainer would report the one-shot loss again.
    assert tuned["finetuned_loss"] != pruned["pruned_loss"] and tuned["epoch"] > 0
    assert all(math.isfinite(m) for m in (dense["dense_loss"], pruned["pruned_loss"], tuned["finetuned_loss"]))


def _load_example(path: Path, monkeypatch):
    name = f"example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_help_works(path, capsys, monkeypatch):
    """``--help`` of every example script prints its usage (a bare ``%`` in a help string crashes argparse)."""
    module = _load_example(path, monkeypatch)
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["prune", "--help"]], ids=" ".join)
def test_cli_help_works(argv, capsys):
    from hf_ispasp.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


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


# Causal LM ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory) -> Path:
    """A random 2-layer LLaMA (4 query / 2 KV heads, FFN 37) with a word-level tokenizer, and .txt files."""
    root = tmp_path_factory.mktemp("lm_example")
    sentences = polarity_sentences(240)
    save_tiny_causal_lm(root / "model", sentences)
    write_text_files(root, sentences)
    return root


def _lm_args(root: Path, out: Path) -> list[str]:
    return [
        "--model_name_or_path", str(root / "model"), "--train_file", str(root / "train.txt"),
        "--validation_file", str(root / "validation.txt"), "--output_dir", str(out), "--block_size", "32",
        "--max_eval_samples", "16",  # whole batches on 1 and 2 processes: the Trainer pads no eval batch
        "--num_calibration_samples", "32", "--calibration_batch_size", "8", "--ffn_keep_ratio", "0.5",
        "--head_keep_ratio", "0.5", "--gqa_groups", "kv", "--do_train", "--max_steps", "3",
        "--distill_weight", "0.5", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm",
        "true", "--seed", "0", "--prompt", "the movie is", "--max_new_tokens", "8", "--latency_repeats", "2",
    ]


@pytest.fixture(scope="module")
def lm_run(lm_setup, tmp_path_factory) -> tuple[Path, str]:
    """The causal-LM example run once with plain python: its output folder and its stdout."""
    out = tmp_path_factory.mktemp("lm_run") / "out"
    proc = subprocess.run([sys.executable, str(LM_SCRIPT), *_lm_args(lm_setup, out)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _saved_lm_loss(root: Path, out: Path) -> float:
    """Mean next-token NLL of the saved model on validation.txt, computed here, not by the script."""
    import datasets
    from transformers import AutoTokenizer

    from hf_ispasp import load_pruned
    from hf_ispasp.language_modeling import chunk_text

    model = load_pruned(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    raw = datasets.load_dataset("text", data_files=str(root / "validation.txt"), split="train")
    ids = torch.tensor(chunk_text(raw, tokenizer, 32)["input_ids"][:16])  # --max_eval_samples 16
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_causal_lm_plain_python(lm_setup, lm_run):
    from transformers import AutoTokenizer

    from hf_ispasp import load_pruned
    from hf_ispasp.language_modeling import greedy_sample

    out, stdout = lm_run
    results = json.loads((out / "pruning_results.json").read_text())
    ppl = results["perplexity"]
    assert set(ppl) == {"dense", "pruned", "fine-tuned"} and all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["fine-tuned"] != ppl["pruned"]  # training changed the model
    # 1 of 2 KV heads (with both its query heads), round(0.5 * 37) = 18 neurons.
    assert results["widths"]["heads"] == [1, 1] and results["widths"]["ffn"] == [18, 18]
    assert results["pruner_config"]["gqa_groups"] == "kv" and results["pruner_config"]["max_calibration_samples"] == 32
    assert results["pruning"]["calibration_tokens"] == 32 * 32
    assert results["parameters"]["pruned"] < results["parameters"]["dense"] and results["latency"]["speedup"] > 0
    # The saved checkpoint is the model the script evaluated: its perplexity, recomputed here, and its greedy
    # sample are the script's.
    assert math.exp(_saved_lm_loss(lm_setup, out)) == pytest.approx(ppl["fine-tuned"], rel=1e-4)
    model = load_pruned(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.model.layers[0].mlp.down_proj.in_features == 18
    sample = greedy_sample(model, AutoTokenizer.from_pretrained(out), "the movie is", 8)
    assert sample == results["samples"]["fine-tuned"] and sample.startswith("the movie is")
    assert "| perplexity |" in stdout and f"[fine-tuned] {sample}" in stdout and "[dense] the movie is" in stdout
    card = (out / "README.md").read_text()
    assert "arXiv:2112.04905" in card and "perplexity" in card


@pytest.mark.slow
def test_causal_lm_two_processes_select_as_one(lm_setup, lm_run, tmp_path):
    """accelerate launch on 2 CPU processes: sharded calibration selects and re-fits as one process does."""
    out = tmp_path / "out"
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                "29743"]
    proc = subprocess.run([*launcher, str(LM_SCRIPT), *_lm_args(lm_setup, out)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((out / "pruning_results.json").read_text())
    one = json.loads((lm_run[0] / "pruning_results.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["widths"] == one["widths"]
    assert 2 * two["pruning"]["calibration_tokens"] == one["pruning"]["calibration_tokens"]  # rank 0's half
    # Same groups and re-fit: the one-shot model's perplexity and greedy sample agree (float32 sums in another
    # order); the kept groups are the same.
    assert two["perplexity"]["dense"] == pytest.approx(one["perplexity"]["dense"], rel=1e-6)
    assert two["perplexity"]["pruned"] == pytest.approx(one["perplexity"]["pruned"], rel=1e-5)
    assert two["samples"]["pruned"] == one["samples"]["pruned"]
    assert [b["kept"] for b in two["pruning"]["blocks"]] == [b["kept"] for b in one["pruning"]["blocks"]]
    assert math.isfinite(two["perplexity"]["fine-tuned"])
