"""Tiny randomly initialised models for every registered adapter, and small calibration sets."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 99

# Odd sizes (FFN 37, 3 heads of 10) catch shape bugs that round numbers hide.
_TEXT_KWARGS = dict(hidden_size=30, num_attention_heads=3, intermediate_size=37, num_hidden_layers=2, vocab_size=VOCAB,
                    max_position_embeddings=64, pad_token_id=0)
TEXT_CONFIGS: dict[str, dict] = {
    "bert": _TEXT_KWARGS,
    "roberta": {**_TEXT_KWARGS, "pad_token_id": 1},
    "xlm-roberta": {**_TEXT_KWARGS, "pad_token_id": 1},
    "electra": {**_TEXT_KWARGS, "embedding_size": 16},
    "distilbert": dict(dim=30, n_heads=3, hidden_dim=37, n_layers=2, vocab_size=VOCAB, max_position_embeddings=64,
                       pad_token_id=0),
}


# Decoders: FFN 37, 3 KV heads of 6 with 2 query heads each (GPT-2: 6 heads, multi-head); Qwen2 and GPT-2 tie the
# input and output embeddings.
_DECODER_KWARGS = dict(hidden_size=36, num_attention_heads=6, num_key_value_heads=3, intermediate_size=37,
                       num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
DECODER_CONFIGS: dict[str, dict] = {
    "llama": _DECODER_KWARGS,
    "mistral": {**_DECODER_KWARGS, "sliding_window": 16},
    "qwen2": {**_DECODER_KWARGS, "tie_word_embeddings": True},
    "qwen3": {**_DECODER_KWARGS, "head_dim": 8},
    "phi3": _DECODER_KWARGS,
    "gpt2": dict(n_embd=36, n_head=6, n_inner=37, n_layer=2, vocab_size=VOCAB, n_positions=64, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
}


def tiny_decoder_model(model_type: str, head: str = "AutoModelForCausalLM", seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **DECODER_CONFIGS[model_type], num_labels=3)
    return getattr(transformers, head).from_config(config).eval()


def tiny_text_model(model_type: str, head: str = "AutoModelForSequenceClassification", seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    labels = 2 if "QuestionAnswering" in head else 3
    config = transformers.AutoConfig.for_model(model_type, **TEXT_CONFIGS[model_type], num_labels=labels)
    return getattr(transformers, head).from_config(config).eval()


def tiny_factories() -> dict[str, Callable[[], nn.Module]]:
    """One constructor per registry key; vision keys come from tests/vision_fixtures.py when available."""
    factories: dict[str, Callable[[], nn.Module]] = {k: (lambda k=k: tiny_text_model(k)) for k in TEXT_CONFIGS}
    factories.update({k: (lambda k=k: tiny_decoder_model(k)) for k in DECODER_CONFIGS})
    try:
        from vision_fixtures import tiny_vision_models
    except ImportError:
        return factories
    factories.update(tiny_vision_models())
    return factories


def token_batches(
    num: int = 24, batch_size: int = 8, min_len: int = 5, max_len: int = 14, seed: int = 1, pad_id: int = 0,
    pad_to: int | None = None, pad_fill: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of random token ids; ``pad_fill`` puts garbage ids under the padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=gen)
    seqs = [torch.randint(3, VOCAB, (int(n),), generator=gen) for n in lengths]
    batches = []
    for start in range(0, num, batch_size):
        chunk = seqs[start : start + batch_size]
        width = pad_to or max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
            if pad_fill is not None:
                ids[i, len(s) :] = torch.randint(3, VOCAB, (width - len(s),), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and the suite shares a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_classifier(folder) -> None:
    """A random 2-layer BERT sentence classifier with the (real) MiniLM tokenizer, saved to ``folder``."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from demo.assets import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture
def batches() -> list[dict[str, torch.Tensor]]:
    return token_batches()
