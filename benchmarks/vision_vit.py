"""A small transformers ViT trained from scratch on Fashion-MNIST, pruned (heads and MLP neurons) with i-SpaSP and
with weight magnitude at the same budget: top-1 one-shot and after a short fine-tune.

It covers the ViT adapter with a model that has learned something; it is not a claim about large ViTs.
The trained model is cached under ``demo.assets.cache_dir()``.

    python benchmarks/vision_vit.py           # ~10 min on 2 busy cores
    python benchmarks/vision_vit.py --tiny    # seconds
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from demo.assets import cache_dir, fashion_mnist  # noqa: E402
from demo.vision import ImageBatches, evaluate_accuracy, train_classifier  # noqa: E402
from hf_ispasp import ISpaSPPruner, PrunerConfig, load_pruned, save_pruned  # noqa: E402
from hf_ispasp.metrics import count_flops, count_parameters  # noqa: E402

NAME = "vision_vit"


def parse_args():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--test-images", type=int, default=5_000)
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--ffn-keep-ratio", type=float, default=0.5)
    parser.add_argument("--head-keep-ratio", type=float, default=0.5)
    parser.add_argument("--finetune-steps", type=int, default=60)
    return parser.parse_args()


def vit(tiny: bool):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=28, patch_size=4, num_channels=1, hidden_size=32 if tiny else 96,
        num_hidden_layers=2 if tiny else 4,
        num_attention_heads=4 if tiny else 6, intermediate_size=37 if tiny else 192, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.train_images, args.test_images, args.calibration_images, args.finetune_steps = 128, 64, 32, 2
        args.epochs = 1
    images, labels = fashion_mnist("train")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = torch.from_numpy(images.copy())[order], torch.from_numpy(labels.astype("int64"))[order]
    n, c = args.train_images, args.calibration_images
    kw = {"size": 28, "channels": 1}
    train = ImageBatches(images[:n], labels[:n], batch_size=64, shuffle=True, **kw)
    calib = ImageBatches(images[n : n + c], labels[n : n + c], batch_size=64, **kw)
    test_x, test_y = fashion_mnist("test")
    test = ImageBatches(torch.from_numpy(test_x[: args.test_images].copy()),
                        torch.from_numpy(test_y[: args.test_images].astype("int64")), batch_size=500, **kw)

    folder = cache_dir() / f"vit_fmnist_scratch_{n}_{args.epochs}ep"
    if args.tiny:
        dense = vit(True)
    elif (folder / "config.json").exists():
        from transformers import ViTForImageClassification

        dense = ViTForImageClassification.from_pretrained(folder)
    else:
        dense = vit(False)
        start = time.perf_counter()
        train_classifier(dense, train, args.epochs * len(train), lr=2e-3, weight_decay=0.05, log_every=100)
        print(f"trained from scratch in {time.perf_counter() - start:.0f}s")
        dense.save_pretrained(folder)
    dense.eval()
    results = common.Results(args.output_dir, NAME, meta={"tiny": args.tiny, **{
        k: getattr(args, k) for k in ("train_images", "epochs", "test_images", "calibration_images",
                                      "ffn_keep_ratio", "head_keep_ratio", "finetune_steps")}})
    example = {"pixel_values": torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))}
    dense_flops = count_flops(dense, example)
    rows = [{"method": "dense", "top1": evaluate_accuracy(dense, test), "flops": dense_flops,
             "params": count_parameters(dense)}]
    rows[0]["top1_finetuned"] = rows[0]["top1"]
    results.add(rows[0])
    print(f"dense top-1 {rows[0]['top1']:.4f}")
    budget = {"ffn_keep_ratio": args.ffn_keep_ratio, "head_keep_ratio": args.head_keep_ratio,
              "show_progress": False, "activation_cache": "memory"}
    methods = {
        "i-SpaSP (l2 proxy, output threshold, re-fit)": PrunerConfig(threshold="output", **budget),
        "weight magnitude": PrunerConfig(selection="weight_magnitude", refit=False, **budget),
    }
    for method, config in methods.items():
        start = time.perf_counter()
        pruned = ISpaSPPruner(dense, config).prune(calib)
        row = {"method": method, "top1": evaluate_accuracy(pruned, test), "flops": count_flops(pruned, example),
               "params": count_parameters(pruned), "prune_seconds": time.perf_counter() - start,
               "config": config.to_dict()}
        tuned = copy.deepcopy(pruned)
        torch.manual_seed(0)
        train_classifier(tuned, train, args.finetune_steps, lr=5e-4, warmup=10, log_every=0)
        row["top1_finetuned"] = evaluate_accuracy(tuned, test)
        print(f"{method}: one-shot {row['top1']:.4f}, fine-tuned {row['top1_finetuned']:.4f}")
        results.add(row)
        rows.append(row)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(pruned, tmp)
        reloaded = load_pruned(tmp)
    with torch.no_grad():
        same = torch.allclose(reloaded(**example).logits, pruned(**example).logits, atol=1e-5)
    results.set("reload_equal", same)
    table = common.markdown_table(
        [{"method": r["method"], "top-1 one-shot": "-" if r["method"] == "dense" else common.pct(r["top1"]),
          "top-1 fine-tuned": common.pct(r["top1_finetuned"]),
          "FLOPs": f"{r['flops'] / 1e6:.2f}M ({100 * r['flops'] / dense_flops:.0f}%)",
          "params": f"{r['params'] / 1e3:.0f}k"} for r in rows],
        [(c, c) for c in ("method", "top-1 one-shot", "top-1 fine-tuned", "FLOPs", "params")],
    )
    text = (
        "## A small ViT trained from scratch on Fashion-MNIST (heads and MLP neurons)\n\n"
        f"transformers `ViTForImageClassification` (4 layers, hidden 96, 6 heads, MLP 192, patch 4, 28 px grey) "
        f"trained {args.epochs} epochs on {n} images; pruned with head keep ratio {args.head_keep_ratio} and "
        f"MLP keep ratio {args.ffn_keep_ratio} from {c} unlabelled calibration images; fine-tuned "
        f"{args.finetune_steps} steps of 64 images after pruning; top-1 on {args.test_images} test images. "
        f"Weight magnitude without re-fit is the baseline. Reloaded with `load_pruned`: equal = {same}.\n\n"
        f"{table}\n\nCommand: `python benchmarks/vision_vit.py`\n"
    )
    if not args.tiny:
        common.write_fragment(args.output_dir, NAME, text)
    print(text)


if __name__ == "__main__":
    main()
