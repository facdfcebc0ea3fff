"""PruningCallback: gradual pruning inside Trainer.train() on a tiny BERT (max_steps of a few)."""

from __future__ import annotations

import pytest
import torch
from training_fixtures import VOCAB, calibration_batches, classification_dataset, tiny_classifier
from transformers import TrainerCallback

from hf_ispasp import ISpaSPPruner, PrunerConfig, load_pruned
from hf_ispasp.pruning_callback import _target_counts
from hf_ispasp.training import DistillationArguments, DistillationTrainer, PruningCallback

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = PrunerConfig(ffn_keep_ratio=0.3, head_keep_ratio=0.5, show_progress=False, activation_cache="memory")


_model = tiny_classifier
_calibration = calibration_batches


def _dataset(n: int = 64, seed: int = 0):
    return classification_dataset(n, seed)


def _args(path, **kwargs):
    from transformers import TrainingArguments

    defaults = dict(output_dir=str(path), per_device_train_batch_size=8, learning_rate=1e-3, max_steps=8,
                    save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0,
                    data_seed=0, dataloader_num_workers=0)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def _trainer(path, model=None, callbacks=(), **kwargs):
    return DistillationTrainer(model=model or _model(), args=_args(path, **kwargs), train_dataset=_dataset(),
                               teacher_model=_model(), distillation=DistillationArguments(distill_weight=0.5),
                               callbacks=list(callbacks))


def _widths(model) -> list[int]:
    return [n for layer in model.bert.encoder.layer for n in (layer.attention.self.query.out_features // 8,
                                                                layer.intermediate.dense.out_features)]


class _Snapshot(TrainerCallback):
    """At every step end: the model's widths and, per parameter name, the Adam state (before or after a prune)."""

    def __init__(self, trainer):
        self.trainer, self.widths, self.states = trainer, {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        model, optimizer = self.trainer.model, self.trainer.optimizer
        self.widths[state.global_step] = _widths(model)
        by_id = {id(p): n for n, p in model.named_parameters()}
        self.states[state.global_step] = {by_id[id(p)]: {k: v.clone() for k, v in s.items()}
                                          for p, s in optimizer.state.items() if id(p) in by_id}


def _check_optimizer(trainer) -> None:
    model, optimizer = trainer.model, trainer.optimizer
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(held) == len({id(p) for p in held})
    for param, state in optimizer.state.items():
        assert any(param is p for p in held)
        assert state["exp_avg"].shape == param.shape == state["exp_avg_sq"].shape


def test_schedule_prunes_at_the_given_steps_to_the_given_widths(tmp_path):
    dense = _model()
    one_shot = ISpaSPPruner(dense, CONFIG).prune(_calibration())
    trainer = _trainer(tmp_path)
    before, after = _Snapshot(trainer), _Snapshot(trainer)
    trainer.add_callback(before)
    callback = PruningCallback([2, 4, 6], _calibration(), CONFIG, trainer=trainer)
    trainer.add_callback(after)
    teacher_shapes = [p.shape for p in trainer.teacher.parameters()]
    trainer.train()
    assert callback.pruned_at == [2, 4, 6] and len(callback.reports) == 3
    original = {(layer, kind): n for layer in (0, 1) for kind, n in (("heads", 4), ("ffn", 37))}
    for k, step in enumerate((2, 4, 6)):
        target = _target_counts(original, CONFIG, (k + 1) / 3)
        assert after.widths[step] == [target[(layer, kind)] for layer in (0, 1) for kind in ("heads", "ffn")]
        assert before.widths[step] == (after.widths[step - 2] if k else [4, 37, 4, 37])
    assert after.widths[8] == after.widths[6] == _widths(one_shot)
    assert trainer.model.config.ispasp["widths"] == one_shot.config.ispasp["widths"]
    assert trainer.model.config.ispasp["pruner_config"]["ffn_keep_ratio"] == 0.3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.state.global_step == 8
    assert [p.shape for p in trainer.teacher.parameters()] == teacher_shapes  # the teacher is not pruned
    _check_optimizer(trainer)
    # The Adam moments of the kept rows / columns were carried over: FFN up rows, down columns, query head rows.
    layer = "bert.encoder.layer.0"
    blocks = {b.kind: b for b in callback.reports[-1].blocks if b.layer == 0}
    ffn = torch.tensor(blocks["ffn"].kept)
    heads = (torch.tensor(blocks["heads"].kept)[:, None] * 8 + torch.arange(8)).flatten()
    old, new = before.states[6], after.states[6]
    for name, dim, kept in ((f"{layer}.intermediate.dense.weight", 0, ffn), (f"{layer}.output.dense.weight", 1, ffn),
                            (f"{layer}.attention.self.query.weight", 0, heads),
                            (f"{layer}.attention.self.key.bias", 0, heads)):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(new[name][key], old[name][key].index_select(dim, kept), msg=name)
        assert new[name]["step"] == old[name]["step"]
    torch.testing.assert_close(new["classifier.weight"]["exp_avg"], old["classifier.weight"]["exp_avg"])


def test_prune_before_the_first_step_and_lr_schedule_keeps_its_position(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, warmup_steps=2)
    callback = PruningCallback([0, 3], _calibration(), CONFIG, targets=[0.5, 1.0], trainer=trainer)
    trainer.train()
    assert callback.pruned_at == [0, 3]
    assert trainer.lr_scheduler.last_epoch == 4
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)  # warm-up then decay, never restarted
    _check_optimizer(trainer)


def test_checkpoint_after_a_prune_reloads_compacted_and_resumes(tmp_path):
    kwargs = dict(save_strategy="steps", save_steps=4)
    full = _trainer(tmp_path / "a", **kwargs)
    PruningCallback([2, 4, 6], _calibration(), CONFIG, trainer=full)
    snapshot = _Snapshot(full)
    full.add_callback(snapshot)
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-4"
    reloaded = load_pruned(checkpoint)
    assert _widths(reloaded) == snapshot.widths[4] != [4, 37, 4, 37]
    # A fresh trainer on the dense model: compacted to the checkpoint's widths before its weights load.
    fresh = _trainer(tmp_path / "a", **kwargs)
    callback = PruningCallback([2, 4, 6], _calibration(), CONFIG, trainer=fresh)
    fresh.train(resume_from_checkpoint=str(checkpoint))
    assert callback.pruned_at == [6] and fresh.state.global_step == 8
    assert _widths(fresh.model) == _widths(full.model) == snapshot.widths[8]
    _check_optimizer(fresh)
    for (name, a), b in zip(full.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    # resume_from_checkpoint=True finds the last checkpoint (step 8, after the last prune): nothing left to prune.
    last = _trainer(tmp_path / "a", **kwargs)
    callback = PruningCallback([2, 4, 6], _calibration(), CONFIG, trainer=last)
    last.train(resume_from_checkpoint=True)
    assert callback.pruned_at == [] and _widths(last.model) == snapshot.widths[8]


def test_resume_without_the_callback_is_a_clear_error(tmp_path):
    kwargs = dict(save_strategy="steps", save_steps=4, max_steps=6)
    trainer = _trainer(tmp_path, **kwargs)
    PruningCallback([2, 4], _calibration(), CONFIG, trainer=trainer)
    trainer.train()
    plain = _trainer(tmp_path, **kwargs, callbacks=[PruningCallback([2, 4], _calibration(), CONFIG)])
    with pytest.raises(RuntimeError, match="attach"):
        plain.train()


@pytest.mark.parametrize("steps, targets, config, match", [
    ([], None, CONFIG, "no steps"),
    ([2, 2], None, CONFIG, "strictly increasing"),
    ([3, 1], None, CONFIG, "strictly increasing"),
    ([-1, 2], None, CONFIG, ">= 0"),
    ([1, 2], [0.5], CONFIG, "one per step"),
    ([1, 2], [0.6, 0.4], CONFIG, "must increase"),
    ([1, 2], [0.5, 0.9], CONFIG, "not 1.0"),
    ([1, 2], [0.5, 1.5], CONFIG, r"\(0, 1\]"),
    ([1, 2], [0.5, 1.0], None, "give config"),
    ([1, 2], None, None, "final budget"),
    ([1, 2], [PrunerConfig(ffn_keep_ratio=0.5), PrunerConfig(ffn_keep_ratio=0.4)], CONFIG, "not the final budget"),
    ([1, 2], [PrunerConfig(flops_keep_ratio=0.6), PrunerConfig(flops_keep_ratio=0.8)], None, "grow"),
    ([1, 2], [PrunerConfig(flops_keep_ratio=0.6), PrunerConfig(ffn_keep_ratio=0.5)], None, "same kind"),
    ([1, 2], [PrunerConfig(latency_keep_ratio=0.8), PrunerConfig(latency_keep_ratio=0.6)], None, "latency"),
])
def test_bad_schedules_are_clear_errors(steps, targets, config, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PruningCallback(steps, _calibration(), config, targets=targets)


def test_widths_that_grow_or_steps_past_the_end_are_errors_before_training(tmp_path):
    grow = [PrunerConfig(ffn_keep_ratio=0.5), PrunerConfig(ffn_keep_ratio=0.5, layer_overrides={1: {
        "ffn_keep_ratio": 0.8}})]
    with pytest.raises(ValueError, match="cannot grow"):
        PruningCallback([1, 2], _calibration(), targets=grow, trainer=_trainer(tmp_path))
    trainer = _trainer(tmp_path, max_steps=3)
    PruningCallback([2, 5], _calibration(), CONFIG, trainer=trainer)
    with pytest.raises(ValueError, match="after the last training step"):
        trainer.train()


def test_a_flops_target_is_reached_step_by_step(tmp_path):
    from hf_ispasp.metrics import count_flops

    def flops(model):
        ids = torch.randint(1, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
        return count_flops(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    config = PrunerConfig(flops_keep_ratio=0.6, show_progress=False, activation_cache="memory")
    trainer = _trainer(tmp_path, max_steps=3)
    dense = flops(trainer.model)
    callback = PruningCallback([1, 2], _calibration(), config, trainer=trainer)
    trainer.train()
    ratios = [r.flops_after / r.flops_before for r in callback.reports]
    assert ratios[0] < 1 and ratios[1] < 1  # each step cuts, relative to the model it starts from
    assert flops(trainer.model) / dense == pytest.approx(0.6, abs=0.05)
    assert trainer.model.config.ispasp["pruner_config"]["flops_keep_ratio"] == 0.6
    _check_optimizer(trainer)
