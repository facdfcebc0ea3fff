"""Model cards of pruned checkpoints and ``push_to_hub``.

The Hub is unreachable from the test machines: the card's metadata is checked by parsing it back with
``huggingface_hub`` (not by the Hub's validate-yaml endpoint), and the uploads go to a local folder (see
:class:`_LocalHub`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_text_model, token_batches
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import errors as hub_errors

from hf_ispasp import ISpaSPPruner, PrunerConfig, load_pruned, model_card, set_card_info, widths_svg
from hf_ispasp.adapters import adapter_for
from hf_ispasp.metrics import LatencyComparison
from hf_ispasp.portable import MODELING_FILE
from hf_ispasp.portable.card import CARD_MARKER, WIDTHS_PICTURE, is_ispasp_card
from hf_ispasp.pruner import _record_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

_SVG = "{http://www.w3.org/2000/svg}"
# Layer 0 keeps a quarter of its FFN, layer 1 half: non-uniform widths, so the checkpoint needs remote code.
_NON_UNIFORM = PrunerConfig(show_progress=False, layer_overrides={0: {"ffn_keep_ratio": 0.25}})
# Every head and half of every FFN: uniform widths that BERT's config can state (a plain checkpoint).
_UNIFORM_FFN = PrunerConfig(show_progress=False, head_keep_ratio=1.0)


def _pruned(config: PrunerConfig = _NON_UNIFORM, model=None):
    model = model if model is not None else tiny_text_model("bert")
    model.config._name_or_path = "org/tiny-bert"  # as from_pretrained("org/tiny-bert") would set it
    pruner = ISpaSPPruner(model, config)
    return pruner.prune(token_batches()), pruner.report


def _table_row(text: str, first_cell: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_card_renders_and_holds_widths_metrics_and_config():
    model, report = _pruned()
    set_card_info(model, metrics={"accuracy": 0.81, "f1": 0.7}, dense_metrics={"accuracy": 0.84},
                  dataset={"id": "glue", "config": "sst2", "split": "validation"}, license="apache-2.0",
                  tags=["text-classification-demo"])
    card = ModelCard(str(model_card(model, repo_id="me/tiny-bert-pruned")))  # parses back
    data = card.data
    assert data.base_model == "org/tiny-bert" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-classification" and data.license == "apache-2.0"
    assert {"pruned", "i-spasp", "hf_ispasp", "text-classification-demo"} <= set(data.tags)
    results = {r.metric_type: r for r in data.eval_results}  # model-index, parsed back into EvalResults
    assert results["accuracy"].metric_value == 0.81 and results["f1"].metric_value == 0.7
    assert (results["accuracy"].dataset_type, results["accuracy"].dataset_config,
            results["accuracy"].dataset_split) == ("glue", "sst2", "validation")
    assert data.to_dict()["model-index"][0]["name"] == "tiny-bert-pruned"
    text = card.text
    assert is_ispasp_card(text)
    # Widths: kept / dense per layer, as the record and the report say.
    widths = model.config.ispasp["widths"]
    assert widths["ffn"] == [9, 18]
    assert _table_row(text, "0") == ["0", f"{widths['heads'][0]} / 3", "9 / 37"]
    assert _table_row(text, "1") == ["1", f"{widths['heads'][1]} / 3", "18 / 37"]
    assert f"]({WIDTHS_PICTURE})" in text
    # Size: the pruner's own numbers.
    assert _table_row(text, "parameters")[1:3] == [f"{report.params_before:,}", f"{report.params_after:,}"]
    assert _table_row(text, "metric") == ["metric", "dense", "pruned", "pruned - dense"]
    assert _table_row(text, "accuracy") == ["accuracy", "0.8400", "0.8100", "-0.0300"]
    assert _table_row(text, "f1") == ["f1", "-", "0.7000", "-"]
    # Config: the non-default fields as code, the whole PrunerConfig as JSON.
    assert "config = PrunerConfig(layer_overrides={0: {'ffn_keep_ratio': 0.25}})" in text
    full = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    assert full == model.config.ispasp["pruner_config"]
    assert PrunerConfig.from_dict(full).keep_ratio(0, "ffn") == 0.25
    # Loading: non-uniform widths load with the remote code; the citation is the paper's.
    assert 'from_pretrained("me/tiny-bert-pruned", trust_remote_code=True)' in text
    assert "@inproceedings{wolfe2022ispasp" in text and "eprint        = {2112.04905}" in text
    assert "pages         = {248--262}" in text


def test_widths_picture_draws_every_layer():
    model, _ = _pruned()
    root = ET.fromstring(widths_svg(model))  # well-formed, self-contained XML
    bars = [rect for rect in root.iter(f"{_SVG}rect") if rect.get("class") == "kept"]
    titles = [bar.find(f"{_SVG}title").text for bar in bars]
    heads = model.config.ispasp["widths"]["heads"]
    assert titles == [f"layer 0: {heads[0]} of 3 attention heads kept ({100 * heads[0] / 3:.1f}%)",
                      f"layer 1: {heads[1]} of 3 attention heads kept ({100 * heads[1] / 3:.1f}%)",
                      "layer 0: 9 of 37 FFN neurons kept (24.3%)", "layer 1: 18 of 37 FFN neurons kept (48.6%)"]
    heights = [float(bar.get("height")) for bar in bars[2:]]
    assert heights[1] == pytest.approx(2 * heights[0], abs=0.02)  # to scale: 18/37 is twice 9/37
    assert not any(e.tag.endswith(("image", "script", "use")) for e in root.iter())  # nothing fetched or run


def test_card_of_a_record_without_summary_or_metrics():
    """A model whose record predates the pruner's summary (or was written by hand) still gets a card."""
    model = tiny_text_model("bert")
    adapter = adapter_for(model)
    for layer in range(2):
        for block in adapter.blocks(layer):
            adapter.compact(block, torch.arange(block.num_groups - 1))
    _record_metadata(model, adapter, PrunerConfig(show_progress=False))
    text = model_card(model).text
    assert _table_row(text, "parameters") == ["parameters", "-", f"{sum(p.numel() for p in model.parameters()):,}",
                                              "-"]
    assert "## Evaluation" not in text and "FLOPs" not in text
    assert _table_row(text, "0") == ["0", "2", "36"]  # no dense widths recorded: counts only
    assert "load_pruned(\"path/or/repo-id\")" in text
    titles = [t.text for t in ET.fromstring(widths_svg(model)).iter(f"{_SVG}title")]
    assert "layer 1: 36 FFN neurons kept" in titles


def test_latency_and_card_info_checks():
    model, _ = _pruned()
    latency = LatencyComparison(baseline_s=0.004, candidate_s=0.0025, speedup=1.6, speedup_q25=1.5,
                                speedup_q75=1.7, speedup_min=1.2, speedup_max=2.0, pairs=60)
    set_card_info(model, latency=latency, latency_setting="1 x 128 tokens, 1 CPU thread")
    text = model_card(model).text
    assert _table_row(text, "latency per forward pass (median)") == [
        "latency per forward pass (median)", "4 ms", "2.5 ms", "1.60x faster; IQR 1.50-1.70x, range 1.20-2.00x"]
    assert "over 60 interleaved pairs (1 x 128 tokens, 1 CPU thread)" in text
    with pytest.raises(TypeError, match=r"metrics\['accuracy'\] must be a finite number"):
        set_card_info(model, metrics={"accuracy": "high"})
    with pytest.raises(TypeError, match="finite"):
        set_card_info(model, metrics={"loss": float("nan")})
    with pytest.raises(ValueError, match="dataset must be"):
        set_card_info(model, dataset={"name": "no id"})
    with pytest.raises(ValueError, match="latency needs"):
        set_card_info(model, latency={"speedup": 2.0})
    with pytest.raises(ValueError, match="not pruned by hf_ispasp"):
        model_card(tiny_text_model("bert"))


def test_a_second_prune_keeps_the_dense_side_and_drops_stale_metrics():
    once, first = _pruned(PrunerConfig(show_progress=False, ffn_keep_ratio=0.75, head_keep_ratio=1.0))
    set_card_info(once, metrics={"accuracy": 0.9})
    twice, second = _pruned(PrunerConfig(show_progress=False, ffn_keep_ratio=0.5, head_keep_ratio=1.0), once)
    summary = twice.config.ispasp["summary"]
    assert summary["params"] == [first.params_before, second.params_after] and summary["prunes"] == 2
    assert summary["dense_widths"]["ffn"] == [37, 37] and twice.config.ispasp["widths"]["ffn"] == [14, 14]
    assert "card" not in twice.config.ispasp  # the metrics described the model before the second prune


def test_save_pretrained_writes_the_card_and_never_over_a_user_readme(tmp_path):
    model, _ = _pruned()
    set_card_info(model, metrics={"accuracy": 0.81})
    model.save_pretrained(tmp_path / "ours")
    readme = (tmp_path / "ours" / "README.md").read_text()
    assert CARD_MARKER in readme and (tmp_path / "ours" / WIDTHS_PICTURE).is_file()
    # The card's fields travel in config.json: a reloaded model writes the same card, and ours is rewritten.
    again = load_pruned(tmp_path / "ours")
    set_card_info(again, dense_metrics={"accuracy": 0.84})
    again.save_pretrained(tmp_path / "ours")
    assert _table_row(ModelCard.load(tmp_path / "ours" / "README.md").text, "accuracy")[1:3] == ["0.8400", "0.8100"]
    # A README.md (or picture) that we did not write stays as it is.
    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("# my notes\n")
    model.save_pretrained(user)
    assert (user / "README.md").read_text() == "# my notes\n" and not (user / WIDTHS_PICTURE).exists()
    assert (user / "config.json").is_file() and (user / MODELING_FILE).is_file()


class _LocalHub:
    """``HfApi`` calls of a push, answered from a local folder: the Hub cannot be reached from the tests.

    ``upload_folder`` copies the folder into ``self.repo`` and applies ``delete_patterns`` as huggingface_hub does
    (remote files matching a pattern are deleted unless the same commit uploads them).
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.repo = root / "remote-repo"
        self.repo.mkdir()
        self.uploads: list[dict] = []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def hf_hub_download(api, repo_id, filename, **kwargs):
            if not (hub.repo / filename).is_file():
                raise _not_found(f"https://huggingface.co/{repo_id}/resolve/main/{filename}")
            return str(hub.repo / filename)

        def upload_folder(api, *, repo_id, folder_path, delete_patterns=None, **kwargs):
            uploaded = sorted(p.name for p in Path(folder_path).iterdir())
            for old in list(hub.repo.iterdir()):
                if old.name not in uploaded and any(fnmatch.fnmatch(old.name, p) for p in delete_patterns or []):
                    old.unlink()
            for name in uploaded:
                shutil.copy2(Path(folder_path) / name, hub.repo / name)
            hub.uploads.append({"repo_id": repo_id, "files": uploaded, "delete_patterns": delete_patterns, **kwargs})
            return "https://huggingface.co/commit/local"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def _not_found(url: str) -> Exception:
    """The error huggingface_hub raises for a missing file (its HTTP library's response, whichever it uses)."""
    http = sys.modules[hub_errors.Response.__module__.split(".")[0]]
    response = hub_errors.Response(404, request=http.Request("GET", url))
    return hub_errors.RemoteEntryNotFoundError("404 Not Found", response=response)


_TRUSTED_LOAD = textwrap.dedent("""
    import sys
    sys.modules["hf_ispasp"] = None  # the pushed folder must load with transformers alone
    import torch, transformers
    folder = sys.argv[1]
    io = torch.load(sys.argv[2])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        print("MAXDIFF", float((model(**io["inputs"]).logits - io["logits"]).abs().max()), type(model).__name__)
""")


def test_push_to_hub_uploads_checkpoint_modeling_file_picture_and_our_card(tmp_path, monkeypatch):
    """``pruned.push_to_hub`` with the upload replaced by a local copy (the Hub is unreachable here)."""
    hub = _LocalHub(tmp_path, monkeypatch)
    model, _ = _pruned()
    set_card_info(model, metrics={"accuracy": 0.81}, dataset="glue")
    model.push_to_hub("me/tiny-bert-pruned", commit_message="pruned", tags=["demo"])
    (upload,) = hub.uploads
    assert upload["files"] == sorted(["README.md", "config.json", "model.safetensors", MODELING_FILE,
                                      WIDTHS_PICTURE])
    assert upload["commit_message"] == "pruned" and MODELING_FILE in upload["delete_patterns"]
    card = ModelCard.load(hub.repo / "README.md")
    assert is_ispasp_card(card.text) and "demo" in card.data.tags and card.data.eval_results[0].metric_value == 0.81
    assert 'from_pretrained("me/tiny-bert-pruned", trust_remote_code=True)' in card.text
    ET.parse(hub.repo / WIDTHS_PICTURE)
    config = json.loads((hub.repo / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith("modeling_pruned.")
    # The uploaded folder loads back, with hf_ispasp and with transformers' remote code alone.
    batch = token_batches()[0]
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(load_pruned(hub.repo)(**batch).logits, expected)
    torch.save({"inputs": batch, "logits": expected}, tmp_path / "io.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", _TRUSTED_LOAD, str(hub.repo), str(tmp_path / "io.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    diff, cls = done.stdout.split("MAXDIFF", 1)[1].split()
    assert float(diff) < 1e-5 and cls.startswith("Pruned")


def test_push_keeps_a_hub_readme_we_did_not_write(tmp_path, monkeypatch):
    hub = _LocalHub(tmp_path, monkeypatch)
    (hub.repo / "README.md").write_text("---\nlicense: mit\n---\n# Hand-written card\n")
    model, _ = _pruned()
    model.push_to_hub("me/tiny")
    assert "README.md" not in hub.uploads[-1]["files"]  # left on the Hub as it is
    model.push_to_hub("me/tiny", tags=["demo"])  # as transformers: the user's card gets the tags, nothing else
    card = ModelCard.load(hub.repo / "README.md")
    assert card.data.tags == ["demo"] and card.data.license == "mit" and "# Hand-written card" in card.text
    # A card of ours on the Hub is replaced by the new one.
    (hub.repo / "README.md").write_text(f"{CARD_MARKER} -->\n# old card\n")
    model.push_to_hub("me/tiny")
    assert "# old card" not in (hub.repo / "README.md").read_text()
    assert is_ispasp_card((hub.repo / "README.md").read_text())


def test_plain_push_says_plain_from_pretrained_and_drops_a_stale_modeling_file(tmp_path, monkeypatch):
    hub = _LocalHub(tmp_path, monkeypatch)
    (hub.repo / MODELING_FILE).write_text("# from an earlier, non-uniform push\n")
    (hub.repo / "model-00001-of-00002.safetensors").write_text("stale shard")
    (hub.repo / "notes.txt").write_text("the user's file")
    model, _ = _pruned(_UNIFORM_FFN)
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/plain")  # the save_pretrained route
    files = sorted(p.name for p in hub.repo.iterdir())
    assert files == sorted(["README.md", "config.json", "model.safetensors", WIDTHS_PICTURE, "notes.txt"])
    text = (hub.repo / "README.md").read_text()
    assert 'AutoModelForSequenceClassification.from_pretrained("me/plain")' in text and "trust_remote_code" not in text
    assert json.loads((hub.repo / "config.json").read_text())["intermediate_size"] == 18
