"""Parsing of image calibration batches, shared by the image adapters (transformers ViT, timm CNNs and ViTs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["image_tensor"]


def image_tensor(batch: Any, device: torch.device | None = None) -> torch.Tensor:
    """The image tensor (B x C x H x W) of a calibration batch.

    Accepts a tensor, an ``(images, labels)`` tuple or list (what a ``DataLoader`` over a ``TensorDataset``
    yields) or a dict with ``pixel_values`` (what an image processor returns). A single C x H x W image is
    treated as a batch of one.
    """
    images = batch
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise ValueError(
                f"an image calibration batch is a dict without 'pixel_values' (keys: {sorted(batch)}); "
                "run the image processor first or pass image tensors"
            )
        images = batch["pixel_values"]
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("an image calibration batch is an empty tuple")
        images = batch[0]
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(images)
    if not images.is_floating_point():
        raise TypeError(
            f"image calibration batches must hold float pixel values (normalised as for training), got {images.dtype}"
        )
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (batch, channels, height, width), got {tuple(images.shape)}")
    return images if device is None else images.to(device)
