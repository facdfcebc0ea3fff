"""Vision support: image calibration batches, the timm checkpoint format, a FLOPs-target helper and the
EfficientNet-Lite0 / Fashion-MNIST plumbing shared by the vision example, benchmarks and tests.

timm is optional (``pip install hf_ispasp[timm]``): this module imports it only where a timm model is built.
Importing it registers the timm checkpoint format with :func:`hf_ispasp.save_pruned` / :func:`load_pruned`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .adapters.base import adapter_for
from .serialization import load_state_dict_checked, register_format

__all__ = [
    "TIMM_RECORD",
    "ImageBatches",
    "create_timm_model",
    "efficientnet_lite0",
    "efficientnet_lite0_state_dict",
    "evaluate_accuracy",
    "ffn_ratio_for_flops",
    "image_tensor",
    "is_timm_model",
    "load_timm_pruned",
    "save_timm_pruned",
    "train_classifier",
]

logger = logging.getLogger(__name__)

TIMM_RECORD = "ispasp_timm.json"
TIMM_FORMAT = "hf_ispasp.timm/1"
WEIGHTS = "model.safetensors"


# Calibration batches -----------------------------------------------------------------------------------
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


# FLOPs target -------------------------------------------------------------------------------------------
def ffn_ratio_for_flops(
    model: nn.Module, fraction: float, head_keep_ratio: float = 1.0, inputs: Any = None, tolerance: float = 0.005
) -> float:
    """Uniform ``ffn_keep_ratio`` whose compacted model costs about ``fraction`` of the dense FLOPs.

    Bisects on a weight-free compaction (the first ``k`` groups of every block, which costs the same as any
    other ``k`` groups), so no data is needed. Heads, when the model has any, are kept at ``head_keep_ratio``.

    Args:
        model: A supported model.
        fraction: Target FLOPs as a fraction of the dense model's, in (0, 1].
        head_keep_ratio: Keep ratio of attention heads held fixed while the FFN ratio is searched.
        inputs: Inputs for counting (default: the adapter's ``example_inputs()``).
        tolerance: Stop once the bracket on the ratio is this narrow.
    """
    from .config import kept_count
    from .metrics import count_flops

    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    inputs = inputs if inputs is not None else adapter_for(model).example_inputs()
    dense = count_flops(model, inputs)

    def cost(ratio: float) -> float:
        candidate = copy.deepcopy(model)
        adapter = adapter_for(candidate)
        for index in range(len(adapter.layers())):
            for block in adapter.blocks(index):
                keep = kept_count(block.num_groups, ratio if block.kind == "ffn" else head_keep_ratio)
                if keep < block.num_groups:
                    adapter.compact(block, torch.arange(keep))
        return count_flops(candidate, inputs) / dense

    low, high = 0.0, 1.0
    if cost(1e-6) > fraction:
        logger.warning("even one group per block costs more than %.3f of the dense FLOPs", fraction)
        return 1e-6
    while high - low > tolerance:
        mid = (low + high) / 2
        if cost(mid) > fraction:
            high = mid
        else:
            low = mid
    return max(low, 1e-6)


# timm checkpoints ----------------------------------------------------------------------------------------
def create_timm_model(name: str, input_size: int | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` that remembers ``kwargs`` so :func:`load_pruned` can rebuild it.

    ``save_pruned`` records the architecture and ``num_classes`` of any timm model; constructor arguments beyond
    those (``img_size``, ``channels``, ``depth``, ...) are only known when the model was built here or when
    ``model.ispasp_timm_kwargs`` is set by hand. ``input_size`` (pixels) sets the resolution used for FLOPs
    counting in the pruning report (``pretrained_cfg['input_size']``).
    """
    import timm

    model = timm.create_model(name, **kwargs)
    model.ispasp_timm_kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "num_classes")}
    if input_size is not None:
        channels = model.pretrained_cfg.get("input_size", (3,))[0]
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (channels, input_size, input_size)}
    return model


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and not hasattr(model, "save_pretrained")


def save_timm_pruned(model: nn.Module, folder: str) -> None:
    """Weights as safetensors plus a JSON record: timm architecture, constructor arguments and per-block widths."""
    adapter = adapter_for(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture")
    if not architecture:
        raise ValueError(
            f"cannot save this {type(model).__name__}: it has no pretrained_cfg['architecture']; build timm models "
            "with timm.create_model(name, ...) so the checkpoint can be rebuilt"
        )
    metadata = getattr(model, "ispasp_metadata", None) or {}
    record = {
        "format": TIMM_FORMAT,
        "version": __version__,
        "architecture": architecture,
        "model_kwargs": adapter.create_kwargs(),
        "widths": adapter.widths(),
        "pruner_config": metadata.get("pruner_config"),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, TIMM_RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


def _is_timm_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TIMM_RECORD))


def load_timm_pruned(path: str, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a timm model saved by :func:`save_timm_pruned`: dense skeleton, recorded widths, strict load."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"{path} is a timm checkpoint; install timm: pip install 'hf_ispasp[timm]'") from err
    with open(os.path.join(path, TIMM_RECORD), encoding="utf-8") as f:
        record = json.load(f)
    if record.get("format") != TIMM_FORMAT:
        raise ValueError(f"{path}: record format {record.get('format')!r} is not {TIMM_FORMAT!r}")
    model = timm.create_model(record["architecture"], pretrained=False, **record.get("model_kwargs", {}))
    adapter_for(model).apply_widths(record["widths"])
    state = load_file(os.path.join(path, WEIGHTS))
    dtype = torch_dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model.to(dtype)
    load_state_dict_checked(model, state, path)
    model.ispasp_metadata = {
        "version": record.get("version"), "widths": record["widths"], "pruner_config": record.get("pruner_config"),
    }
    model.eval()
    return model


register_format(is_timm_model, save_timm_pruned, _is_timm_folder, load_timm_pruned)


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
