#!/usr/bin/env python
"""Prune a timm image classifier with i-SpaSP and compare it with the dense model (accuracy, fidelity, size).

    python examples/image_classification.py --model resnet18 --train_steps 200 --ffn_keep_ratio 0.5
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/image_classification.py --cpu

Offline by default: Fashion-MNIST from ``demo.assets`` (grey images repeated to 3 channels, resized to
``--image_size``), a timm model with a fresh 10-class head trained for ``--train_steps``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the text-classification base: shared helpers

import datasets  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from text_classification import finish, score, train  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from hf_ispasp import ISpaSPPruner, PrunerConfig  # noqa: E402
from hf_ispasp.timm_format import create_timm_model  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="timm model name (random init, new head)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--max_train_images", type=int, default=5000)
    p.add_argument("--max_eval_images", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=64, help="batch size per process")
    p.add_argument("--train_steps", type=int, default=200, help="train the dense model first (0: skip)")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--calibration_samples", type=int, default=256, help="training images to calibrate on")
    p.add_argument("--ffn_keep_ratio", type=float, default=0.5, help="inner channels / MLP neurons kept")
    p.add_argument("--head_keep_ratio", type=float, default=1.0, help="attention heads kept (ViTs)")
    p.add_argument("--output_dir", default="out/image-classification")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (needed for several CPU processes)")
    p.add_argument("--seed", type=int, default=0)
    return p


def get_dataloaders(accelerator: Accelerator, args: argparse.Namespace) -> dict[str, DataLoader]:
    """Train, calibration and evaluation loaders of Fashion-MNIST; the one function the tests swap."""
    from demo.assets import fashion_mnist

    splits = {}
    for split, cap in (("train", args.max_train_images), ("test", args.max_eval_images)):
        images, labels = fashion_mnist(split)
        splits[split] = datasets.Dataset.from_dict({"image": images[:cap], "label": labels[:cap].astype("int64")})
    return make_dataloaders(args, datasets.DatasetDict(splits))


def make_dataloaders(args: argparse.Namespace, raw: datasets.DatasetDict) -> dict[str, DataLoader]:
    """Batches of ``{"pixel_values", "labels"}`` from ``raw`` (``image``: HxW uint8 arrays, ``label``: ints)."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = torch.stack([torch.as_tensor(r["image"], dtype=torch.float32) for r in rows])[:, None] / 255
        images = F.interpolate(images, size=args.image_size, mode="bilinear").expand(-1, 3, -1, -1)
        return {"pixel_values": (images - 0.5) / 0.5, "labels": torch.tensor([r["label"] for r in rows])}

    train = raw["train"].with_format("numpy").shuffle(seed=args.seed)
    calibration = train.select(range(min(args.calibration_samples, len(train))))
    return {"train": DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate),
            "calibration": DataLoader(calibration, batch_size=args.batch_size,
                                      collate_fn=lambda rows: collate(rows)["pixel_values"]),
            "eval": DataLoader(raw["test"].with_format("numpy"), batch_size=args.batch_size, collate_fn=collate)}


class Classifier(torch.nn.Module):
    """A timm model called as the helpers of the base call transformers models: ``model(**batch).loss``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.model(pixel_values)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return argparse.Namespace(logits=logits, loss=loss)


@torch.no_grad()
def predict(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the whole evaluation set, gathered from every process."""
    logits, labels = [], []
    for batch in accelerator.prepare_data_loader(loader):
        out, refs = accelerator.gather_for_metrics((model(batch["pixel_values"]), batch["labels"]))
        logits.append(out.float().cpu())
        labels.append(refs.cpu())
    return torch.cat(logits), torch.cat(labels)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    torch.manual_seed(args.seed)
    loaders = get_dataloaders(accelerator, args)
    num_classes = int(max(loaders["train"].dataset["label"])) + 1
    model = create_timm_model(args.model, pretrained=False, num_classes=num_classes, input_size=args.image_size)
    model = model.to(accelerator.device).eval()
    if args.train_steps:
        model = train(accelerator, Classifier(model), loaders["train"], args.train_steps, args.learning_rate).model
    dense_logits, labels = predict(accelerator, model, loaders["eval"])
    config = PrunerConfig(ffn_keep_ratio=args.ffn_keep_ratio, head_keep_ratio=args.head_keep_ratio,
                          seed=args.seed, show_progress=False)
    pruner = ISpaSPPruner(model, config)
    pruned = pruner.prune(loaders["calibration"])
    metrics = {"dense": score(dense_logits, labels),
               "pruned": score(predict(accelerator, pruned, loaders["eval"])[0], labels, dense_logits)}
    return finish(accelerator, args, pruned, None, pruner.report, metrics)


if __name__ == "__main__":
    main()
