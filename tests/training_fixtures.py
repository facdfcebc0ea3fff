"""A tiny BERT classifier and a learnable padded token dataset, shared by the fine-tuning tests."""

from __future__ import annotations

import torch

VOCAB, LENGTH = 97, 12


def tiny_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # deterministic losses
    return BertForSequenceClassification(config).eval()


def classification_dataset(n: int, seed: int = 0):
    """Fixed-length rows with right padding; the label is learnable (is the first token in the upper half?)."""
    import datasets

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = (ids[:, 0] > VOCAB // 2).long()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                       "labels": labels.tolist()})


def calibration_batches() -> list[dict[str, torch.Tensor]]:
    """Four label-free batches of 8 rows (another seed than the training rows)."""
    data = classification_dataset(32, seed=1).remove_columns(["labels"])
    return [{k: torch.tensor(data[i : i + 8][k]) for k in data.column_names} for i in range(0, len(data), 8)]
