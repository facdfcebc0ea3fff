"""DistillationTrainer, the iterative schedule and the model card, on a tiny random BERT and a tiny random LLaMA
with max_steps of a few."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_decoder_model, token_batches
from training_fixtures import calibration_batches, classification_dataset, tiny_classifier

from hf_ispasp import ISpaSPPruner, PrunerConfig, load_pruned
from hf_ispasp.training import (
    DistillationArguments,
    DistillationTrainer,
    distillation_loss,
    hidden_state_loss,
    iterative_prune,
    pruning_model_card,
    schedule_overrides,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; a busy 2-core machine stalls 2 threads


_model = tiny_classifier
_calibration = calibration_batches


def _dataset(n: int = 48, seed: int = 0):
    return classification_dataset(n, seed)


def _args(tmp_path, **kwargs):
    from transformers import TrainingArguments

    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=16,
                    learning_rate=1e-3, max_steps=4, save_strategy="no", report_to=[], logging_steps=1, use_cpu=True,
                    disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def _pruned(config: PrunerConfig | None = None):
    config = config or PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.5, show_progress=False,
                                    activation_cache="memory")
    return ISpaSPPruner(_model(), config).prune(_calibration())


def _batch(dataset):
    from transformers import default_data_collator

    return default_data_collator([dataset[i] for i in range(8)])


def _accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def test_losses_are_kl_and_relative_error():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    expected = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(s, t, temperature=1.0), expected)
    assert float(distillation_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    # Padding positions of per-token logits do not count.
    mask = torch.tensor([[1, 1, 0]])
    a, b = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    b2 = b.clone()
    b2[0, 2] += 10
    torch.testing.assert_close(distillation_loss(a, b, 2.0, mask), distillation_loss(a, b2, 2.0, mask))
    h = [torch.ones(2, 3, 4)]
    assert float(hidden_state_loss([2 * h[0]], h)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same number of layers"):
        hidden_state_loss(h + h, h)
    with pytest.raises(ValueError, match="distill_weight"):
        DistillationArguments(distill_weight=1.5)


def test_zero_weight_is_the_task_loss_and_identical_teacher_adds_nothing(tmp_path):
    data = _dataset()
    student = _pruned().train()
    batch = _batch(data)
    task = student(**batch).loss
    zero = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=_model(),
                               distillation=DistillationArguments(distill_weight=0.0))
    assert not zero.distilling
    torch.testing.assert_close(zero.compute_loss(student, dict(batch)), task)
    # A teacher identical to the student: KL and hidden terms are zero, the loss is (1 - w) * task.
    twin = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=copy.deepcopy(student),
                               distillation=DistillationArguments(distill_weight=0.3, hidden_weight=1.0))
    torch.testing.assert_close(twin.compute_loss(student, dict(batch)), 0.7 * task, atol=1e-6, rtol=1e-5)
    # A dense teacher: the loss differs from the task loss.
    teacher = _model()
    dense = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher,
                                distillation=DistillationArguments(distill_weight=0.5))
    assert all(p.requires_grad for p in teacher.parameters())  # the caller's model is not frozen for good
    assert abs(float(dense.compute_loss(student, dict(batch)).detach()) - float(task.detach())) > 1e-4


def test_chunked_distillation_loss_equals_the_whole_one():
    """The token-level KL in checkpointed chunks (bounded float32 memory for large vocabularies): same value and
    gradient as in one piece, padding still dropped; a bad chunk size is a clear error."""
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 7, 50, generator=gen)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = False
    grads = []
    values = []
    for chunk in (None, 4, 1):
        student = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(1)).requires_grad_()
        value = distillation_loss(student, teacher, 2.0, mask, chunk_rows=chunk)
        value.backward()
        values.append(value.detach())
        grads.append(student.grad)
    for value, grad in zip(values[1:], grads[1:], strict=True):
        torch.testing.assert_close(value, values[0])
        torch.testing.assert_close(grad, grads[0])
    assert float(grads[0][1, 5:].abs().sum()) == 0.0  # padding gets no gradient
    with pytest.raises(ValueError, match="chunk_rows"):
        distillation_loss(teacher, teacher, 2.0, chunk_rows=0)


def test_distillation_loss_decreases(tmp_path):
    data = _dataset()
    teacher = _model(seed=1)  # another network with confident predictions: something to distil
    with torch.no_grad():
        teacher.classifier.weight.mul_(100.0)
    student = _pruned()
    batch = _batch(data)
    config = DistillationArguments(distill_weight=1.0, temperature=2.0, hidden_weight=0.5)

    def kd() -> float:
        with torch.no_grad():
            s, t = student.eval()(**batch), teacher(**batch)
        return float(distillation_loss(s.logits, t.logits, 2.0))

    before = kd()
    assert before > 0.01
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, max_steps=8), train_dataset=data,
                                  teacher_model=teacher, distillation=config)
    trainer.train()
    after = kd()
    assert after < before
    logged = [h for h in trainer.state.log_history if "loss_kd" in h]
    assert logged and "loss_hidden" in logged[0] and "loss_task" in logged[0]
    assert logged[-1]["loss_kd"] < logged[0]["loss_kd"]


def test_resume_from_checkpoint_of_a_compacted_model(tmp_path):
    data, evaluation = _dataset(), _dataset(16, seed=3)
    config = DistillationArguments(distill_weight=0.5)
    kwargs = dict(max_steps=6, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3)
    full = DistillationTrainer(model=_pruned(), args=_args(tmp_path / "a", **kwargs), train_dataset=data,
                               eval_dataset=evaluation, teacher_model=_model(), distillation=config,
                               compute_metrics=_accuracy)
    full.train()
    assert any("eval_accuracy" in h for h in full.state.log_history)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists()
    # A fresh process rebuilds the compacted student from the checkpoint itself, then resumes.
    student = load_pruned(checkpoint)
    assert student.bert.encoder.layer[0].intermediate.dense.out_features < 37
    resumed = DistillationTrainer(model=student, args=_args(tmp_path / "a", **kwargs), train_dataset=data,
                                  eval_dataset=evaluation, teacher_model=_model(), distillation=config,
                                  compute_metrics=_accuracy)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    # Resuming into the already-compacted in-memory model (Trainer._load_from_checkpoint) works too.
    again = DistillationTrainer(model=_pruned(), args=_args(tmp_path / "a", **kwargs), train_dataset=data,
                                eval_dataset=evaluation, teacher_model=_model(), distillation=config)
    again.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(again.model.classifier.weight, full.model.classifier.weight)


def test_schedule_ratios_compound_to_the_final_budget():
    config = PrunerConfig(ffn_keep_ratio=0.3, head_keep_ratio=0.5, round_to=4,
                          layer_overrides={1: {"ffn_keep_ratio": 0.6}})
    original = {(0, "ffn"): 37, (0, "heads"): 12, (1, "ffn"): 37, (1, "heads"): 12}
    current = dict(original)
    from hf_ispasp.config import kept_count

    for step in (1, 2, 3):
        overrides = schedule_overrides(original, current, config, step / 3)
        for (layer, kind), now in current.items():
            key = "ffn_keep_ratio" if kind == "ffn" else "head_keep_ratio"
            current[(layer, kind)] = kept_count(now, overrides[layer][key], 4 if kind == "ffn" else 1)
    assert current == {(0, "ffn"): kept_count(37, 0.3, 4), (0, "heads"): 6, (1, "ffn"): kept_count(37, 0.6, 4),
                       (1, "heads"): 6}


def test_iterative_schedule_reaches_the_one_shot_widths(tmp_path):
    config = PrunerConfig(ffn_keep_ratio=0.3, head_keep_ratio=0.5, show_progress=False, activation_cache="memory")
    dense = _model()
    one_shot = ISpaSPPruner(dense, config).prune(_calibration())
    pruned, reports = iterative_prune(
        dense, config, _calibration(), _args(tmp_path, max_steps=2), num_steps=3, train_dataset=_dataset(),
        distillation=DistillationArguments(distill_weight=0.5),
    )
    assert len(reports) == 3
    widths = [[b.groups_after for b in r.blocks] for r in reports]
    assert widths[0] > widths[1] > widths[2]  # every step prunes further
    assert pruned.config.ispasp["widths"] == one_shot.config.ispasp["widths"]
    assert pruned.config.ispasp["pruner_config"]["ffn_keep_ratio"] == 0.3
    assert dense.bert.encoder.layer[0].intermediate.dense.out_features == 37  # the input model is untouched
    # The fine-tunes between steps changed the weights that later steps calibrate on.
    assert not torch.equal(pruned.classifier.weight, one_shot.classifier.weight)
    with pytest.raises(ValueError, match="iterator"):
        iterative_prune(dense, config, iter(_calibration()), _args(tmp_path), num_steps=2, train_dataset=_dataset())


def test_model_card_describes_the_pruning():
    config = PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.5, show_progress=False, activation_cache="memory")
    pruner = ISpaSPPruner(_model(), config)
    model = pruner.prune(_calibration())
    card = pruning_model_card(model, "org/tiny-bert", pruner.report, {"pruned": {"accuracy": 0.5}}, dataset="toy")
    assert "base_model: org/tiny-bert" in card and "arXiv:2112.04905" in card and "wolfe2021ispasp" in card
    assert '"ffn": [' in card and "FFN keep ratio: 0.5" in card and "| pruned | 0.5000 |" in card
    assert f"{pruner.report.params_after:,}" in card


def test_iterative_distillation_defaults_to_the_dense_teacher(tmp_path, monkeypatch):
    seen = []
    original = DistillationTrainer.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("teacher_model"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "__init__", spy)
    dense = _model()
    config = dataclasses.replace(PrunerConfig(show_progress=False, activation_cache="memory"))
    iterative_prune(dense, config, _calibration(), _args(tmp_path, max_steps=1), num_steps=2,
                    train_dataset=_dataset(), distillation=DistillationArguments(distill_weight=0.5))
    assert seen == [dense]


# Causal LMs -----------------------------------------------------------------------------------------------


def _lm_rows(n: int = 32, seed: int = 0):
    """Right-padded fixed-width rows with next-token labels (``-100`` under padding), as a ``Dataset``."""
    import datasets

    rows = []
    for b in token_batches(num=n, batch_size=8, seed=seed, pad_to=14):
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        rows += [{"input_ids": i, "attention_mask": m, "labels": lab}
                 for i, m, lab in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), labels.tolist(),
                                      strict=True)]
    return datasets.Dataset.from_list(rows)


def _lm_teacher():
    """A tiny random LLaMA with a sharpened head: confident next-token distributions worth distilling."""
    model = tiny_decoder_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def _lm_student(teacher, config: PrunerConfig | None = None):
    config = config or PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.67, show_progress=False)
    calibration = _lm_rows(16, seed=5).remove_columns(["labels"])
    return ISpaSPPruner(teacher, config).prune(calibration)


def _token_kl(student, teacher, batch, temperature: float = 2.0) -> torch.Tensor:
    """Hand-written reference: mean KL over positions ``t`` whose target ``labels[t + 1]`` is real."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    keep = batch["labels"][:, 1:] != -100
    s, t = (s[keep] / temperature).log_softmax(-1), (t[keep] / temperature).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def test_causal_lm_kl_counts_exactly_the_tokens_the_lm_loss_scores(tmp_path):
    teacher = _lm_teacher()
    student = _lm_student(teacher).train()
    batch = _batch(_lm_rows())
    assert bool((batch["attention_mask"] == 0).any())  # padding present
    batch["labels"][0, 3] = -100  # a masked real target (e.g. a prompt token) counts in neither loss
    kd_only = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher,
                                  distillation=DistillationArguments(distill_weight=1.0))
    kd = kd_only.compute_loss(student, dict(batch))
    torch.testing.assert_close(kd.detach(), _token_kl(student, teacher, batch), rtol=1e-4, atol=1e-6)
    # Garbage ids under the padding change neither the KL nor the LM loss (the model's own, on the labels).
    garbage = dict(batch)
    garbage["input_ids"] = torch.where(batch["attention_mask"] == 0, 7, batch["input_ids"])
    torch.testing.assert_close(kd_only.compute_loss(student, garbage).detach(), kd.detach())
    mixed = DistillationTrainer(model=student, args=_args(tmp_path), teacher_model=teacher,
                                distillation=DistillationArguments(distill_weight=0.25))
    with torch.no_grad():
        task = student(**batch).loss
    torch.testing.assert_close(mixed.compute_loss(student, dict(batch)).detach(), 0.75 * task + 0.25 * kd.detach(),
                               rtol=1e-4, atol=1e-6)


def test_causal_lm_distillation_lowers_the_kl_to_the_teacher(tmp_path):
    teacher = _lm_teacher()
    student = _lm_student(teacher)
    data = _lm_rows()
    probe = _batch(_lm_rows(8, seed=9))  # held-out rows
    before = float(_token_kl(student.eval(), teacher, probe))
    assert before > 0.05
    # A sharpened head amplifies every weight change: a small learning rate, as for real LLMs.
    trainer = DistillationTrainer(model=student, args=_args(tmp_path, max_steps=8, learning_rate=3e-4),
                                  train_dataset=data, teacher_model=teacher,
                                  distillation=DistillationArguments(distill_weight=1.0))
    trainer.train()
    after = float(_token_kl(student.eval(), teacher, probe))
    assert after < 0.8 * before
    logged = [h for h in trainer.state.log_history if "loss_kd" in h]
    assert len(logged) == 8 and "loss_task" in logged[0]  # the LM loss is logged although its weight is 0
    # Two epochs over the same 4 batches: the second pass has the lower KL.
    first, second = (sum(h["loss_kd"] for h in part) for part in (logged[:4], logged[4:]))
    assert second < first


@pytest.mark.parametrize("gqa_groups", ["kv", "query"])
def test_iterative_prune_reaches_the_budget_on_a_causal_lm(tmp_path, gqa_groups):
    config = PrunerConfig(ffn_keep_ratio=0.3, head_keep_ratio=0.34, gqa_groups=gqa_groups, show_progress=False)
    dense = tiny_decoder_model("llama")
    calibration = _lm_rows(16, seed=5).remove_columns(["labels"])
    one_shot = ISpaSPPruner(dense, config).prune(calibration)
    pruned, reports = iterative_prune(
        dense, config, calibration, _args(tmp_path, max_steps=2), num_steps=2, train_dataset=_lm_rows(),
        distillation=DistillationArguments(distill_weight=0.5),
    )
    widths = pruned.config.ispasp["widths"]
    assert widths == one_shot.config.ispasp["widths"]
    assert widths["ffn"] == [11, 11]  # round(0.3 * 37)
    # kv: 1 of 3 KV heads with both query heads; query: all 3 KV heads with 1 of their 2 query heads.
    assert (widths["heads"], widths["q_per_kv"]) == (([1, 1], [2, 2]) if gqa_groups == "kv" else ([3, 3], [1, 1]))
    assert [r.params_after for r in reports] == sorted((r.params_after for r in reports), reverse=True)
    assert reports[0].params_after > reports[1].params_after
    assert dense.model.layers[0].mlp.down_proj.in_features == 37  # the dense model is untouched
    with torch.no_grad():
        out = pruned.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
