"""Small decoder language models trained from scratch on a real Wikipedia excerpt, for pruning evidence.

No pretrained decoder LM can be downloaded here, so the demo trains its own: a LLaMA-style model (grouped-query
attention, gated MLP) and a GPT-2, a few million parameters each, on the 106 Wikipedia articles that ship in
gensim's test data. Everything goes through the loading code users run on Hub assets: the splits are JSON-lines
files read with ``datasets.load_dataset("json", ...)``, the tokenizer and the models are folders read with
``from_pretrained``. Each step is cached under :func:`demo.assets.cache_dir` (``$HF_ISPASP_CACHE``) and written
atomically, so an interrupted run never leaves a half-written folder that a later run would trust.

    from demo.lm import trained_decoder, lm_dataset, perplexity
    folder = trained_decoder("llama")          # trains once (~15 min on 2 cores), then cached
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    perplexity(model, lm_dataset("test", tokenizer))
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import json
import logging
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_ispasp.atomic import atomic_directory

from .assets import cache_dir, wiki_bz2

__all__ = [
    "KINDS",
    "DecoderRecipe",
    "build_decoder",
    "lm_dataset",
    "perplexity",
    "recipe_for",
    "trained_decoder",
    "training_record",
    "wiki_articles",
    "wiki_splits",
    "wiki_tokenizer",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
KINDS = ("llama", "gpt2")
HELDOUT_FRACTION = 0.05  # of the characters, for validation and for test each
EOS = "<|endoftext|>"  # also BOS: separates articles in the concatenated stream (GPT-2 convention)
PAD = "<pad>"  # a token of its own, so padding can never be confused with a document boundary
# Bump when the cleaning or the split changes: the split folder, the tokenizer and every model depend on it.
DATA_VERSION = 1
TRAINING_RECORD = "training.json"

# --------------------------------------------------------------------------------------------- data


def _clean(text: str) -> str:
    """Plain text from ``filter_wiki`` output: no bold/italic quotes, empty list items or empty sections."""
    text = text.replace("'''", "").replace("''", "").replace("\xa0", " ")
    lines = []
    for raw in text.splitlines():
        line = re.sub(r"[ \t]+", " ", raw).strip()
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list / indent markers
        if not line:
            continue
        heading = re.fullmatch(r"=+\s*(.*?)\s*=+", line)
        lines.append((True, heading.group(1)) if heading else (False, line))
    # A heading is kept only when text follows it (References / External links are empty after filter_wiki).
    kept = [line for i, (is_heading, line) in enumerate(lines)
            if not is_heading or (i + 1 < len(lines) and not lines[i + 1][0])]
    return "\n".join(kept)


def wiki_articles() -> list[dict[str, str]]:
    """The excerpt's articles (redirects dropped) as ``{"title", "text"}``, in file order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(wiki_bz2()) as f:
        for title, raw, _ in extract_pages(f):
            text = filter_wiki(raw)
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = _clean(text)
            if text:
                articles.append({"title": title, "text": text})
    return articles


def _assign_splits(articles: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Whole articles to splits: in the order of a hash of the title, validation and test each take articles
    until they hold ``HELDOUT_FRACTION`` of the characters, train the rest (file order kept inside a split).

    Splitting by article keeps held-out text from sharing sentences with training text; hashing the title
    makes the split independent of the file order and stable across machines.
    """
    total = sum(len(a["text"]) for a in articles)
    rank = {a["title"]: hashlib.sha1(a["title"].encode()).hexdigest() for a in articles}
    chosen: dict[str, str] = {}
    for split in ("validation", "test"):
        size = 0
        for a in sorted(articles, key=lambda a: rank[a["title"]]):
            if size >= HELDOUT_FRACTION * total:
                break
            if a["title"] not in chosen:
                chosen[a["title"]] = split
                size += len(a["text"])
    return {s: [a for a in articles if chosen.get(a["title"], "train") == s] for s in SPLITS}


def wiki_splits() -> dict[str, Path]:
    """JSON-lines files ``{train,validation,test}.jsonl`` (one article a line) in ``cache_dir()/"wiki"``.

    Built once from gensim's Wikipedia excerpt; ``splits.json`` beside them records the titles and sizes.
    """
    folder = cache_dir() / "wiki"
    paths = {s: folder / f"{s}.jsonl" for s in SPLITS}
    meta = folder / "splits.json"
    if meta.exists() and json.loads(meta.read_text()).get("version") == DATA_VERSION:
        return paths
    splits = _assign_splits(wiki_articles())
    logger.info("writing the Wikipedia splits to %s", folder)

    def write(tmp: str) -> None:
        for split, articles in splits.items():
            with open(Path(tmp) / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for a in articles:
                    f.write(json.dumps(a, ensure_ascii=False) + "\n")
        summary = {s: {"articles": len(a), "characters": sum(len(x["text"]) for x in a),
                       "titles": [x["title"] for x in a]} for s, a in splits.items()}
        Path(tmp, "splits.json").write_text(json.dumps({"version": DATA_VERSION, **summary}, indent=1))

    atomic_directory(folder, write)
    return paths


def _load_split(split: str) -> Any:
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    path = wiki_splits()[split]
    return datasets.load_dataset("json", data_files={split: str(path)}, split=split,
                                 cache_dir=str(cache_dir() / "datasets"))


# ---------------------------------------------------------------------------------------------- tokenizer


def wiki_tokenizer(vocab_size: int = 4096) -> Any:
    """A byte-level BPE tokenizer trained on the train split only (so held-out text stays unseen), loaded with
    ``AutoTokenizer.from_pretrained`` from ``cache_dir()/"tokenizers"/"wiki-bpe<vocab>-d<data version>"``.

    Byte-level: every string round-trips (no unknown token), as with GPT-2 and LLaMA-3 tokenizers.
    """
    from transformers import AutoTokenizer

    folder = cache_dir() / "tokenizers" / f"wiki-bpe{vocab_size}-d{DATA_VERSION}"
    if not (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        texts = _load_split("train")["text"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                          pad_token=PAD, model_max_length=1024)
        atomic_directory(folder, wrapped.save_pretrained)
    return AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------- LM dataset


def lm_dataset(split: str, tokenizer: Any, seq_len: int = 128, max_chunks: int | None = None) -> Any:
    """Fixed-length chunks of the split's token stream, as a ``datasets.Dataset`` with ``input_ids``,
    ``attention_mask`` (all ones) and ``labels`` (= ``input_ids``; the models shift them).

    Articles are joined with EOS between them and the stream is cut every ``seq_len`` tokens (the remainder is
    dropped), the usual causal-LM recipe (:func:`hf_ispasp.language_modeling.chunk_text`): no padding, every
    position is a prediction. ``max_chunks`` keeps the first chunks only (quick runs).
    """
    from hf_ispasp.language_modeling import chunk_text

    data = chunk_text(_load_split(split), tokenizer, seq_len)  # the CLI's and the example's recipe
    if max_chunks is not None:
        data = data.select(range(min(max_chunks, len(data))))
    return data


@torch.no_grad()
def perplexity(model: nn.Module, dataset: Any, batch_size: int = 16) -> float:
    """exp(mean next-token NLL over every predicted token of ``dataset``).

    Token-weighted (not a mean of per-batch means, which over-weights short batches); labels of -100 and
    positions with ``attention_mask == 0`` are excluded. Runs the model in eval mode without gradients and puts
    the previous mode back. The per-batch NLL sums and token counts go through the package's ``perplexity``
    ``evaluate`` module (``hf_ispasp.evaluation``), the one users load, which adds them up in batch order.
    """
    from hf_ispasp.evaluation import compute

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            ids = torch.as_tensor(batch["input_ids"], device=device)
            mask = torch.as_tensor(batch["attention_mask"], device=device) if "attention_mask" in batch else None
            labels = torch.as_tensor(batch["labels"], device=device) if "labels" in batch else ids.clone()
            if mask is not None:
                labels = labels.masked_fill(mask == 0, -100)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                              ignore_index=-100, reduction="sum")
            sums.append(float(nll))
            counts.append(int((target != -100).sum()))
    finally:
        model.train(was_training)
    if sum(counts) == 0:
        raise ValueError("perplexity: the dataset has no predicted token (every label is -100 or padding)")
    return compute("perplexity", nll=sums, num_tokens=counts)["perplexity"]


# ---------------------------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class DecoderRecipe:
    """Everything that determines a trained decoder; its digest names the cache folder.

    ``intermediate_size`` is the LLaMA gated-MLP width or the GPT-2 ``n_inner``; ``num_kv_heads`` is used by
    LLaMA only (grouped-query attention). ``max_train_chunks`` / ``max_eval_chunks`` cut the data (tests).
    """

    kind: str
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 704
    max_positions: int = 256
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    max_steps: int = 600
    eval_every: int = 60
    max_train_chunks: int | None = None
    max_eval_chunks: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: expected one of {KINDS}")
        if self.seq_len > self.max_positions:
            raise ValueError(f"seq_len={self.seq_len} exceeds max_positions={self.max_positions}")

    def digest(self) -> str:
        blob = json.dumps({**dataclasses.asdict(self), "data_version": DATA_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def folder(self) -> Path:
        return cache_dir() / "models" / f"{self.kind}-wiki-{self.digest()}"


def recipe_for(kind: str, tiny: bool = False, **overrides: Any) -> DecoderRecipe:
    """The default recipe of ``kind`` ("llama" | "gpt2"), or a tiny one that trains in seconds (tests).

    The step count was sized from measured throughput so that each full model trains in about 15 minutes on one
    thread of a shared 2-core machine (1.2 s a step of 16 x 128 tokens; two OpenMP threads stalled at 5-6 s a
    step whenever a neighbour held a core) while its validation perplexity flattens (``benchmarks/
    train_decoders.py`` reports the curve).
    """
    if tiny:
        # Odd widths (FFN 37) catch shape bugs; 2 KV heads for 4 query heads keep GQA in the tiny LLaMA.
        base: dict[str, Any] = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=37,
                                    max_positions=64, seq_len=32, batch_size=8, learning_rate=5e-3, max_steps=30,
                                    eval_every=10, max_train_chunks=256, max_eval_chunks=16)
    else:
        base = dict(intermediate_size=1024 if kind == "gpt2" else 704)
    return DecoderRecipe(kind=kind, **{**base, **overrides})


def build_decoder(recipe: DecoderRecipe, tokenizer: Any) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` of the recipe's shape."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(recipe.seed)
    if recipe.kind == "llama":
        config = LlamaConfig(
            vocab_size=recipe.vocab_size, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
            num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
            num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=recipe.max_positions, **ids,
        )
        return LlamaForCausalLM(config)
    # No dropout, as in the LLaMA model: a few passes over the data do not over-fit a model this small.
    config = GPT2Config(
        vocab_size=recipe.vocab_size, n_embd=recipe.hidden_size, n_layer=recipe.num_layers, n_head=recipe.num_heads,
        n_inner=recipe.intermediate_size, n_positions=recipe.max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **ids,
    )
    model = GPT2LMHeadModel(config)
    # transformers 5.24 infers loss_type from the class name, which "GPT2LMHeadModel" does not match; Trainer then
    # divides the summed loss by the unshifted label count, so its eval_loss came out (L-1)/L of the true mean.
    model.loss_type = "ForCausalLM"
    return model


def _eval_curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{"step": int(e["step"]), "eval_loss": e["eval_loss"], "perplexity": math.exp(e["eval_loss"])}
            for e in log_history if "eval_loss" in e]


def _train(recipe: DecoderRecipe, tokenizer: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Train one decoder with ``Trainer`` (AdamW, linear warm-up then cosine decay, periodic validation)."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    train = lm_dataset("train", tokenizer, recipe.seq_len, recipe.max_train_chunks)
    validation = lm_dataset("validation", tokenizer, recipe.seq_len, recipe.max_eval_chunks)
    test = lm_dataset("test", tokenizer, recipe.seq_len, recipe.max_eval_chunks)
    model = build_decoder(recipe, tokenizer)

    class LogPerplexity(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float], **kw: Any) -> None:
            logger.info("%s step %d/%d (%.0f s): validation perplexity %.2f", recipe.kind, state.global_step,
                        recipe.max_steps, time.perf_counter() - start, math.exp(metrics["eval_loss"]))

    with tempfile.TemporaryDirectory(prefix="hf_ispasp-trainer-") as work:  # nothing is saved there
        args = TrainingArguments(
            output_dir=work, max_steps=recipe.max_steps, per_device_train_batch_size=recipe.batch_size,
            per_device_eval_batch_size=32, learning_rate=recipe.learning_rate, weight_decay=recipe.weight_decay,
            adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", lr_scheduler_type="cosine",
            warmup_steps=max(1, round(recipe.warmup_fraction * recipe.max_steps)), eval_strategy="steps",
            eval_steps=recipe.eval_every, eval_on_start=True, logging_steps=recipe.eval_every, save_strategy="no",
            report_to=[], seed=recipe.seed, data_seed=recipe.seed, use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                          data_collator=default_data_collator, callbacks=[LogPerplexity()])
        trainer.remove_callback(PrinterCallback)  # the curve goes to the log and training.json, not to stdout
        # CPU time as well as wall time: on a shared machine the wall time says more about the neighbours.
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model = trainer.model.eval()
    steps = trainer.state.global_step
    record = {
        "recipe": dataclasses.asdict(recipe),
        "digest": recipe.digest(),
        "data_version": DATA_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_chunks": len(train),
        "train_tokens_available": len(train) * recipe.seq_len,
        "train_tokens_seen": steps * recipe.batch_size * recipe.seq_len,
        "epochs": steps * recipe.batch_size / len(train),
        "steps": steps,
        "threads": torch.get_num_threads(),
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "curve": _eval_curve(trainer.state.log_history),
        "train_loss": [{"step": int(e["step"]), "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
        "validation_tokens": len(validation) * (recipe.seq_len - 1),
        "test_tokens": len(test) * (recipe.seq_len - 1),
        "validation_perplexity": perplexity(model, validation),
        "test_perplexity": perplexity(model, test),
    }
    return model, record


def trained_decoder(kind: str = "llama", recipe: DecoderRecipe | None = None, tiny: bool = False) -> Path:
    """Folder of a decoder trained from scratch on the Wikipedia train split (trained once, then cached).

    The folder (``cache_dir()/"models"/"<kind>-wiki-<recipe digest>"``) holds the model and the tokenizer for
    ``from_pretrained``, and ``training.json``: the recipe, the validation-perplexity curve and the final
    validation / test perplexity. It appears in one atomic step, so its existence means a finished run.

    Args:
        kind: "llama" (grouped-query attention, gated MLP) or "gpt2".
        recipe: overrides the default recipe of ``kind`` (see :func:`recipe_for`).
        tiny: a 2-layer model trained for a few steps on a slice of the data (tests).
    """
    recipe = recipe or recipe_for(kind, tiny=tiny)
    if recipe.kind != kind:
        raise ValueError(f"kind={kind!r} but the recipe is for {recipe.kind!r}")
    folder = recipe.folder()
    if (folder / TRAINING_RECORD).exists():
        return folder
    tokenizer = wiki_tokenizer(recipe.vocab_size)
    logger.info("training %s from scratch (recipe %s) into %s", kind, recipe.digest(), folder)
    model, record = _train(recipe, tokenizer)

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        Path(tmp, TRAINING_RECORD).write_text(json.dumps(record, indent=1))

    atomic_directory(folder, write)
    return folder


def training_record(folder: str | Path) -> dict[str, Any]:
    """The ``training.json`` of a trained decoder folder."""
    return json.loads((Path(folder) / TRAINING_RECORD).read_text())
