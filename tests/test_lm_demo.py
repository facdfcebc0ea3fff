"""The decoder-LM demo (demo/lm.py): Wikipedia splits, the byte-level BPE, LM chunks, perplexity, tiny training.

Everything is built from scratch in a temporary ``HF_ISPASP_CACHE`` (once for the module), so the tests never
read or write the user's cache.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gensim")

from demo import lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh cache folder for the whole module (the splits and the tokenizer are built once)."""
    path = tmp_path_factory.mktemp("lm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ISPASP_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tokenizer(lm_cache: Path):
    return lm.wiki_tokenizer()


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_splits_are_disjoint_whole_articles_and_deterministic(lm_cache: Path) -> None:
    paths = lm.wiki_splits()
    assert set(paths) == set(lm.SPLITS) and all(p.parent == lm_cache / "wiki" for p in paths.values())
    splits = {s: _read(p) for s, p in paths.items()}
    titles = {s: [a["title"] for a in arts] for s, arts in splits.items()}
    everything = [t for s in lm.SPLITS for t in titles[s]]
    assert len(everything) == len(set(everything)) == 106  # every article once, redirects dropped
    chars = {s: sum(len(a["text"]) for a in arts) for s, arts in splits.items()}
    total = sum(chars.values())
    assert 2.9e6 < total < 3.2e6
    for split in ("validation", "test"):
        assert 0.04 < chars[split] / total < 0.1, chars
    for article in (a for arts in splits.values() for a in arts):
        text = article["text"]
        assert "'''" not in text and "[[" not in text and "{{" not in text and "REDIRECT" not in text[:20]
    # The assignment depends on the titles only, not on the order the articles come in.
    shuffled = [a for arts in splits.values() for a in arts]
    random.Random(0).shuffle(shuffled)
    again = lm._assign_splits(shuffled)
    assert {s: sorted(a["title"] for a in arts) for s, arts in again.items()} == {
        s: sorted(t) for s, t in titles.items()
    }
    # A second call reuses the files.
    stamp = {s: p.stat().st_mtime_ns for s, p in paths.items()}
    assert lm.wiki_splits() == paths and {s: p.stat().st_mtime_ns for s, p in paths.items()} == stamp


def test_clean_removes_markup_and_empty_sections() -> None:
    raw = "'''Bold''' and ''italic''.\n\n\n==History==\nText  here.\n* item one\n*\n==References==\n\n==Links==\n*\n"
    assert lm._clean(raw) == "Bold and italic.\nHistory\nText here.\nitem one"


def test_tokenizer_round_trips_and_compresses(lm_cache: Path, tokenizer) -> None:
    folder = lm_cache / "tokenizers" / f"wiki-bpe4096-d{lm.DATA_VERSION}"
    assert (folder / "tokenizer.json").exists()
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == tokenizer.bos_token == lm.EOS and tokenizer.pad_token == lm.PAD
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    text = _read(lm.wiki_splits()["validation"])[0]["text"][:3000]
    for sample in (text, "naïve café — 東京 ∑ 🙂\n\ttabs  and  spaces", " leading space"):
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == sample
    # Learned merges: well over 3 characters a token on held-out English (bytes alone would give 1).
    assert len(text) / len(tokenizer(text)["input_ids"]) > 3


def test_lm_chunks_have_fixed_length_and_follow_the_text(tokenizer) -> None:
    data = lm.lm_dataset("validation", tokenizer, seq_len=64)
    assert set(data.column_names) == {"input_ids", "attention_mask", "labels"}
    articles = _read(lm.wiki_splits()["validation"])
    stream = []
    for a in articles:
        stream += tokenizer(a["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(data) == len(stream) // 64
    flat = [t for row in data["input_ids"] for t in row]
    assert flat == stream[: len(flat)]
    for row in data:
        assert len(row["input_ids"]) == 64 and row["labels"] == row["input_ids"] and all(row["attention_mask"])
    assert len(lm.lm_dataset("validation", tokenizer, seq_len=64, max_chunks=5)) == 5


def _tiny_model(kind: str = "llama"):
    class Tok:
        bos_token_id = eos_token_id = 0
        pad_token_id = 1

    return lm.build_decoder(lm.recipe_for(kind, tiny=True, vocab_size=97), Tok()).eval()


@pytest.mark.parametrize("kind", lm.KINDS)
def test_perplexity_of_random_model_is_about_the_vocabulary(kind: str) -> None:
    import datasets

    model = _tiny_model(kind)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 97, (12, 20), generator=gen).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 20] * 12, "labels": ids})
    ppl = lm.perplexity(model, data, batch_size=5)
    assert math.isfinite(ppl) and 0.8 * 97 < ppl < 1.25 * 97


def test_perplexity_is_token_weighted_and_skips_padding() -> None:
    import datasets

    model = _tiny_model().train()
    gen = torch.Generator().manual_seed(1)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    lengths = [20, 3, 11, 20, 6, 2, 15]
    for n in lengths:
        ids = torch.randint(2, 97, (20,), generator=gen)
        labels = ids.clone()
        labels[n:] = -100
        labels[1] = -100 if n == 20 else labels[1]  # an ignored label inside a full row
        ids[n:] = torch.randint(2, 97, (20 - n,), generator=gen)  # garbage under the padding
        rows["input_ids"].append(ids.tolist())
        rows["attention_mask"].append([1] * n + [0] * (20 - n))
        rows["labels"].append(labels.tolist())
    data = datasets.Dataset.from_dict(rows)
    # Reference: every sequence alone, unpadded, the NLL summed over the labels it predicts.
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, n in zip(rows["input_ids"], rows["labels"], lengths, strict=True):
            logits = model.eval()(input_ids=torch.tensor([ids[:n]])).logits[0, :-1]
            target = torch.tensor(labels[1:n])
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    model.train()
    expected = math.exp(total / count)
    for batch_size in (1, 3, 16):  # a mean of per-batch means would differ between batch sizes
        assert lm.perplexity(model, data, batch_size=batch_size) == pytest.approx(expected, rel=1e-4)
    assert model.training  # the caller's mode is put back


def test_recipe_digest_names_the_folder(lm_cache: Path) -> None:
    a, b = lm.recipe_for("llama"), lm.recipe_for("llama", max_steps=7)
    assert a.digest() != b.digest() and a.digest() == lm.recipe_for("llama").digest()
    assert a.folder() == lm_cache / "models" / f"llama-wiki-{a.digest()}"
    assert (a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads, a.intermediate_size) == (256, 4, 8, 4, 704)
    assert lm.recipe_for("gpt2").intermediate_size == 1024
    with pytest.raises(ValueError, match="kind"):
        lm.recipe_for("bert")
    with pytest.raises(ValueError, match="recipe is for"):
        lm.trained_decoder("gpt2", recipe=a)


@pytest.mark.parametrize("kind", lm.KINDS)
def test_tiny_training_learns_and_is_cached(kind: str, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    folder = lm.trained_decoder(kind, tiny=True)
    assert folder == lm.recipe_for(kind, tiny=True).folder()
    record = lm.training_record(folder)
    curve = [point["perplexity"] for point in record["curve"]]
    assert record["steps"] == 30 and len(curve) == 4  # step 0, 10, 20, 30
    assert curve[0] > 3000 and curve[-1] < 0.7 * curve[0]  # from about the vocabulary size, clearly down
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[kind]
    if kind == "llama":
        assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    validation = lm.lm_dataset("validation", AutoTokenizer.from_pretrained(folder), 32, 16)
    assert lm.perplexity(model, validation) == pytest.approx(record["validation_perplexity"], rel=1e-4)
    assert record["validation_perplexity"] == pytest.approx(curve[-1], rel=1e-3)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached decoder was trained again")

    monkeypatch.setattr(Trainer, "train", no_training)
    assert lm.trained_decoder(kind, tiny=True) == folder


@pytest.mark.slow
def test_benchmark_tiny(lm_cache: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    import train_decoders

    assert train_decoders.main(["--tiny", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "train_decoders.json").read_text())
    assert data["meta"]["tiny"] is True and {r["model"] for r in data["records"]} == set(lm.KINDS)
    for r in data["records"]:
        assert r["reloaded_test_perplexity"] == pytest.approx(r["test_perplexity"], rel=1e-4)
    assert (tmp_path / "train_decoders.md").read_text().startswith("## ")
