"""Catalogue of bad and unusual inputs a user can make: each gets a clear error or the correct result.

Every ``ERRORS`` entry asserts the exact exception type and that the message names the problem (and, where
there is one, the fix). Every ``CORRECT`` entry asserts the right outcome. The closing note of the reliability
issue counts them by outcome; keep both lists growing as new mistakes are found.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_text_model, token_batches
from torch import nn
from torch.utils.data import DataLoader

from hf_ispasp import (
    CalibrationError,
    CheckpointFolderError,
    CheckpointMismatchError,
    ISpaSPPruner,
    PrunerConfig,
    UnsupportedModelError,
    load_pruned,
    save_pruned,
)
from hf_ispasp.training import DistillationArguments, iterative_prune

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; a busy 2-core machine stalls 2 threads


def _cfg(**kwargs) -> PrunerConfig:
    return PrunerConfig(**{"show_progress": False, "activation_cache": "memory", **kwargs})


def _prune(data, model: nn.Module | None = None, **kwargs) -> nn.Module:
    return ISpaSPPruner(model if model is not None else tiny_text_model("bert"), _cfg(**kwargs)).prune(data)


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _nan_model() -> nn.Module:
    model = tiny_text_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    return model


def _meta_model() -> nn.Module:
    import transformers
    from conftest import TEXT_CONFIGS

    config = transformers.AutoConfig.for_model("bert", **TEXT_CONFIGS["bert"], num_labels=3)
    with torch.device("meta"):
        return transformers.BertForSequenceClassification(config)


def _ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def _saved(tmp: Path) -> Path:
    target = tmp / "ckpt"
    save_pruned(_prune(token_batches()), target)
    return target


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> Path:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _default_collate_loader(equal_lengths: bool) -> DataLoader:
    examples = [{"input_ids": list(range(3, 3 + (6 if equal_lengths else 4 + i)))} for i in range(4)]
    return DataLoader(examples, batch_size=2)  # torch's default collate: no padding, one tensor per position


# (id, action taking tmp_path, expected exception type, regex the message must match)
ERRORS: list[tuple[str, Callable[[Path], object], type[BaseException], str]] = [
    # --- config values ----------------------------------------------------------------------------------------
    ("ffn_ratio_zero", lambda t: _cfg(ffn_keep_ratio=0), ValueError, r"ffn_keep_ratio=0 is out of range.*0 < ratio"),
    ("ffn_ratio_above_one", lambda t: _cfg(ffn_keep_ratio=1.5), ValueError, r"ffn_keep_ratio=1.5 is out of range"),
    ("ffn_ratio_string", lambda t: _cfg(ffn_keep_ratio="0.5"), ValueError, r"ffn_keep_ratio='0.5' is out of range"),
    ("ffn_ratio_bool", lambda t: _cfg(ffn_keep_ratio=True), ValueError, r"ffn_keep_ratio=True"),
    ("ffn_ratio_nan", lambda t: _cfg(ffn_keep_ratio=math.nan), ValueError, r"ffn_keep_ratio=nan is out of range"),
    ("head_ratio_negative", lambda t: _cfg(head_keep_ratio=-0.1), ValueError, r"head_keep_ratio=-0.1"),
    ("iterations_zero", lambda t: _cfg(num_iterations=0), ValueError, r"num_iterations=0 must be an integer >= 1"),
    ("iterations_float", lambda t: _cfg(num_iterations=2.5), ValueError, r"num_iterations=2.5"),
    ("selection_unknown", lambda t: _cfg(selection="magnitude"), ValueError,
     r"selection='magnitude' is not supported; choose one of .*weight_magnitude"),
    ("proxy_unknown", lambda t: _cfg(proxy="l1"), ValueError, r"proxy='l1' is not supported"),
    ("threshold_unknown", lambda t: _cfg(threshold="topk"), ValueError, r"threshold='topk' is not supported"),
    ("stats_dtype_unknown", lambda t: _cfg(stats_dtype="float16"), ValueError, r"stats_dtype='float16'"),
    ("cache_unknown", lambda t: _cfg(activation_cache="gpu"), ValueError, r"activation_cache='gpu'"),
    ("damping_negative", lambda t: _cfg(refit_damping=-1.0), ValueError, r"refit_damping=-1.0 must be a finite"),
    ("damping_inf", lambda t: _cfg(refit_damping=math.inf), ValueError, r"refit_damping=inf"),
    ("round_to_zero", lambda t: _cfg(round_to=0), ValueError, r"round_to=0 must be an integer >= 1"),
    ("batch_size_zero", lambda t: _cfg(calibration_batch_size=0), ValueError, r"calibration_batch_size=0"),
    ("max_samples_zero", lambda t: _cfg(max_calibration_samples=0), ValueError, r"max_calibration_samples=0"),
    ("overrides_list", lambda t: _cfg(layer_overrides=[1, 2]), ValueError, r"layer_overrides must be a dict"),
    ("overrides_bad_key", lambda t: _cfg(layer_overrides={"a": {}}), ValueError,
     r"layer_overrides key 'a' must be a layer index"),
    ("overrides_negative", lambda t: _cfg(layer_overrides={-1: {}}), ValueError, r"non-negative layer index"),
    ("overrides_not_dict", lambda t: _cfg(layer_overrides={0: 0.5}), ValueError,
     r"layer_overrides\[0\] must be a dict"),
    ("overrides_unknown_name", lambda t: _cfg(layer_overrides={0: {"ffn": 0.5}}), ValueError,
     r"unknown key 'ffn'.*ffn_keep_ratio"),
    ("overrides_bad_ratio", lambda t: _cfg(layer_overrides={0: {"ffn_keep_ratio": 2}}), ValueError,
     r"layer_overrides\[0\]\['ffn_keep_ratio'\]=2 is out of range"),
    ("seed_string", lambda t: _cfg(seed="1"), ValueError, r"seed='1' must be an integer"),
    ("seed_negative", lambda t: _cfg(seed=-1), ValueError, r"seed=-1 must be an integer in \[0"),
    ("refit_string", lambda t: _cfg(refit="yes"), ValueError, r"refit='yes' must be True or False"),
    ("config_json_missing", lambda t: PrunerConfig.from_json_file(t / "none.json"), FileNotFoundError, r"none.json"),
    # --- model states -----------------------------------------------------------------------------------------
    ("config_is_dict", lambda t: ISpaSPPruner(tiny_text_model("bert"), {"ffn_keep_ratio": 0.5}), TypeError,
     r"config must be a PrunerConfig, got dict"),
    ("unsupported_model", lambda t: ISpaSPPruner(nn.Linear(3, 3)), UnsupportedModelError,
     r"no adapter for model_type 'Linear'.*Supported: .*bert.*register_adapter"),
    ("nan_weights", lambda t: _prune(token_batches(), _nan_model()), ValueError,
     r"NaN/inf weights in \['bert.encoder.layer.0.output.dense.weight'\]"),
    ("meta_weights", lambda t: _prune(token_batches(), _meta_model()), ValueError, r"'meta' device; load real"),
    ("override_beyond_layers", lambda t: _prune(token_batches(), layer_overrides={5: {"ffn_keep_ratio": 0.5}}),
     ValueError, r"layer_overrides names layer\(s\) \[5\], but the model has 2 prunable layers \(indices 0..1\)"),
    ("taylor_without_labels", lambda t: _prune(token_batches(), selection="taylor"), ValueError, r"label"),
    # --- calibration data -------------------------------------------------------------------------------------
    ("data_none", lambda t: _prune(None), CalibrationError, r"calibration data is None"),
    ("data_empty_list", lambda t: _prune([]), CalibrationError, r"calibration data is empty"),
    ("data_single_dict", lambda t: _prune(token_batches()[0]), CalibrationError, r"single dict.*prune\(\[batch\]\)"),
    ("data_string", lambda t: _prune("some text"), CalibrationError, r"is a string; tokenize it first"),
    ("data_not_iterable", lambda t: _prune(42), CalibrationError, r"type int is not iterable"),
    ("batch_without_ids", lambda t: _prune([{"attention_mask": torch.ones(2, 4)}]), ValueError,
     r"has no 'input_ids' \(keys: \['attention_mask'\]\); tokenize"),
    ("batch_is_tuple", lambda t: _prune([(torch.ones(2, 4, dtype=torch.long),)]), TypeError,
     r"must be dicts of tensors .*got tuple"),
    ("ids_float", lambda t: _prune([{"input_ids": torch.rand(2, 4)}]), TypeError, r"integer token ids, got dtype"),
    ("ids_beyond_vocab", lambda t: _prune([{"input_ids": _ids([[5, 6, VOCAB + 7]])}]), ValueError,
     rf"outside the vocabulary \(largest {VOCAB + 7}, .*the model has {VOCAB} embeddings"),
    ("ids_minus_one_unmasked", lambda t: _prune([{"input_ids": _ids([[5, 6, -1]])}]), ValueError,
     r"smallest -1.*attention_mask=0 rather than a -1 id"),
    ("mask_wrong_shape", lambda t: _prune([{"input_ids": _ids([[5, 6, 7]]), "attention_mask": torch.ones(1, 4)}]),
     ValueError, r"'attention_mask' has shape \(1, 4\) but input_ids has \(1, 3\)"),
    ("mask_all_zero", lambda t: _prune([{"input_ids": _ids([[5, 6]]), "attention_mask": torch.zeros(1, 2)}]),
     ValueError, r"all-zero attention_mask"),
    ("ids_three_dims", lambda t: _prune([{"input_ids": torch.ones(1, 2, 3, dtype=torch.long)}]), ValueError,
     r"'input_ids' has shape \(1, 2, 3\); expected \(batch, sequence\)"),
    ("ragged_lists", lambda t: _prune([{"input_ids": [[5, 6, 7], [5, 6]]}]), ValueError,
     r"cannot be made a tensor.*DataCollatorWithPadding"),
    ("default_collate_ragged", lambda t: _prune(_default_collate_loader(False)), CalibrationError,
     r"could not batch its examples.*DataCollatorWithPadding"),
    ("default_collate_transposed", lambda t: _prune(_default_collate_loader(True)), ValueError,
     r"list of 6 tensors, the shape torch's default collate gives"),
    ("dataset_untokenized", lambda t: _prune(__import__("datasets").Dataset.from_dict({"text": ["a b", "c"]})),
     CalibrationError, r"no model input columns \(found \['text'\]\); tokenize it first"),
    ("nan_embeddings", lambda t: _prune([{"inputs_embeds": torch.full((1, 3, 30), math.nan)}]), CalibrationError,
     r"not finite"),
    # --- checkpoints ------------------------------------------------------------------------------------------
    ("load_missing_folder", lambda t: load_pruned(t / "missing"), FileNotFoundError, r"no checkpoint folder at"),
    ("load_a_file", lambda t: (t / "f.bin").write_bytes(b"x") and load_pruned(t / "f.bin"), NotADirectoryError,
     r"is a file; load_pruned takes the folder"),
    ("load_dense_checkpoint", lambda t: tiny_text_model("bert").save_pretrained(t / "d") or load_pruned(t / "d"),
     ValueError, r"no 'ispasp' pruning record.*usual from_pretrained"),
    ("load_tampered_widths", lambda t: load_pruned(_edit_config(
        _saved(t), lambda c: c["ispasp"]["widths"].__setitem__("ffn", [18, 20]))), CheckpointMismatchError,
     r"bert.encoder.layer.1.intermediate.dense"),
    ("load_unknown_architecture", lambda t: load_pruned(_edit_config(
        _saved(t), lambda c: c.__setitem__("architectures", ["NoSuchModel"]))), ValueError,
     r"names no known model class \(architectures=\['NoSuchModel'\]\)"),
    ("load_missing_weights", lambda t: (_saved(t) / "model.safetensors").unlink() or load_pruned(t / "ckpt"),
     FileNotFoundError, r"no model.safetensors in"),
    ("save_onto_file", lambda t: (t / "x").write_text("mine") and save_pruned(_prune(token_batches()), t / "x"),
     CheckpointFolderError, r"is an existing file, not a folder"),
    ("save_plain_module", lambda t: save_pruned(nn.Linear(2, 2), t / "lin"), TypeError,
     r"neither a transformers model nor a model with a registered"),
    ("save_bad_tokenizer", lambda t: save_pruned(_prune(token_batches()), t / "c", tokenizer=object()), TypeError,
     r"tokenizer must have save_pretrained"),
    # --- training arguments -----------------------------------------------------------------------------------
    ("distill_weight_range", lambda t: DistillationArguments(distill_weight=1.5), ValueError,
     r"distill_weight=1.5 must be in \[0, 1\]"),
    ("distill_weight_string", lambda t: DistillationArguments(distill_weight="0.5"), ValueError,
     r"distill_weight='0.5' must be a number"),
    ("temperature_zero", lambda t: DistillationArguments(temperature=0), ValueError, r"temperature=0.0 must be a"),
    ("iterative_zero_steps", lambda t: iterative_prune(tiny_text_model("bert"), _cfg(), token_batches(), None,
                                                       num_steps=0), ValueError, r"num_steps=0 must be an integer"),
    ("iterative_one_shot_iterator", lambda t: iterative_prune(tiny_text_model("bert"), _cfg(), iter(token_batches()),
                                                              None, num_steps=2), ValueError, r"one-shot iterator"),
]


@pytest.mark.parametrize(("case", "action", "error", "pattern"), ERRORS, ids=[e[0] for e in ERRORS])
def test_clear_error(case, action, error, pattern, tmp_path):
    with pytest.raises(error) as info:
        action(tmp_path)
    assert type(info.value) is error or issubclass(type(info.value), error)
    import re

    assert re.search(pattern, str(info.value), re.S), f"{case}: {info.value}"


# --- inputs that must give the correct result ---------------------------------------------------------------------
def _same_as_reference(data, reference=None, **kwargs) -> None:
    """Pruning on ``data`` gives exactly the model pruned on the plain right-padded batches."""
    check = token_batches(num=8)
    expected = _prune(reference if reference is not None else token_batches(), **kwargs)
    got = _prune(data, **kwargs)
    for batch in check:
        torch.testing.assert_close(_logits(got, batch), _logits(expected, batch), rtol=1e-5, atol=1e-6)


def _numpy_scalars() -> None:
    config = _cfg(ffn_keep_ratio=np.float32(0.5), num_iterations=np.int64(5), seed=np.int32(3),
                  layer_overrides={np.int64(1): {"ffn_keep_ratio": np.float64(0.25)}})
    assert type(config.ffn_keep_ratio) is float and type(config.num_iterations) is int
    assert json.loads(json.dumps(config.to_dict()))["layer_overrides"] == {"1": {"ffn_keep_ratio": 0.25}}
    pruned = ISpaSPPruner(tiny_text_model("bert"), config).prune(token_batches())
    assert pruned.config.ispasp["widths"]["ffn"] == [18, 9]


def _json_round_trip(tmp: Path) -> None:
    config = _cfg(layer_overrides={0: {"head_keep_ratio": 0.5}}, seed=7)
    config.to_json_file(tmp / "c.json")
    again = PrunerConfig.from_json_file(tmp / "c.json")
    assert again == config and again.layer_overrides == {0: {"head_keep_ratio": 0.5}}


def _unknown_key_warns(caplog) -> None:
    with caplog.at_level("WARNING"):
        config = PrunerConfig.from_dict({"ffn_keep_ratio": 0.4, "future_option": 1})
    assert config.ffn_keep_ratio == 0.4 and "future_option" in caplog.text


def _keep_everything_is_identity() -> None:
    model = tiny_text_model("bert")
    pruned = _prune(token_batches(), model, ffn_keep_ratio=1.0, head_keep_ratio=1.0)
    for batch in token_batches(num=8):
        torch.testing.assert_close(_logits(pruned, batch), _logits(model, batch), rtol=0, atol=0)


def _frozen_stays_frozen() -> None:
    model = tiny_text_model("bert").requires_grad_(False)
    pruned = _prune(token_batches(), model)
    assert not any(p.requires_grad for p in pruned.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def _partly_frozen_pattern_kept() -> None:
    model = tiny_text_model("bert")
    model.bert.encoder.layer[0].requires_grad_(False)
    pruned = _prune(token_batches(), model)
    for name, param in pruned.named_parameters():
        assert param.requires_grad == (not name.startswith("bert.encoder.layer.0.")), name


def _taylor_on_frozen_model() -> None:
    model = tiny_text_model("bert").requires_grad_(False)
    batches = [{**b, "labels": torch.zeros(b["input_ids"].shape[0], dtype=torch.long)} for b in token_batches()]
    pruned = _prune(batches, model, selection="taylor")
    assert pruned.config.ispasp["widths"]["ffn"] == [18, 18]
    assert not any(p.requires_grad for p in model.parameters())


def _train_mode_model() -> None:
    model = tiny_text_model("bert").train()
    pruned = _prune(token_batches(), model)
    assert pruned.training and model.training
    torch.testing.assert_close(_logits(pruned.eval(), token_batches()[0]),
                               _logits(_prune(token_batches()).eval(), token_batches()[0]))


def _bf16_model() -> None:
    pruned = _prune(token_batches(), tiny_text_model("bert").to(torch.bfloat16))
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    assert pruned.config.ispasp["widths"]["ffn"] == [18, 18]


def _failed_prune_untouched() -> None:
    model = tiny_text_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        _prune(token_batches()[:2] + [{"input_ids": _ids([[VOCAB + 3]])}], model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _minus_one_under_padding() -> None:
    batches = token_batches()
    filled = [{"input_ids": b["input_ids"].masked_fill(b["attention_mask"] == 0, -1),
               "attention_mask": b["attention_mask"]} for b in batches]
    _same_as_reference(filled)


def _missing_mask_uses_pad_id(caplog) -> None:
    with caplog.at_level("WARNING"):
        _same_as_reference([{"input_ids": b["input_ids"]} for b in token_batches()])
    assert caplog.text.count("no attention_mask") == 1  # once per prune, not per batch


def _unbatched_sequences() -> None:
    reference = [{"input_ids": _ids([[5, 6, 7, 8]])}, {"input_ids": _ids([[9, 10, 11]])}]
    # A loader yielding one unbatched sequence at a time (a generator, so not read as a list of examples).
    unbatched = ({"input_ids": torch.tensor(ids)} for ids in ([5, 6, 7, 8], [9, 10, 11]))
    _same_as_reference(unbatched, reference)


def _list_of_examples() -> None:
    examples = [{"input_ids": [int(t) for t, m in zip(ids, mask, strict=True) if m]}
                for b in token_batches() for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]
    _same_as_reference(examples, calibration_batch_size=8)


def _numpy_and_int32_ids() -> None:
    batches = token_batches()
    _same_as_reference([{k: v.numpy() for k, v in b.items()} for b in batches])
    _same_as_reference([{k: v.to(torch.int32) for k, v in b.items()} for b in batches])


def _garbage_under_padding() -> None:
    _same_as_reference(token_batches(pad_fill=1))


def _extra_columns_ignored() -> None:
    batches = [{**b, "labels": torch.zeros(b["input_ids"].shape[0], dtype=torch.long), "idx": list(range(8))}
               for b in token_batches()]
    _same_as_reference(batches)


def _sample_cap() -> None:
    _same_as_reference(token_batches(), token_batches()[:2], max_calibration_samples=16)


def _generator_data() -> None:
    _same_as_reference(b for b in token_batches())


def _single_token() -> None:
    pruned = _prune([{"input_ids": _ids([[5]])}])
    assert pruned.config.ispasp["widths"]["ffn"] == [18, 18]
    assert all(math.isfinite(p.float().abs().sum().item()) for p in pruned.parameters())


def _save_keeps_user_files(tmp: Path) -> None:
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "notes.md").write_text("mine")
    save_pruned(_prune(token_batches()), tmp / "ckpt")
    assert (tmp / "ckpt" / "notes.md").read_text() == "mine"
    assert load_pruned(tmp / "ckpt").config.ispasp["widths"]["heads"] == [2, 2]


def _load_with_dtype(tmp: Path) -> None:
    model = load_pruned(_saved(tmp), torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


CORRECT: list[tuple[str, Callable]] = [
    ("numpy_scalars_in_config", _numpy_scalars),
    ("config_json_round_trip", _json_round_trip),
    ("unknown_config_key_warns", _unknown_key_warns),
    ("keep_everything_is_identity", _keep_everything_is_identity),
    ("frozen_model_stays_frozen", _frozen_stays_frozen),
    ("partly_frozen_pattern_kept", _partly_frozen_pattern_kept),
    ("taylor_on_frozen_model", _taylor_on_frozen_model),
    ("train_mode_model", _train_mode_model),
    ("bf16_model", _bf16_model),
    ("failed_prune_leaves_model_untouched", _failed_prune_untouched),
    ("minus_one_under_padding", _minus_one_under_padding),
    ("missing_mask_built_from_pad_id", _missing_mask_uses_pad_id),
    ("unbatched_sequences", _unbatched_sequences),
    ("list_of_tokenized_examples", _list_of_examples),
    ("numpy_and_int32_ids", _numpy_and_int32_ids),
    ("garbage_under_padding", _garbage_under_padding),
    ("extra_columns_ignored", _extra_columns_ignored),
    ("sample_cap", _sample_cap),
    ("generator_of_batches", _generator_data),
    ("single_token_calibration", _single_token),
    ("save_keeps_user_files", _save_keeps_user_files),
    ("load_with_dtype", _load_with_dtype),
]


@pytest.mark.parametrize(("case", "check"), CORRECT, ids=[c[0] for c in CORRECT])
def test_correct_result(case, check, tmp_path, caplog):
    import inspect

    params = inspect.signature(check).parameters
    kwargs = {"tmp": tmp_path, "caplog": caplog}
    check(*[kwargs[name] for name in params])


def test_catalogue_size():
    assert len(ERRORS) + len(CORRECT) >= 60


def test_report_is_strict_json():
    """A bias-only re-fit (ridge inf) must not leak 'Infinity' into the report's JSON."""
    from hf_ispasp.pruner import BlockReport, PruningReport

    report = PruningReport(blocks=[BlockReport("b", "ffn", 0, 4, 2, 0.1, 0.05, 1, [0, 1], refit_ridge=math.inf)])
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["blocks"][0]["refit_ridge"] == "inf"
