"""Vision demo plumbing shared by the image example, the vision benchmarks and tests: EfficientNet-Lite0's
offline ImageNet weights mapped onto timm, Fashion-MNIST-style batches, and a plain train / evaluate loop.

Not part of the installed library; timm is imported only where a timm model is built.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ImageBatches",
    "efficientnet_lite0",
    "efficientnet_lite0_state_dict",
    "evaluate_accuracy",
    "train_classifier",
]

logger = logging.getLogger(__name__)


# EfficientNet-Lite0 ---------------------------------------------------------------------------------------
def efficientnet_lite0_state_dict(path: str | None = None) -> dict[str, torch.Tensor]:
    """The lukemelas-style EfficientNet-Lite0 ImageNet weights renamed for timm ``tf_efficientnet_lite0``.

    Both state dicts list the same 247 tensors (``num_batches_tracked`` aside) in the same order, so the
    mapping is by position; every shape is checked.
    """
    import timm

    from .assets import efficientnet_lite0_weights

    source = torch.load(path or efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    skeleton = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    dst = [(k, v) for k, v in skeleton.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"EfficientNet-Lite0 weights have {len(src)} tensors, timm expects {len(dst)}")
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(src, dst, strict=True):
        if value.shape != ref.shape:
            raise ValueError(f"{src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = value
    return mapped


def efficientnet_lite0(num_classes: int = 1000, pretrained: bool = True) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights; a new classifier when ``num_classes != 1000``."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        model.load_state_dict(efficientnet_lite0_state_dict(), strict=False)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


# Image data (Fashion-MNIST and friends) --------------------------------------------------------------------
class ImageBatches:
    """Batches of ``(images, labels)`` from uint8 grey images, resized and normalised on the fly.

    Keeps only the uint8 28x28 arrays in memory; each batch is upsampled (bilinear), repeated to
    ``channels`` and normalised with ``mean``/``std``. Iterating twice gives the same batches unless
    ``shuffle`` is set (then each pass draws a new order from ``seed`` and the pass number).
    """

    def __init__(
        self, images: Any, labels: Any, batch_size: int = 64, size: int = 64, channels: int = 3,
        mean: float = 0.5, std: float = 0.5, shuffle: bool = False, seed: int = 0,
    ) -> None:
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels).long()
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        self.batch_size, self.size, self.channels = batch_size, size, channels
        self.mean, self.std, self.shuffle, self.seed = mean, std, shuffle, seed
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.images.shape[0] / self.batch_size)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return ((x - self.mean) / self.std).contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = self.images.shape[0]
        if self.shuffle:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + self._epoch))
            self._epoch += 1
        else:
            order = torch.arange(count)
        for start in range(0, count, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.transform(self.images[index]), self.labels[index]


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if getattr(getattr(model, "config", None), "model_type", None):
        return _logits(model(pixel_values=images))
    return _logits(model(images))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Iterable[Any]) -> float:
    """Top-1 accuracy over ``(images, labels)`` batches (timm or transformers image classifiers)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for images, labels in batches:
        pred = _forward(model, images.to(device)).argmax(-1).cpu()
        correct += int((pred == labels).sum())
        total += int(labels.numel())
    model.train(was_training)
    return correct / max(total, 1)


def train_classifier(
    model: nn.Module, batches: Iterable[Any], steps: int, lr: float = 1e-3, weight_decay: float = 1e-4,
    warmup: int = 20, log_every: int = 50,
) -> list[float]:
    """Fine-tune with AdamW and a cosine schedule for ``steps`` steps (cycling over ``batches``); returns losses.

    BatchNorm statistics are updated (train mode), so a pruned CNN re-estimates them as it trains.
    """
    if steps < 1:
        return []
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    step = 0
    while step < steps:
        for images, labels in batches:
            loss = F.cross_entropy(_forward(model, images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
            if log_every and step % log_every == 0:
                logger.info("step %d/%d loss %.4f", step, steps, sum(losses[-log_every:]) / log_every)
            if step >= steps:
                break
    model.eval()
    return losses
