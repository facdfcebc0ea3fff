"""The `evaluate` modules shipped in hf_ispasp.evaluation: loading without the Hub, values against scikit-learn /
numpy / torch on fixed inputs, the library's metric functions unchanged, and `evaluate.evaluator` on a pruned model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_ispasp import evaluation
from hf_ispasp.evaluation import LOCAL_METRICS, MetricNotFoundError, load, metric_path

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = {"accuracy": "Accuracy", "f1": "F1", "perplexity": "Perplexity", "pruning_fidelity": "PruningFidelity"}


def _labels(n: int = 200, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    pred = np.where(rng.random(n) < 0.6, true, rng.integers(0, classes, n))  # mostly right, not always
    return pred, true, rng.random(n)


# Loading -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOCAL_METRICS)
def test_each_module_loads_by_path_and_through_the_helper(name):
    import evaluate

    by_path = evaluate.load(metric_path(name), keep_in_memory=True)
    by_script = evaluate.load(str(Path(metric_path(name)) / f"{name}.py"), keep_in_memory=True)
    by_name = load(name, keep_in_memory=True)
    for module in (by_path, by_script, by_name):
        assert isinstance(module, evaluate.EvaluationModule) and module.module_type == "metric"
        assert type(module).__name__ == CLASS_NAMES[name]
    assert by_path.info.description.strip() and by_path.info.inputs_description.strip()


def test_metric_path_rejects_names_that_are_not_ours():
    with pytest.raises(ValueError, match="accuracy, f1, perplexity, pruning_fidelity"):
        metric_path("bleu")


def test_the_scripts_ship_with_the_package():
    """setup.cfg's package_data must name every script, or a wheel installs a helper that finds nothing."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    patterns = config["options.package_data"]["hf_ispasp"].replace("\n", ",").split(",")
    package = ROOT / "hf_ispasp"
    shipped = {path for pattern in patterns for path in package.glob(pattern.strip())}
    for name in LOCAL_METRICS:
        assert package / "evaluation" / name / f"{name}.py" in shipped


def test_offline_with_an_empty_cache_in_a_fresh_process(tmp_path):
    """HF_HUB_OFFLINE=1 and nothing cached: ours load and compute; another name fails with a message naming why."""
    code = """
import json
from hf_ispasp.evaluation import LOCAL_METRICS, MetricNotFoundError, load
out = {
    "accuracy": load("accuracy").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]),
    "f1": load("f1").compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0]),
    "perplexity": load("perplexity").compute(nll=[6.0, 2.0], num_tokens=[3, 1])["perplexity"],
    "pruning_fidelity": load("pruning_fidelity").compute(predictions=[[1.0, 0.0]], references=[[1.0, 0.0]]),
}
try:
    load("bleu")
except MetricNotFoundError as err:
    out["error"] = str(err)
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["accuracy"] == {"accuracy": 0.5} and out["f1"] == {"f1": pytest.approx(2 / 3)}
    assert out["perplexity"] == pytest.approx(math.e**2)
    assert out["pruning_fidelity"] == {"agreement": 1.0, "kl": 0.0, "relative_error": 0.0}
    assert "'bleu'" in out["error"] and "HF_HUB_OFFLINE" in out["error"] and "accuracy, f1" in out["error"]
    # The scripts were copied into the fresh modules cache, i.e. loaded by path, not found in some older cache.
    copied = {p.name for p in (tmp_path / "modules").rglob("*.py")}
    assert {f"{name}.py" for name in LOCAL_METRICS} <= copied


def test_a_name_that_is_not_ours_goes_to_evaluate(monkeypatch):
    import evaluate

    seen = []

    def fake_load(path, **kwargs):
        seen.append((path, kwargs))
        raise FileNotFoundError(f"Couldn't find a module script at {path}")

    monkeypatch.setattr(evaluate, "load", fake_load)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "0")
    with pytest.raises(MetricNotFoundError, match="Couldn't find a module script at evaluate-metric/bleu"):
        load("evaluate-metric/bleu", keep_in_memory=True)
    assert seen == [("evaluate-metric/bleu", {"keep_in_memory": True})]
    load_ours = []
    monkeypatch.setattr(evaluate, "load", lambda path, **kwargs: load_ours.append(path))
    load("f1")
    assert load_ours == [metric_path("f1")]


# Values --------------------------------------------------------------------------------------------------------


def test_accuracy_matches_scikit_learn():
    from sklearn.metrics import accuracy_score

    pred, true, weight = _labels()
    accuracy = load("accuracy", keep_in_memory=True)
    assert accuracy.compute(predictions=pred, references=true)["accuracy"] == accuracy_score(true, pred)
    for normalize in (True, False):
        got = accuracy.compute(predictions=pred, references=true, normalize=normalize, sample_weight=weight)
        assert got["accuracy"] == pytest.approx(accuracy_score(true, pred, normalize=normalize, sample_weight=weight),
                                                rel=1e-12)
    assert accuracy.compute(predictions=pred, references=true, normalize=False)["accuracy"] == (pred == true).sum()
    rows_true = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]])
    rows_pred = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [1, 0, 1]])
    multilabel = load("accuracy", config_name="multilabel", keep_in_memory=True)
    assert multilabel.compute(predictions=rows_pred, references=rows_true)["accuracy"] == accuracy_score(
        rows_true, rows_pred) == 0.5


@pytest.mark.parametrize("average", ["binary", "micro", "macro", "weighted", None])
@pytest.mark.parametrize("weighted", [False, True])
def test_f1_matches_scikit_learn(average, weighted):
    from sklearn.metrics import f1_score

    classes = 2 if average == "binary" else 4
    pred, true, weight = _labels(classes=classes, seed=3)
    true[true == classes - 1] = 0  # the last class is predicted but never true: its F1 is 0, not a division error
    weight = weight if weighted else None
    f1 = load("f1", keep_in_memory=True)
    got = f1.compute(predictions=pred, references=true, average=average, sample_weight=weight)["f1"]
    expected = f1_score(true, pred, average=average, sample_weight=weight, zero_division=0)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    if average != "binary":
        subset = f1.compute(predictions=pred, references=true, average=average, labels=[2, 0])["f1"]
        np.testing.assert_allclose(subset, f1_score(true, pred, average=average, labels=[2, 0]), rtol=1e-12)


def test_f1_binary_options_and_errors():
    from sklearn.metrics import f1_score

    pred, true = [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]
    f1 = load("f1", keep_in_memory=True)
    assert f1.compute(predictions=pred, references=true, pos_label=0)["f1"] == f1_score(true, pred, pos_label=0)
    with pytest.raises(ValueError, match="average='binary' needs two classes"):
        f1.compute(predictions=[0, 1, 2], references=[0, 1, 1])
    with pytest.raises(ValueError, match="average="):
        f1.compute(predictions=pred, references=true, average="samples")


def test_perplexity_is_token_weighted_and_accumulates():
    nll, tokens = [6.0, 2.0, 9.0], [3, 1, 0]
    perplexity = load("perplexity", keep_in_memory=True)
    out = perplexity.compute(nll=nll, num_tokens=tokens)
    assert out["perplexity"] == math.exp(17.0 / 4)  # not the mean of per-group means
    assert out["perplexities"][:2] == [math.exp(2.0), math.exp(2.0)] and math.isnan(out["perplexities"][2])
    assert out["mean_perplexity"] == pytest.approx(math.exp(2.0))
    for value, count in zip(nll, tokens, strict=True):
        perplexity.add_batch(nll=[value], num_tokens=[count])
    assert perplexity.compute()["perplexity"] == out["perplexity"]
    assert perplexity.compute(nll=[1e6], num_tokens=[1])["perplexity"] == math.inf
    with pytest.raises(ValueError, match="no predicted token"):
        perplexity.compute(nll=[0.0], num_tokens=[0])


def test_perplexity_of_logits_equals_the_cross_entropy_of_torch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[1, 4:] = -100
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                            reduction="none").view(3, 7)
    out = evaluation.compute("perplexity", nll=nll.sum(1).tolist(), num_tokens=(labels != -100).sum(1).tolist())
    mean = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert out["perplexity"] == pytest.approx(math.exp(float(mean)), rel=1e-12)


def test_pruning_fidelity_values():
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(50, 5, generator=gen, dtype=torch.float64)
    pruned = dense + 0.3 * torch.randn(50, 5, generator=gen, dtype=torch.float64)
    fidelity = load("pruning_fidelity", keep_in_memory=True)
    out = fidelity.compute(predictions=pruned.numpy(), references=dense.numpy())
    kl = torch.nn.functional.kl_div(pruned.log_softmax(-1), dense.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert out["kl"] == pytest.approx(float(kl), rel=1e-12) and out["kl"] > 0
    assert out["agreement"] == float((pruned.argmax(-1) == dense.argmax(-1)).double().mean()) < 1
    assert out["relative_error"] == pytest.approx(float((pruned - dense).norm() / dense.norm()), rel=1e-12)
    same = fidelity.compute(predictions=dense.numpy(), references=dense.numpy())
    assert same == {"agreement": 1.0, "kl": 0.0, "relative_error": 0.0}
    # A shift of every logit of a row changes no probability: KL 0, agreement 1, but a relative error.
    shifted = fidelity.compute(predictions=(dense + 4.0).numpy(), references=dense.numpy())
    assert shifted["agreement"] == 1.0 and shifted["kl"] == pytest.approx(0.0, abs=1e-12)
    assert shifted["relative_error"] > 0.5
    labels = load("pruning_fidelity", config_name="labels", keep_in_memory=True)
    assert labels.compute(predictions=[1, 0, 2, 2], references=[1, 1, 2, 0]) == {"agreement": 0.5}
    with pytest.raises(ValueError, match="same"):
        fidelity.compute(predictions=[[1.0, 2.0]], references=[[1.0, 2.0, 3.0]])


# The library's metrics, unchanged --------------------------------------------------------------------------------


def _old_classification_metrics(logits, labels, reference_logits=None):
    """classification_metrics as it was before the evaluate modules (torch, float32 means)."""
    labels_t = torch.as_tensor(np.asarray(labels))
    correct = (logits.argmax(-1) == labels_t).float()
    acc = float(correct.mean())
    result = {"accuracy": acc, "accuracy_stderr": math.sqrt(acc * (1 - acc) / len(correct)), "n": len(correct)}
    if reference_logits is not None:
        result["agreement"] = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
        ref = torch.log_softmax(reference_logits.double(), -1)
        cur = torch.log_softmax(logits.double(), -1)
        result["kl"] = float((ref.exp() * (ref - cur)).sum(-1).mean())
    return result


def test_classification_metrics_give_the_numbers_they_gave_before():
    from hf_ispasp.classification import classification_metrics

    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(203, 3, generator=gen)
    pruned = dense + 0.5 * torch.randn(203, 3, generator=gen)
    labels = torch.randint(0, 3, (203,), generator=gen).tolist()
    new = classification_metrics(pruned, labels, dense)
    old = _old_classification_metrics(pruned, labels, dense)
    assert new.keys() == old.keys() == {"accuracy", "accuracy_stderr", "n", "agreement", "kl"}
    assert new["n"] == old["n"] == 203
    # The old means were float32; the module's are exact fractions (as the Hub's accuracy): equal to float32.
    hits = int((pruned.argmax(-1) == torch.tensor(labels)).sum())
    assert new["accuracy"] == hits / 203 and new["accuracy"] != old["accuracy"]
    for key in ("accuracy", "accuracy_stderr", "agreement"):
        assert new[key] == pytest.approx(old[key], rel=1e-7)
    assert new["kl"] == pytest.approx(old["kl"], rel=1e-12)
    assert classification_metrics(pruned, labels).keys() == {"accuracy", "accuracy_stderr", "n"}


def _old_perplexity(model, dataset, batch_size=16):
    """demo.lm.perplexity as it was before the evaluate module."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            ids = torch.as_tensor(batch["input_ids"])
            mask = torch.as_tensor(batch["attention_mask"])
            labels = ids.clone().masked_fill(mask == 0, -100)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((target != -100).sum())
    return math.exp(total / count)


def test_demo_perplexity_gives_the_number_it_gave_before():
    import datasets
    from conftest import VOCAB, tiny_decoder_model

    from demo import lm

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (11, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0  # right padding in some rows
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    model = tiny_decoder_model("llama")
    assert lm.perplexity(model, data, batch_size=4) == _old_perplexity(model, data, batch_size=4)


# evaluate.evaluator on a pruned model ----------------------------------------------------------------------------


def test_evaluator_scores_a_pruned_model_through_a_pipeline(tmp_path):
    """``evaluate.evaluator`` builds a ``transformers.pipeline`` around the pruned model and scores it with our
    accuracy module; the number equals the library's own path (logits, argmax, the same module)."""
    import datasets
    import evaluate
    from conftest import save_tiny_classifier
    from lm_fixtures import polarity_sentences
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_ispasp import ISpaSPPruner, PrunerConfig
    from hf_ispasp.classification import calibration_loader, predict_logits, tokenize_dataset

    save_tiny_classifier(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    dense = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    # Sentences short enough for the tiny model's 64 positions, so neither path truncates.
    sentences = [s for s in polarity_sentences(120) if len(tokenizer(s)["input_ids"]) <= 32]
    half = len(sentences) // 2
    data = datasets.Dataset.from_dict({"text": sentences, "label": [0] * half + [1] * (len(sentences) - half)})
    assert len(data) >= 30
    tokenized = tokenize_dataset(data, tokenizer, max_length=32)
    calibration = calibration_loader(tokenized, tokenizer, num_samples=24, batch_size=8)
    pruned = ISpaSPPruner(dense, PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.5, show_progress=False)).prune(
        calibration)
    assert pruned.bert.encoder.layer[0].intermediate.dense.out_features == 18  # round(0.5 * 37)

    # The model, not a ready pipeline: evaluate 0.4.6 looks up transformers.TFPreTrainedModel (gone in
    # transformers 5) before accepting a pipeline object, but builds the pipeline itself from a PyTorch model.
    calls = []
    pruned.register_forward_hook(lambda module, args, output: calls.append(1))
    task = evaluate.evaluator("text-classification")
    result = task.compute(model_or_pipeline=pruned, tokenizer=tokenizer, data=data,
                          metric=load("accuracy", keep_in_memory=True), label_mapping=pruned.config.label2id)
    assert len(calls) == len(data)  # the pipeline ran the pruned model, one sentence at a time
    predictions = predict_logits(pruned, tokenized, tokenizer).argmax(-1)
    expected = float((predictions == torch.tensor(data["label"])).double().mean())
    assert result["accuracy"] == expected
    assert result["total_time_in_seconds"] > 0


def test_cli_demo_reports_the_fidelity_module(tmp_path, monkeypatch, capsys):
    """``hf-ispasp demo`` on a tiny classifier and a few sentences (stand-ins for the cached MiniLM fine-tune and
    the polarity corpus): its accuracy, agreement, KL and relative error are the evaluate modules' numbers."""
    import datasets
    from lm_fixtures import polarity_sentences
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import demo.assets
    import demo.recipes
    from hf_ispasp.cli import main

    tokenizer = AutoTokenizer.from_pretrained(demo.assets.minilm_path())
    torch.manual_seed(0)  # 128 positions: the demo times 128-token inputs
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    sentences = [s for s in polarity_sentences(120) if len(tokenizer(s)["input_ids"]) <= 60]
    labels = [0] * (len(sentences) // 2) + [1] * (len(sentences) - len(sentences) // 2)
    split = datasets.Dataset.from_dict({"text": sentences, "label": labels})
    monkeypatch.setattr(demo.recipes, "finetuned_minilm_polarity", lambda seed=0: str(tmp_path / "model"))
    monkeypatch.setattr(demo.assets, "polarity_dataset", lambda: datasets.DatasetDict(train=split, test=split))
    out = tmp_path / "out.json"
    assert main(["demo", "--calibration-samples", "16", "--latency-repeats", "1", "--ffn-keep", "0.5",
                 "--output-dir", str(tmp_path / "pruned"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    pruned = result["pruned"]
    assert pruned.keys() == {"accuracy", "accuracy_stderr", "n", "agreement", "kl", "relative_error"}
    assert 0 < pruned["relative_error"] and pruned["kl"] >= 0 and pruned["n"] == len(sentences)
    assert f"/ {pruned['relative_error']:.3f}" in capsys.readouterr().out
    # Recomputed here from the saved pruned model: the same numbers through the modules directly.
    from hf_ispasp import load_pruned
    from hf_ispasp.classification import predict_logits, tokenize_dataset

    tokenized = tokenize_dataset(split, tokenizer)
    logits = predict_logits(load_pruned(tmp_path / "pruned"), tokenized, tokenizer)
    hits = int((logits.argmax(-1) == torch.tensor(labels)).sum())
    assert pruned["accuracy"] == hits / len(labels)
