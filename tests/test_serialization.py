"""Compacted checkpoints reload strictly; mismatches name the modules; writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_text_model, token_batches

from hf_ispasp import CheckpointMismatchError, ISpaSPPruner, PrunerConfig, load_pruned, save_pruned

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; a busy 2-core machine stalls 2 threads


@pytest.fixture
def pruned():
    model = tiny_text_model("bert")
    return ISpaSPPruner(model, PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.6, show_progress=False)).prune(
        token_batches()
    )


def test_round_trip_identical_outputs_and_metadata(pruned, tmp_path):
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["ispasp"]["widths"]["ffn"] == [18, 18]
    assert config["ispasp"]["widths"]["heads"] == [2, 2]
    assert config["ispasp"]["pruner_config"]["ffn_keep_ratio"] == 0.5
    again = load_pruned(tmp_path)
    batch = token_batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, pruned(**batch).logits, rtol=0, atol=0)
    assert again.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    assert not again.training


def test_dtype_is_kept_and_can_be_overridden(pruned, tmp_path):
    pruned.to(torch.bfloat16).save_pretrained(tmp_path)
    assert next(load_pruned(tmp_path).parameters()).dtype == torch.bfloat16
    assert next(load_pruned(tmp_path, torch_dtype=torch.float32).parameters()).dtype == torch.float32


def test_mismatched_widths_name_the_modules(pruned, tmp_path):
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["ispasp"]["widths"]["ffn"] = [18, 20]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as info:
        load_pruned(tmp_path)
    message = str(info.value)
    assert "bert.encoder.layer.1.intermediate.dense" in message
    assert "bert.encoder.layer.1.output.dense" in message
    assert "layer.0" not in message.split("Modules with mismatched shapes")[1].split("\n")[0]


def test_wrong_layer_count_and_plain_checkpoints(pruned, tmp_path):
    dense = tiny_text_model("bert")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not an hf_ispasp checkpoint"):
        load_pruned(tmp_path / "dense")
    pruned.save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    config["ispasp"]["widths"]["heads"] = [2]
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its pruning metadata"):
        load_pruned(tmp_path / "p")


def test_save_is_atomic(pruned, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pruned(pruned, target)
    before = sorted(p.name for p in target.iterdir())
    original = type(pruned).save_pretrained

    def broken(self, path, **kwargs):
        original(self, path, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(type(pruned), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(pruned, target)
    assert sorted(p.name for p in target.iterdir()) == before
    batch = token_batches()[0]
    torch.testing.assert_close(_logits(load_pruned(target), batch), _logits(pruned, batch), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left behind


def test_plain_save_pretrained_of_vit_reloads(tmp_path):
    """transformers 5 writes ViT weights under legacy names; load_pruned maps them back."""
    from transformers import AutoConfig, AutoModelForImageClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model("vit", hidden_size=30, num_attention_heads=3, intermediate_size=37,
                                  num_hidden_layers=2, image_size=32, patch_size=8, num_labels=3)
    model = AutoModelForImageClassification.from_config(config).eval()
    images = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    pruned = ISpaSPPruner(model, PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.6, show_progress=False)).prune(
        images
    )
    pruned.save_pretrained(tmp_path)  # the ordinary call, default save_original_format
    again = load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(images[0]).logits, pruned(images[0]).logits)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_save_keeps_foreign_files_and_replaces_only_ours(pruned, tmp_path):
    """Saving into a folder with the user's files keeps them byte for byte; a re-save drops only our stale files."""
    target = tmp_path / "project"
    target.mkdir()
    (target / "my_data.csv").write_text("text,label\nhello,1\n")
    (target / "train.py").write_text("print('mine')\n")
    (target / "notes").mkdir()
    (target / "notes" / "todo.txt").write_text("keep me")
    save_pruned(pruned, target)
    assert (target / "my_data.csv").read_text() == "text,label\nhello,1\n"
    assert (target / "train.py").read_text() == "print('mine')\n"
    assert (target / "notes" / "todo.txt").read_text() == "keep me"
    batch = token_batches()[0]
    torch.testing.assert_close(_logits(load_pruned(target), batch), _logits(pruned, batch), rtol=0, atol=0)
    # A stale file of our previous save (e.g. an old tokenizer file) goes; the user's stay.
    manifest = json.loads((target / ".hf_ispasp-manifest.json").read_text())
    assert "config.json" in manifest["files"] and "my_data.csv" not in manifest["files"]
    (target / "extra.json").write_text("{}")
    manifest["files"].append("extra.json")
    (target / ".hf_ispasp-manifest.json").write_text(json.dumps(manifest))
    save_pruned(pruned, target)
    assert not (target / "extra.json").exists()
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == [
        "README.md", "config.json", "ispasp_widths.svg", "model.safetensors", "modeling_pruned.py", "my_data.csv",
        "notes", "train.py"]
    assert [p.name for p in tmp_path.iterdir()] == ["project"]  # no staging folder left behind


def test_save_onto_a_file_is_a_clear_error(pruned, tmp_path):
    from hf_ispasp import CheckpointFolderError

    target = tmp_path / "model.bin"
    target.write_bytes(b"user data")
    with pytest.raises(CheckpointFolderError, match="is an existing file, not a folder"):
        save_pruned(pruned, target)
    assert target.read_bytes() == b"user data"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_save_refuses_foreign_weights_that_would_shadow_ours(pruned, tmp_path):
    from hf_ispasp import CheckpointFolderError

    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointFolderError, match="model.safetensors.index.json"):
        save_pruned(pruned, target)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors.index.json"]


def test_interrupt_during_the_switch_leaves_a_readable_checkpoint(tmp_path, monkeypatch):
    """Kill the save after each possible step: load_pruned always reads the old or the new checkpoint whole."""
    import hf_ispasp.atomic as atomic

    batch = token_batches()[0]
    old = ISpaSPPruner(tiny_text_model("bert"), PrunerConfig(ffn_keep_ratio=0.5, head_keep_ratio=0.6,
                                                             show_progress=False)).prune(token_batches())
    new = ISpaSPPruner(tiny_text_model("bert", seed=3), PrunerConfig(ffn_keep_ratio=0.3, head_keep_ratio=0.3,
                                                                     show_progress=False)).prune(token_batches())
    old_logits, new_logits = _logits(old, batch), _logits(new, batch)
    original = atomic._place
    outcomes = set()
    for fail_at in range(1, 4):  # config.json, model.safetensors, the manifest
        target = tmp_path / f"ckpt{fail_at}"
        save_pruned(old, target)
        (target / "notes.txt").write_text("mine")
        calls = {"n": 0}

        def flaky(src, dst, fail_at=fail_at, calls=calls):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt
            original(src, dst)

        monkeypatch.setattr(atomic, "_place", flaky)
        with pytest.raises(KeyboardInterrupt):
            save_pruned(new, target)
        monkeypatch.setattr(atomic, "_place", original)
        logits = _logits(load_pruned(target), batch)
        if torch.equal(logits, new_logits):
            outcomes.add("new")
        else:
            torch.testing.assert_close(logits, old_logits, rtol=0, atol=0)
            outcomes.add("old")
        assert (target / "notes.txt").read_text() == "mine"
        # The next save finishes (or redoes) the interrupted one and cleans up after it.
        save_pruned(new, target)
        torch.testing.assert_close(_logits(load_pruned(target), batch), new_logits, rtol=0, atol=0)
        assert not (target / ".hf_ispasp-save.json").exists()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert outcomes == {"new"}  # every interrupt here falls after the journal: the staged checkpoint is read


def test_save_pruned_with_tokenizer_is_one_checkpoint(pruned, tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    save_pruned(pruned, tmp_path / "ckpt", tokenizer=tokenizer)
    files = json.loads((tmp_path / "ckpt" / ".hf_ispasp-manifest.json").read_text())["files"]
    assert "tokenizer_config.json" in files and "model.safetensors" in files


def test_load_pruned_of_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at"):
        load_pruned(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at"):
        load_pruned("./outputs/missing-model")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_read_safetensors_equals_the_safetensors_reader(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from hf_ispasp.strict_load import read_safetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b.c": torch.randn(7, generator=gen) * 100,
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_file(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    ours, theirs = read_safetensors(tmp_path / "w.safetensors"), load_file(tmp_path / "w.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key])
    cast = read_safetensors(tmp_path / "w.safetensors", torch.float64)
    assert cast["a"].dtype == (torch.float64 if dtype.is_floating_point else dtype)
    torch.testing.assert_close(cast["a"], theirs["a"].to(cast["a"].dtype))


def test_truncated_weights_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from hf_ispasp.strict_load import read_safetensors

    save_file({"w": torch.ones(100, 100)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(tmp_path / "w.safetensors")


_PEAK = r"""
import json, sys
import hf_ispasp, torch, transformers
transformers.BertForSequenceClassification

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

rss, virtual = status("VmRSS"), status("VmSize")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
model = hf_ispasp.load_pruned(sys.argv[1])
touched = sum(float(p.sum()) for p in model.parameters())
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"ratio": (status("VmHWM") - rss) / size, "virtual": status("VmPeak") - virtual}))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_load_costs_the_pruned_size_and_builds_no_dense_model(tmp_path):
    """Peak resident memory <= 1.2x the pruned model, and the dense model (8 GiB of FFN weights) is never reserved.

    Building a layer reserves (virtual memory, never touched) one dense parameter at a time before it moves to the
    meta device: 2 GiB here.
    """
    import subprocess
    import sys

    from transformers import BertConfig, BertForSequenceClassification

    from hf_ispasp import adapter_for
    from hf_ispasp.record import METADATA_KEY

    torch.manual_seed(0)
    small = BertForSequenceClassification(BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128, vocab_size=200_000))  # ~100 MB
    adapter = adapter_for(small)
    ffn = next(block for block in adapter.blocks(1) if block.kind == "ffn")
    adapter.compact(ffn, torch.arange(96))  # non-uniform widths: the config keeps the dense width
    small.config.intermediate_size = 2**22
    setattr(small.config, METADATA_KEY, {"version": "test", "widths": adapter.widths()})
    save_pruned(small, tmp_path / "ckpt")
    assert load_pruned(tmp_path / "ckpt").bert.encoder.layer[1].intermediate.dense.out_features == 96
    done = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "ckpt")], capture_output=True, text=True,
                          check=True)
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    assert peak["ratio"] <= 1.2, f"peak memory of the load is {peak['ratio']:.2f}x the pruned model"
    assert peak["virtual"] < 3 * 2**30, f"the load reserved {peak['virtual'] / 2**30:.1f} GiB: a dense model was built"


def test_save_pruned_writes_the_card_but_never_over_a_user_readme(pruned, tmp_path):
    save_pruned(pruned, tmp_path / "a")
    assert "i-spasp" in (tmp_path / "a" / "README.md").read_text()
    save_pruned(pruned, tmp_path / "a")  # our own card is replaced
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("my notes")
    save_pruned(pruned, tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "my notes"
    assert (tmp_path / "b" / "config.json").exists()
