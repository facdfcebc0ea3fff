"""Sequence-classification plumbing shared by ``hf-ispasp prune``, the examples, benchmarks and tests: tokenize,
batch for calibration, predict, score.

Everything here goes through the ordinary transformers / datasets APIs, so scripts do not copy it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = [
    "calibration_loader",
    "classification_metrics",
    "padding_collator",
    "predict_logits",
    "tokenize_dataset",
]

MAX_LENGTH = 64


def tokenize_dataset(dataset: Any, tokenizer: Any, max_length: int = MAX_LENGTH, text_column: str = "text") -> Any:
    """Tokenize without padding (batches are padded per batch, so padding never reaches the statistics)."""
    columns = [c for c in dataset.column_names if c != "label"]
    return dataset.map(
        lambda x: tokenizer(x[text_column], truncation=True, max_length=max_length), batched=True,
        remove_columns=columns,
    )


def padding_collator(tokenizer: Any) -> Any:
    """``DataCollatorWithPadding``: each batch padded to its own longest sequence."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def calibration_loader(tokenized: Any, tokenizer: Any, num_samples: int = 512, batch_size: int = 32,
                       seed: int = 0) -> DataLoader:
    """A DataLoader over ``num_samples`` examples (labels dropped), padded per batch."""
    subset = tokenized.shuffle(seed=seed).select(range(min(num_samples, len(tokenized))))
    subset = subset.remove_columns([c for c in subset.column_names if c in ("label", "labels")])
    return DataLoader(subset, batch_size=batch_size, collate_fn=padding_collator(tokenizer))


@torch.no_grad()
def predict_logits(model: nn.Module, tokenized: Any, tokenizer: Any, batch_size: int = 64) -> torch.Tensor:
    """Logits of a sequence classifier on a tokenized dataset, in order."""
    model.eval()
    data = tokenized.remove_columns([c for c in tokenized.column_names if c in ("label", "labels")])
    loader = DataLoader(data, batch_size=batch_size, collate_fn=padding_collator(tokenizer))
    device = next(model.parameters()).device
    out = [model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu() for batch in loader]
    return torch.cat(out)


def classification_metrics(
    logits: torch.Tensor, labels: Any, reference_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracy with its standard error; agreement and mean KL(reference || model) when a reference is given.

    The numbers come from the package's ``evaluate`` modules (:mod:`hf_ispasp.evaluation`: ``accuracy`` and
    ``pruning_fidelity``), the ones users load with ``evaluate.load``, so a report and a user's own evaluation
    cannot disagree. ``accuracy_stderr`` is the binomial standard error sqrt(acc (1 - acc) / n).
    """
    from .evaluation import compute  # importing evaluate costs seconds; only callers that score pay for it

    logits = logits.detach().cpu()
    predictions = logits.argmax(-1).numpy()
    acc = compute("accuracy", predictions=predictions, references=np.asarray(labels))["accuracy"]
    n = len(predictions)
    result = {"accuracy": acc, "accuracy_stderr": math.sqrt(acc * (1 - acc) / n), "n": n}
    if reference_logits is not None:
        fidelity = compute("pruning_fidelity", predictions=logits.double().numpy(),
                           references=reference_logits.detach().cpu().double().numpy())
        result["agreement"] = fidelity["agreement"]
        result["kl"] = fidelity["kl"]
    return result
