"""A tiny causal LM saved with a tokenizer built offline, and text files of real sentences (CLI and example tests).

The tokenizer is a word-level model trained here on the sentences themselves (no Hub access), wrapped in
``PreTrainedTokenizerFast`` with LLaMA's special tokens, and saved with ``save_pretrained`` beside the model, so
``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` read the folder like any checkpoint.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def polarity_sentences(n: int = 240) -> list[str]:
    """The first ``n`` sentences of the sentence-polarity corpus (both labels, real English)."""
    from demo.assets import polarity_csv

    with open(polarity_csv(), encoding="utf-8-sig") as f:
        rows = [row[1].strip() for row in csv.reader(f) if len(row) > 1 and row[1].strip()]
    half = n // 2
    return rows[:half] + rows[-(n - half) :]


def tiny_tokenizer(sentences: list[str], vocab_size: int = 600, pad_token: bool = True):
    """A lower-cased word-level tokenizer with ``<unk> <s> </s> <pad>`` that adds ``<s>`` to every text.

    ``pad_token=False`` leaves the pad token unset, as in LLaMA's and GPT-2's tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if pad_token else None, model_max_length=64)


def save_tiny_causal_lm(folder: Path, sentences: list[str], seed: int = 0, pad_token: bool = True) -> None:
    """A random LLaMA (hidden 32, 2 layers, 4 query / 2 KV heads, FFN 37) and its tokenizer, saved to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(sentences, pad_token=pad_token)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_text_files(folder: Path, sentences: list[str], validation: int = 40) -> tuple[Path, Path]:
    """``train.txt`` and ``validation.txt`` with one sentence a line (the ``text`` loader's format)."""
    train, dev = folder / "train.txt", folder / "validation.txt"
    train.write_text("\n".join(sentences[:-validation]) + "\n", encoding="utf-8")
    dev.write_text("\n".join(sentences[-validation:]) + "\n", encoding="utf-8")
    return train, dev
