"""The example scripts end to end on tiny local datasets (real sentences, tiny random models): swap the data only.

The base scripts (``examples/{text,image}_classification.py``, ``causal_lm.py``) and ``examples/by_feature/`` run
in-process with their ``get_dataloaders`` swapped for one that reads a few dozen local rows, as accelerate's
``tests/test_examples.py`` swaps in ``mocked_dataloaders``; one runs under plain ``python`` and one under
``accelerate launch`` on 2 CPU processes (slow), where the tiny files go in by ``--train_file``. The full recipes
(``prune_*.py``: HfArgumentParser, Trainer, model card) run as subprocesses.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
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


@pytest.mark.parametrize("path", sorted((ROOT / "examples").rglob("*.py")), ids=lambda p: p.name)
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


# Examples in the accelerate manner: base scripts and by_feature/ ----------------------------------------------

EXAMPLES = ROOT / "examples"
TEXT_ARGS = ["--train_steps", "2", "--calibration_samples", "40", "--batch_size", "8", "--max_length", "32",
             "--ffn_keep_ratio", "0.5", "--head_keep_ratio", "0.5", "--learning_rate", "1e-3", "--cpu"]


@pytest.fixture
def examples_path(monkeypatch):
    """``examples/`` importable (the feature scripts ``import text_classification as base``); accelerate's
    process state reset afterwards, as accelerate's own tests do, so no ``Accelerator(cpu=True)`` leaks out."""
    from accelerate.state import AcceleratorState

    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    AcceleratorState._reset_state(True)


def _base(name: str):
    return importlib.import_module(name)


def _feature(name: str, monkeypatch):
    return _load_example(EXAMPLES / "by_feature" / f"{name}.py", monkeypatch)


@pytest.fixture
def text_swap(tiny_setup, examples_path, monkeypatch) -> dict:
    """The swap: ``text_classification.get_dataloaders`` reads the 60 train / 20 dev csv rows of ``tiny_setup``;
    ``save_pruned`` is wrapped to keep the model the script saved (to compare with the reloaded checkpoint)."""
    base = _base("text_classification")
    seen: dict = {"calls": 0}

    def mocked_dataloaders(accelerator, args, tokenizer):
        seen["calls"] += 1
        files = {"train": str(tiny_setup / "train.csv"), "test": str(tiny_setup / "dev.csv")}
        return base.make_dataloaders(accelerator, args, tokenizer, datasets.load_dataset("csv", data_files=files))

    def save_pruned(model, path, **kwargs):
        seen["model"] = model
        return save(model, path, **kwargs)

    save = base.save_pruned
    monkeypatch.setattr(base, "get_dataloaders", mocked_dataloaders)
    monkeypatch.setattr(base, "save_pruned", save_pruned)
    return seen


def _text_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(root / "model"), "--output_dir", str(out), *TEXT_ARGS, *extra]


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(v) for values in metrics.values() for v in values.values())


def _check_text(out: Path, results: dict, seen: dict, stages: set[str]) -> None:
    """Metrics present and finite, results.json the returned results, the checkpoint reloads to equal logits."""
    from hf_ispasp import load_pruned

    assert seen["calls"] == 1  # the data came through the swapped loader
    assert set(results["metrics"]) == stages and _finite(results["metrics"])
    for name in stages - {"dense"}:
        if "agreement" in results["metrics"][name]:
            assert 0 <= results["metrics"][name]["agreement"] <= 1 and results["metrics"][name]["kl"] >= 0
    saved = {k: v for k, v in results.items() if k != "hub_repo"}  # the upload comes after the save
    assert json.loads((out / "results.json").read_text()) == saved
    assert results["params"]["pruned"] < results["params"]["dense"]
    reloaded = load_pruned(out).eval()
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102], [101, 2307, 2001, 1037, 3185, 102]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, seen["model"](input_ids=ids).logits)


def test_text_classification_base(tiny_setup, text_swap, tmp_path):
    base = _base("text_classification")
    out = tmp_path / "out"
    results = base.main(_text_argv(tiny_setup, out))
    _check_text(out, results, text_swap, {"dense", "pruned"})
    assert results["widths"]["heads"] == [2, 2] and results["widths"]["ffn"] == [18, 18]  # round(0.5 * 37)
    assert results["flops"]["pruned"] < results["flops"]["dense"] and results["num_processes"] == 1
    # The reported accuracy is the saved model's on dev.csv, recomputed here independently of the script.
    assert results["metrics"]["pruned"]["accuracy"] == pytest.approx(_dev_metrics(tiny_setup, out)[0], abs=1e-12)


def test_distillation_feature(tiny_setup, text_swap, tmp_path, monkeypatch):
    out = tmp_path / "out"
    results = _feature("distillation", monkeypatch).main(_text_argv(tiny_setup, out, "--distill_steps", "3"))
    _check_text(out, results, text_swap, {"dense", "pruned", "distilled"})
    metrics = results["metrics"]
    assert metrics["distilled"]["kl"] != metrics["pruned"]["kl"]  # the distillation steps changed the model
    assert metrics["distilled"]["accuracy"] == pytest.approx(_dev_metrics(tiny_setup, out)[0], abs=1e-12)


def test_gradual_pruning_feature(tiny_setup, text_swap, tmp_path, monkeypatch):
    out = tmp_path / "out"
    module = _feature("gradual_pruning", monkeypatch)
    results = module.main(_text_argv(tiny_setup, out, "--prune_at", "0", "2", "--train_steps", "4"))
    _check_text(out, results, text_swap, {"dense (before training)", "gradually pruned"})
    assert results["pruned_at"] == [0, 2]
    assert results["widths"]["heads"] == [2, 2] and results["widths"]["ffn"] == [18, 18]  # the final budget


def test_multi_process_calibration_feature_one_process(tiny_setup, text_swap, tmp_path, monkeypatch):
    out = tmp_path / "out"
    results = _feature("multi_process_calibration", monkeypatch).main(_text_argv(tiny_setup, out))
    _check_text(out, results, text_swap, {"dense", "pruned"})
    assert results["num_processes"] == 1 and results["calibration_batches_main_process"] == 5  # 40 / 8
    assert [len(kept) for kept in results["kept"]] == [2, 18, 2, 18]


def test_flops_budget_feature(tiny_setup, text_swap, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = _text_argv(tiny_setup, out, "--flops_keep_ratio", "0.6", "--allocation", "uniform")
    results = _feature("flops_budget", monkeypatch).main(argv)
    _check_text(out, results, text_swap, {"dense", "pruned"})
    achieved = results["flops"]["pruned"] / results["flops"]["dense"]
    budget = results["budget"]
    assert budget["target"] == {"flops": 0.6} and budget["allocation"] == "uniform"
    # 4 heads of a tiny model cut FLOPs in coarse steps: near the target, and the report's own count.
    assert achieved == pytest.approx(budget["achieved"]["flops"]) and achieved == pytest.approx(0.6, abs=0.1)
    assert results["widths"]["ffn"] != [18, 18]  # the budget, not the base's ratios, chose the widths


@pytest.mark.parametrize("dry_run", [False, True], ids=["push", "dry_run"])
def test_hub_upload_feature(tiny_setup, text_swap, tmp_path, monkeypatch, dry_run):
    """``--push_to_hub`` with the upload replaced by a local copy (the Hub is unreachable here), or ``--dry_run``."""
    from test_model_card import _LocalHub

    from hf_ispasp import load_pruned

    hub = _LocalHub(tmp_path, monkeypatch)
    out = tmp_path / "out"
    argv = _text_argv(tiny_setup, out, "--push_to_hub", "--hub_model_id", "me/tiny-pruned",
                      *(["--dry_run"] if dry_run else []))
    results = _feature("hub_upload", monkeypatch).main(argv)
    _check_text(out, results, text_swap, {"dense", "pruned"})
    card = (out / "README.md").read_text()
    accuracy = results["metrics"]["pruned"]["accuracy"]
    assert "arxiv.org/abs/2112.04905" in card and "sentence-polarity" in card and f"value: {accuracy}" in card
    if dry_run:
        assert hub.uploads == [] and "hub_repo" not in results
        return
    assert results["hub_repo"] == "me/tiny-pruned" and {u["repo_id"] for u in hub.uploads} == {"me/tiny-pruned"}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in hub.repo.iterdir()}
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    with torch.no_grad():
        expected = text_swap["model"](input_ids=ids).logits
        torch.testing.assert_close(load_pruned(hub.repo)(input_ids=ids).logits, expected)


def test_image_classification_base(examples_path, tmp_path, monkeypatch):
    """A tiny timm model on 96 real Fashion-MNIST images (the swapped loader), 32 x 32 pixels."""
    pytest.importorskip("timm")
    from demo.assets import fashion_mnist
    from hf_ispasp import load_pruned

    base = _base("image_classification")
    images, labels = fashion_mnist("test")

    def mocked_dataloaders(accelerator, args):
        rows = lambda s: {"image": images[s], "label": labels[s].astype("int64")}  # noqa: E731
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(slice(0, 64))),
                                    "test": datasets.Dataset.from_dict(rows(slice(64, 96)))})
        return base.make_dataloaders(args, raw)

    monkeypatch.setattr(base, "get_dataloaders", mocked_dataloaders)
    out = tmp_path / "out"
    results = base.main(["--model", "mobilenetv2_035", "--image_size", "32", "--batch_size", "16", "--train_steps",
                         "2", "--calibration_samples", "32", "--ffn_keep_ratio", "0.5", "--output_dir", str(out),
                         "--cpu"])
    assert set(results["metrics"]) == {"dense", "pruned"} and _finite(results["metrics"])
    assert set(results["metrics"]["pruned"]) == {"accuracy", "agreement", "kl", "relative_error"}
    assert results["flops"]["pruned"] < results["flops"]["dense"]
    # Accuracy of the saved checkpoint on the 32 evaluation images, recomputed here.
    loader = mocked_dataloaders(None, base.build_parser().parse_args(["--image_size", "32"]))["eval"]
    batch = next(iter(_one_batch(loader)))
    with torch.no_grad():
        predictions = load_pruned(out).eval()(batch["pixel_values"]).argmax(-1)
    expected = float((predictions == batch["labels"]).double().mean())
    assert results["metrics"]["pruned"]["accuracy"] == pytest.approx(expected, abs=1e-12)


def _one_batch(loader):
    """A loader of one batch holding all of ``loader``'s examples."""
    from torch.utils.data import DataLoader

    return DataLoader(loader.dataset, batch_size=len(loader.dataset), collate_fn=loader.collate_fn)


def test_causal_lm_base(lm_setup, examples_path, tmp_path, monkeypatch):
    """The tiny LLaMA on the polarity .txt files (the swapped loader): perplexity recomputed from the checkpoint."""
    base = _base("causal_lm")

    def mocked_dataloaders(accelerator, args, tokenizer):
        files = {"train": str(lm_setup / "train.txt"), "validation": str(lm_setup / "validation.txt")}
        return base.make_dataloaders(accelerator, args, tokenizer, datasets.load_dataset("text", data_files=files))

    monkeypatch.setattr(base, "get_dataloaders", mocked_dataloaders)
    out = tmp_path / "out"
    results = base.main(["--model_name_or_path", str(lm_setup / "model"), "--block_size", "32", "--max_eval_chunks",
                         "16", "--calibration_samples", "32", "--ffn_keep_ratio", "0.5", "--head_keep_ratio", "0.5",
                         "--output_dir", str(out), "--cpu"])
    metrics = results["metrics"]
    assert set(metrics["pruned"]) == {"perplexity", "agreement"} and _finite(metrics)
    assert metrics["dense"]["perplexity"] > 1 and 0 <= metrics["pruned"]["agreement"] <= 1
    assert results["widths"]["heads"] == [1, 1] and results["widths"]["ffn"] == [18, 18]
    assert math.exp(_saved_lm_loss(lm_setup, out)) == pytest.approx(metrics["pruned"]["perplexity"], rel=1e-5)


def test_text_classification_base_under_python(tiny_setup, tmp_path):
    """``python examples/text_classification.py`` on the tiny csv files (in a subprocess, the files go by flag)."""
    from hf_ispasp import load_pruned

    out = tmp_path / "out"
    argv = [*_text_argv(tiny_setup, out), "--train_file", str(tiny_setup / "train.csv"), "--validation_file",
            str(tiny_setup / "dev.csv")]
    proc = subprocess.run([sys.executable, str(EXAMPLES / "text_classification.py"), *argv], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert _finite(results["metrics"]) and "pruned: accuracy" in proc.stdout and "parameters" in proc.stdout
    assert results["metrics"]["pruned"]["accuracy"] == pytest.approx(_dev_metrics(tiny_setup, out)[0], abs=1e-12)
    assert load_pruned(out).bert.encoder.layer[0].intermediate.dense.out_features == 18


@pytest.mark.slow
def test_multi_process_calibration_two_processes(tiny_setup, text_swap, tmp_path, monkeypatch):
    """``accelerate launch`` on 2 CPU processes: each calibrates on its shard and selects as one process does."""
    # No dense fine-tune: data-parallel steps on 2 processes see other batches, hence another dense model.
    one = _feature("multi_process_calibration", monkeypatch).main(
        _text_argv(tiny_setup, tmp_path / "one", "--train_steps", "0"))
    out = tmp_path / "two"
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                str(EXAMPLES / "accelerate_cpu.yaml"), "--main_process_port", "29744"]
    argv = [*_text_argv(tiny_setup, out, "--train_steps", "0"), "--train_file", str(tiny_setup / "train.csv"),
            "--validation_file", str(tiny_setup / "dev.csv")]
    proc = subprocess.run([*launcher, str(EXAMPLES / "by_feature" / "multi_process_calibration.py"), *argv],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((out / "results.json").read_text())
    assert two["num_processes"] == 2 and two["calibration_batches_main_process"] == 3  # batches 0, 2, 4 of 5
    assert two["kept"] == one["kept"] and two["widths"] == one["widths"]
    assert two["metrics"]["dense"] == one["metrics"]["dense"]  # all 20 dev rows gathered, none twice
    assert two["metrics"]["pruned"]["accuracy"] == one["metrics"]["pruned"]["accuracy"]
