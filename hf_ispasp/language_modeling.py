"""Causal-LM plumbing shared by ``hf-ispasp prune`` and the examples: text to fixed-length token chunks,
calibration subsets, greedy samples.

Chunks follow the transformers ``run_clm.py`` recipe: documents are tokenized, joined with EOS between them and
cut every ``block_size`` tokens, so there is no padding, every position is a real token, and no pad token is
needed (LLaMA and GPT-2 tokenizers have none). ``labels`` are a copy of ``input_ids`` (the models shift them), so
``Trainer`` with ``default_data_collator`` trains and evaluates on them directly; the pruner ignores labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["calibration_chunks", "chunk_text", "default_block_size", "greedy_sample"]

#: Longest default chunk: long enough to calibrate on realistic contexts, short enough for a CPU run.
MAX_DEFAULT_BLOCK = 1024


def default_block_size(model: nn.Module, tokenizer: Any, cap: int = MAX_DEFAULT_BLOCK) -> int:
    """``min(cap, the tokenizer's and the model's maximum length)``: a chunk the model can attend over."""
    limits = [cap]
    max_length = getattr(tokenizer, "model_max_length", None)
    if isinstance(max_length, int) and 0 < max_length < 10**8:  # unset lengths are ~1e30
        limits.append(max_length)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


def chunk_text(
    dataset: Any, tokenizer: Any, block_size: int, text_column: str = "text", num_proc: int | None = None,
    labels: bool = True,
) -> Any:
    """A ``datasets.Dataset`` of ``block_size``-token chunks of the text in ``dataset[text_column]``.

    Empty lines are skipped (the ``text`` loader yields one row a line). Documents are joined within map batches
    of 1000 rows and each batch's remainder shorter than ``block_size`` is dropped, as in ``run_clm.py``.

    Args:
        dataset: A ``datasets.Dataset`` with a text column.
        tokenizer: The model's tokenizer (its special tokens, e.g. LLaMA's BOS, are added per document).
        block_size: Tokens per chunk (>= 2: a chunk must hold one next-token prediction).
        text_column: Column holding the text.
        num_proc: Processes for ``Dataset.map``.
        labels: Add ``labels`` (a copy of ``input_ids``) for ``Trainer``.

    Raises:
        ValueError: ``block_size`` < 2, no such column, or the text is shorter than one chunk.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size={block_size!r} must be an integer >= 2")
    if text_column not in dataset.column_names:
        raise ValueError(f"the dataset has no column {text_column!r} (columns: {dataset.column_names})")
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch[text_column] if isinstance(t, str) and t.strip()]
        ids = tokenizer(texts, verbose=False)["input_ids"] if texts else []
        # EOS between documents, so a chunk never reads one document as the continuation of another.
        return {"input_ids": [seq + [eos] if eos is not None and seq[-1:] != [eos] else seq for seq in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = [token for seq in batch["input_ids"] for token in seq]
        chunks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
        out = {"input_ids": chunks, "attention_mask": [[1] * block_size for _ in chunks]}
        if labels:
            out["labels"] = [list(c) for c in chunks]
        return out

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                            desc="tokenizing")
    chunks = tokenized.map(group, batched=True, batch_size=1000, remove_columns=tokenized.column_names,
                           num_proc=num_proc, desc=f"grouping into chunks of {block_size}")
    if len(chunks) == 0:
        total = sum(len(ids) for ids in tokenized["input_ids"])
        raise ValueError(f"the text has {total} tokens, fewer than one chunk of block_size={block_size}; use more "
                         "text or a smaller block size")
    return chunks


def calibration_chunks(chunks: Any, num_samples: int, seed: int = 0) -> Any:
    """``num_samples`` chunks drawn at random (all when there are fewer), without labels."""
    subset = chunks.shuffle(seed=seed).select(range(min(num_samples, len(chunks))))
    return subset.remove_columns([c for c in subset.column_names if c in ("labels", "label")])


@torch.no_grad()
def greedy_sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    """``prompt`` and the model's greedy continuation, decoded together (so word boundaries come out right).

    A quick look at what pruning did to the model; greedy decoding makes it reproducible.
    """
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0], skip_special_tokens=True)
