"""The demo's fine-tuning recipes: a plain ``Trainer`` fine-tune and the cached MiniLM-L6 polarity classifier
that the demo, benchmarks and tests start from (not part of the installed library).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_ispasp.atomic import atomic_directory
from hf_ispasp.classification import padding_collator, tokenize_dataset

from .assets import cache_dir, minilm_path, polarity_dataset

__all__ = ["finetune_classifier", "finetuned_minilm_polarity"]

logger = logging.getLogger(__name__)


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
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=padding_collator(tokenizer))
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
