"""Prune an image classifier with i-SpaSP: timm model name or transformers ViT folder + image data -> prune ->
optional short fine-tune -> evaluate -> save_pruned.

Fashion-MNIST (grey images repeated to 3 channels and resized) is the default data, so this runs offline::

    # EfficientNet-Lite0 with its ImageNet weights: adapt to Fashion-MNIST, prune to 70% of the FLOPs, fine-tune
    python examples/prune_image_classification.py --model tf_efficientnet_lite0 --imagenet_lite0 \\
        --dense_steps 150 --flops_fraction 0.7 --finetune_steps 100 --output_dir out/lite0-fmnist

    # any timm model (random init here) or a transformers ViT folder, with explicit keep ratios
    python examples/prune_image_classification.py --model resnet18 --dense_steps 200 --ffn_keep_ratio 0.5
    python examples/prune_image_classification.py --model path/to/vit --head_keep_ratio 0.75 --ffn_keep_ratio 0.5

Reload the result with ``hf_ispasp.load_pruned(output_dir)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the repository's demo/ package (offline data, train / evaluate loop)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from demo.assets import fashion_mnist, mnist5k  # noqa: E402
from demo.vision import ImageBatches, efficientnet_lite0_state_dict, train_classifier  # noqa: E402
from hf_ispasp import ISpaSPPruner, PrunerConfig, save_pruned  # noqa: E402
from hf_ispasp.budget import ffn_ratio_for_flops  # noqa: E402
from hf_ispasp.evaluation import load as load_metric  # noqa: E402
from hf_ispasp.metrics import count_flops  # noqa: E402
from hf_ispasp.timm_format import create_timm_model  # noqa: E402

logger = logging.getLogger("prune_image_classification")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name or transformers ViT folder")
    p.add_argument("--imagenet_lite0", action="store_true",
                   help="load the offline EfficientNet-Lite0 ImageNet weights (with --model tf_efficientnet_lite0)")
    p.add_argument("--dataset", choices=["fashion-mnist", "mnist5k"], default="fashion-mnist")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--max_train_images", type=int, default=10_000)
    p.add_argument("--max_eval_images", type=int, default=2_000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dense_steps", type=int, default=0, help="fine-tune the dense model first (new task head)")
    p.add_argument("--calibration_images", type=int, default=512)
    p.add_argument("--ffn_keep_ratio", type=float, default=0.5, help="inner channels / MLP neurons kept")
    p.add_argument("--head_keep_ratio", type=float, default=1.0, help="ViT heads kept")
    p.add_argument("--flops_fraction", type=float, default=None,
                   help="choose a uniform ffn_keep_ratio that keeps this fraction of the dense FLOPs")
    p.add_argument("--selection", default="ispasp", help="ispasp or a baseline (weight_magnitude, random, ...)")
    p.add_argument("--finetune_steps", type=int, default=0, help="fine-tune the pruned model for this many steps")
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--output_dir", default="pruned-image-classifier")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_data(args: argparse.Namespace):
    if args.dataset == "fashion-mnist":
        train_x, train_y = fashion_mnist("train")
        test_x, test_y = fashion_mnist("test")
    else:
        images, labels = mnist5k()
        train_x, train_y, test_x, test_y = images[:4000], labels[:4000], images[4000:], labels[4000:]
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_y), generator=gen)
    train_x, train_y = torch.from_numpy(train_x.copy())[order], torch.from_numpy(train_y.astype("int64"))[order]
    n = min(args.max_train_images, len(train_y) - args.calibration_images)
    kw = {"size": args.image_size, "batch_size": args.batch_size}
    train = ImageBatches(train_x[:n], train_y[:n], shuffle=True, seed=args.seed, **kw)
    calib = ImageBatches(train_x[n : n + args.calibration_images], train_y[n : n + args.calibration_images], **kw)
    m = min(args.max_eval_images, len(test_y))
    test = ImageBatches(torch.from_numpy(test_x[:m].copy()), torch.from_numpy(test_y[:m].astype("int64")), **kw)
    return train, calib, test, int(train_y.max()) + 1


def load_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    if Path(args.model).is_dir():
        from transformers import ViTForImageClassification

        model = ViTForImageClassification.from_pretrained(args.model, num_labels=num_classes,
                                                          ignore_mismatched_sizes=True)
        if model.config.image_size != args.image_size:
            logger.warning("using the ViT's image_size %d instead of %d", model.config.image_size, args.image_size)
            args.image_size = model.config.image_size
        return model
    kwargs = {"img_size": args.image_size} if "vit" in args.model or "deit" in args.model else {}
    model = create_timm_model(args.model, pretrained=False, input_size=args.image_size, **kwargs)
    if args.imagenet_lite0:
        if args.model != "tf_efficientnet_lite0":
            raise SystemExit("--imagenet_lite0 needs --model tf_efficientnet_lite0")
        model.load_state_dict(efficientnet_lite0_state_dict(), strict=False)
    model.reset_classifier(num_classes)
    return model


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, batches) -> float:
    """Top-1 accuracy through the `evaluate` accuracy module that ships with hf_ispasp (no Hub needed)."""
    accuracy = load_metric("accuracy", keep_in_memory=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for images, labels in batches:
        images = images.to(device)
        outputs = model(pixel_values=images) if hasattr(model, "config") else model(images)
        accuracy.add_batch(predictions=getattr(outputs, "logits", outputs).argmax(-1).cpu(), references=labels)
    model.train(was_training)
    return accuracy.compute()["accuracy"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    train, calib, test, num_classes = load_data(args)
    model = load_model(args, num_classes)
    if args.dense_steps:
        train_classifier(model, train, args.dense_steps, lr=1e-3)
    model.eval()
    example = torch.randn(1, 3, args.image_size, args.image_size)
    inputs = {"pixel_values": example} if hasattr(model, "config") else example
    dense_acc = evaluate_accuracy(model, test)
    ratio = args.ffn_keep_ratio
    if args.flops_fraction is not None:
        ratio = ffn_ratio_for_flops(model, args.flops_fraction, args.head_keep_ratio, inputs=inputs)
        logger.info("ffn_keep_ratio %.3f keeps about %.0f%% of the FLOPs", ratio, 100 * args.flops_fraction)
    config = PrunerConfig(ffn_keep_ratio=ratio, head_keep_ratio=args.head_keep_ratio, selection=args.selection,
                          seed=args.seed)
    start = time.perf_counter()
    pruner = ISpaSPPruner(model, config)
    pruned = pruner.prune(calib)
    seconds = time.perf_counter() - start
    one_shot = evaluate_accuracy(pruned, test)
    finetuned = None
    if args.finetune_steps:
        train_classifier(pruned, train, args.finetune_steps, lr=args.learning_rate)
        finetuned = evaluate_accuracy(pruned, test)
    save_pruned(pruned, args.output_dir)
    result = {
        "dense_top1": dense_acc, "pruned_top1": one_shot, "finetuned_top1": finetuned,
        "flops_dense": count_flops(model, inputs), "flops_pruned": count_flops(pruned, inputs),
        "prune_seconds": seconds, "ffn_keep_ratio": ratio, "output_dir": str(args.output_dir),
    }
    with open(os.path.join(args.output_dir, "prune_report.json"), "w", encoding="utf-8") as f:
        json.dump({**result, "report": pruner.report.to_dict()}, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
