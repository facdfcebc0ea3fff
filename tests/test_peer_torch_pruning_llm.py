"""benchmarks/peer_torch_pruning_llm.py end to end on the tiny decoders: every Torch-Pruning cell it reports has
exactly our per-layer widths, and every cell it skips says why."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")
pytest.importorskip("gensim")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_peer_torch_pruning_llm_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("HF_ISPASP_CACHE", str(tmp_path / "cache"))
    import peer_torch_pruning_llm as bench

    assert bench.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / f"{bench.NAME}.json").read_text())
    records = data["records"]
    assert {r["model"] for r in records} == {"llama", "gpt2"}
    cells = [r for r in records if r["method"] != "dense"]
    ours = {(r["model"], r["target"], r["method"] == bench.OURS_QUERY): r for r in cells
            if r["method"] in (bench.OURS, bench.OURS_QUERY)}
    assert {key[2] for key in ours if key[0] == "llama"} == {False, True}  # GQA: both modes compared
    peers = [r for r in cells if r["method"].startswith("Torch-Pruning")]
    assert len(peers) == 2 * len(ours) and all(r["status"] in ("ok", "skipped") for r in peers)

    def mine(r: dict) -> dict:
        return ours[(r["model"], r["target"], r["method"].endswith("(query heads)"))]

    for r in peers:
        if r["status"] == "ok":  # reported only at our widths, with a finite perplexity
            assert r["widths"] == mine(r)["widths"] and 1 < r["ppl"] < float("inf")
        else:
            assert r["reason"]
    # whole KV groups of the GQA model: Torch-Pruning keeps every key/value head, so no cell where ours drops one
    for r in peers:
        if r["model"] == "llama" and min(mine(r)["widths"]["heads"]) < 2:
            assert r["status"] == "skipped" and "KV" in r["reason"]
    text = (tmp_path / f"{bench.NAME}.md").read_text()
    assert text.startswith("## ") and "Torch-Pruning magnitude" in text
    sys.modules.pop("peer_torch_pruning_llm", None)
