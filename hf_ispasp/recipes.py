"""Shared task plumbing for the demo, benchmarks, examples and tests: tokenize, fine-tune (cached), evaluate.

Kept in the library so that scripts do not copy it; everything here goes through the ordinary
transformers / datasets APIs.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .assets import cache_dir, minilm_path, polarity_dataset
from .atomic import atomic_directory

__all__ = [
    "calibration_loader",
    "classification_metrics",
    "finetune_classifier",
    "finetuned_minilm_polarity",
    "predict_logits",
    "tokenize_dataset",
]

logger = logging.getLogger(__name__)

MAX_LENGTH = 64


def tokenize_dataset(dataset: Any, tokenizer: Any, max_length: int = MAX_LENGTH, text_column: str = "text") -> Any:
    """Tokenize without padding (batches are padded per batch, so padding never reaches the statistics)."""
    columns = [c for c in dataset.column_names if c != "label"]
    return dataset.map(
        lambda x: tokenizer(x[text_column], truncation=True, max_length=max_length), batched=True,
        remove_columns=columns,
    )


def _collator(tokenizer: Any) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def calibration_loader(tokenized: Any, tokenizer: Any, num_samples: int = 512, batch_size: int = 32,
                       seed: int = 0) -> DataLoader:
    """A DataLoader over ``num_samples`` examples (labels dropped), padded per batch."""
    subset = tokenized.shuffle(seed=seed).select(range(min(num_samples, len(tokenized))))
    subset = subset.remove_columns([c for c in subset.column_names if c in ("label", "labels")])
    return DataLoader(subset, batch_size=batch_size, collate_fn=_collator(tokenizer))


@torch.no_grad()
def predict_logits(model: nn.Module, tokenized: Any, tokenizer: Any, batch_size: int = 64) -> torch.Tensor:
    """Logits of a sequence classifier on a tokenized dataset, in order."""
    model.eval()
    data = tokenized.remove_columns([c for c in tokenized.column_names if c in ("label", "labels")])
    loader = DataLoader(data, batch_size=batch_size, collate_fn=_collator(tokenizer))
    device = next(model.parameters()).device
    out = [model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu() for batch in loader]
    return torch.cat(out)


def classification_metrics(
    logits: torch.Tensor, labels: Any, reference_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracy with its standard error; agreement and mean KL(reference || model) when a reference is given."""
    labels_t = torch.as_tensor(np.asarray(labels))
    correct = (logits.argmax(-1) == labels_t).float()
    acc = float(correct.mean())
    result = {"accuracy": acc, "accuracy_stderr": math.sqrt(acc * (1 - acc) / len(correct)), "n": len(correct)}
    if reference_logits is not None:
        result["agreement"] = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
        ref = torch.log_softmax(reference_logits.double(), -1)
        cur = torch.log_softmax(logits.double(), -1)
        result["kl"] = float((ref.exp() * (ref - cur)).sum(-1).mean())
    return result


def finetune_classifier(
    model: nn.Module, tokenizer: Any, train: Any, output_dir: str, epochs: float = 1.0, lr: float = 5e-5,
    batch_size: int = 32, seed: int = 0, max_steps: int = -1, **kwargs: Any,
) -> nn.Module:
    """Plain ``Trainer`` fine-tune (no evaluation, no checkpoints kept)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=output_dir, num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch_size,
        seed=seed, data_seed=seed, save_strategy="no", report_to=[], logging_steps=50, max_steps=max_steps,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **kwargs,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=_collator(tokenizer))
    trainer.train()
    return trainer.model


def finetuned_minilm_polarity(epochs: float = 1.0, seed: int = 0) -> str:
    """Folder of MiniLM-L6 fine-tuned on the sentence-polarity train split (trained once, then cached)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    target = Path(cache_dir()) / f"minilm-l6-polarity-e{epochs:g}-s{seed}"
    if (target / "model.safetensors").exists():
        return str(target)
    logger.info("fine-tuning MiniLM-L6 on sentence polarity (cached in %s)", target)
    source = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    data = polarity_dataset()
    train = tokenize_dataset(data["train"], tokenizer)
    work = os.path.join(cache_dir(), "trainer-tmp")
    model = finetune_classifier(model, tokenizer, train, work, epochs=epochs, seed=seed)

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_directory(target, write)
    return str(target)
