"""EfficientNet-Lite0 (real ImageNet weights) on Fashion-MNIST: i-SpaSP vs uniform weight-magnitude pruning at
the same FLOPs, one-shot and after a short fine-tune, in the style of the paper's ImageNet table.

The dense model is timm ``tf_efficientnet_lite0`` with the ImageNet weights mapped by position
(``demo.vision.efficientnet_lite0``), fine-tuned for one epoch on a 10k-image Fashion-MNIST subset
(grey -> 3 channels, 64 px) and cached under ``demo.assets.cache_dir()``. Pruning touches the expansion
channels of every inverted-residual block (``ffn_keep_ratio``, uniform); the ratio is chosen by bisection
(``hf_ispasp.budget.ffn_ratio_for_flops``) to hit the requested fraction of dense FLOPs at 64 px.

    python benchmarks/vision_efficientnet.py                 # ~30 min on 2 busy cores (+20 min once: dense)
    python benchmarks/vision_efficientnet.py --dense-only    # only fine-tune and cache the dense model
    python benchmarks/vision_efficientnet.py --tiny          # seconds: random weights, a few images
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from demo.assets import cache_dir, fashion_mnist  # noqa: E402
from demo.vision import ImageBatches, efficientnet_lite0, evaluate_accuracy, train_classifier  # noqa: E402
from hf_ispasp import ISpaSPPruner, PrunerConfig, load_pruned, save_pruned  # noqa: E402
from hf_ispasp.budget import ffn_ratio_for_flops  # noqa: E402
from hf_ispasp.metrics import count_flops, count_parameters, latency_ratio  # noqa: E402

NAME = "vision_efficientnet"


def parse_args():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--test-images", type=int, default=5_000)
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--flops-fraction", type=float, default=0.7)
    parser.add_argument("--finetune-steps", type=int, default=60, help="steps (batch 64) after pruning")
    parser.add_argument("--dense-only", action="store_true")
    parser.add_argument("--latency-only", action="store_true",
                        help="keep the accuracy rows of the JSON; re-measure latency and rewrite the fragment")
    return parser.parse_args()


def data(args):
    images, labels = fashion_mnist("train")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))
    train_idx = order[: args.train_images]
    calib_idx = order[args.train_images : args.train_images + args.calibration_images]
    test_x, test_y = fashion_mnist("test")
    test_order = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(1))[: args.test_images]
    test_x, test_y = torch.from_numpy(test_x.copy())[test_order], torch.from_numpy(test_y.astype("int64"))[test_order]
    kw = {"size": args.size}
    train = ImageBatches(images[train_idx], labels[train_idx], batch_size=64, shuffle=True, seed=0, **kw)
    calib = ImageBatches(images[calib_idx], labels[calib_idx], batch_size=64, **kw)
    test = ImageBatches(test_x, test_y, batch_size=250, **kw)
    return train, calib, test


def dense_model(args, train):
    if args.tiny:
        torch.manual_seed(0)
        return efficientnet_lite0(10, pretrained=False).eval()
    folder = cache_dir() / f"tf_efficientnet_lite0_fmnist_{args.size}px_{args.train_images}"
    weights = folder / "model.safetensors"
    model = efficientnet_lite0(10, pretrained=not weights.exists())
    if weights.exists():
        model.load_state_dict(load_file(str(weights)))
        return model.eval()
    torch.manual_seed(0)
    start = time.perf_counter()
    train_classifier(model, train, steps=len(train), lr=1e-3, log_every=25)
    print(f"fine-tuned the dense model in {time.perf_counter() - start:.0f}s")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    return model.eval()


def channels_last(model):
    """Depthwise convolutions are ~10x faster channels-last on this CPU build; slicing returns NCHW weights."""
    return model.to(memory_format=torch.channels_last)


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.train_images, args.test_images, args.calibration_images = 64, 64, 32
        args.finetune_steps, args.size = 2, 32
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    train, calib, test = data(args)
    dense = channels_last(dense_model(args, train))
    if args.dense_only:
        print(f"dense top-1 {evaluate_accuracy(dense, test):.4f}")
        return
    meta = {"tiny": args.tiny, **{k: getattr(args, k) for k in (
        "size", "train_images", "test_images", "calibration_images", "flops_fraction", "finetune_steps")}}
    if args.latency_only:
        results = common.Results(args.output_dir, NAME, meta=meta, resume=True)
        if len(results.records) < 2:
            raise SystemExit(f"no recorded rows in {results.path}; run the full benchmark first")
        write_report(args, results, results.records[1]["config"]["ffn_keep_ratio"], dense)
        return
    results = common.Results(args.output_dir, NAME, meta=meta)
    example = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    dense_flops = count_flops(dense, example)
    rows = []

    def record(method: str, model, seconds: float | None, config: PrunerConfig | None, top1_ft: float | None):
        row = {
            "method": method,
            "top1": evaluate_accuracy(model, test),
            "top1_finetuned": top1_ft,
            "flops": count_flops(model, example),
            "params": count_parameters(model),
            "prune_seconds": seconds,
            "config": None if config is None else config.to_dict(),
        }
        row["flops_fraction"] = row["flops"] / dense_flops
        return row

    dense_row = record("dense", dense, None, None, None)
    dense_row["top1_finetuned"] = dense_row["top1"]
    results.add(dense_row)
    rows.append(dense_row)
    print(f"dense: top-1 {dense_row['top1']:.4f}, {dense_flops / 1e6:.1f} MFLOPs at {args.size}px")

    ratio = ffn_ratio_for_flops(dense, args.flops_fraction, inputs=example)
    print(f"ffn_keep_ratio {ratio:.3f} gives ~{args.flops_fraction:.0%} of dense FLOPs")
    methods = {
        "i-SpaSP (l2 proxy, output threshold, re-fit)": PrunerConfig(ffn_keep_ratio=ratio, threshold="output"),
        "i-SpaSP (paper rules, no re-fit)": PrunerConfig(ffn_keep_ratio=ratio, proxy="sum", threshold="sum",
                                                         refit=False),
        "uniform weight magnitude": PrunerConfig(ffn_keep_ratio=ratio, selection="weight_magnitude", refit=False),
    }
    pruned_models = {}
    for method, config in methods.items():
        config.show_progress = False
        config.activation_cache = "memory"
        start = time.perf_counter()
        pruned = channels_last(ISpaSPPruner(dense, config).prune(calib))
        seconds = time.perf_counter() - start
        row = record(method, pruned, seconds, config, None)
        print(f"{method}: one-shot top-1 {row['top1']:.4f}, FLOPs {row['flops_fraction']:.3f}, {seconds:.1f}s")
        torch.manual_seed(0)
        tuned = copy.deepcopy(pruned)
        train_classifier(tuned, train, steps=args.finetune_steps, lr=5e-4, warmup=10, log_every=50)
        row["top1_finetuned"] = evaluate_accuracy(tuned, test)
        print(f"{method}: fine-tuned top-1 {row['top1_finetuned']:.4f}")
        results.add(row)
        rows.append(row)
        pruned_models[method] = tuned

    # Checkpoint round trip of the fine-tuned i-SpaSP model.
    method = next(iter(methods))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(pruned_models[method], tmp)
        reloaded = channels_last(load_pruned(tmp))
    batch = torch.randn(8, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        same = torch.allclose(reloaded(batch), pruned_models[method].eval()(batch), atol=1e-5)
    results.set("reload_equal", same)
    write_report(args, results, ratio, dense)


def measure(args, dense, ratio, calib):
    """CPU latency, dense vs i-SpaSP (same shapes as the fine-tuned model), in both memory formats."""
    config = PrunerConfig(ffn_keep_ratio=ratio, show_progress=False, activation_cache="memory")
    pruned = ISpaSPPruner(dense.to(memory_format=torch.contiguous_format), config).prune(calib)
    batch = torch.randn(32, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
    latency = {"batch": 32, "size": args.size, "threads": torch.get_num_threads()}
    for fmt, memory_format in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        d = copy.deepcopy(dense).to(memory_format=memory_format)
        p = copy.deepcopy(pruned).to(memory_format=memory_format)
        x = batch.contiguous(memory_format=memory_format)
        lat = latency_ratio(d, p, x, repeats=3 if args.tiny else 10)
        latency[fmt] = {"dense_s": lat.baseline_s, "pruned_s": lat.candidate_s, "speedup": lat.speedup,
                        "speedup_q25": lat.speedup_q25, "speedup_q75": lat.speedup_q75, "pairs": lat.pairs}
        print(f"latency {fmt}: dense {lat.baseline_s * 1e3:.1f} ms, pruned {lat.candidate_s * 1e3:.1f} ms "
              f"(x{lat.speedup:.2f}, IQR {lat.speedup_q25:.2f}-{lat.speedup_q75:.2f})")
    return latency


def write_report(args, results, ratio, dense) -> None:
    _, calib, _ = data(args)
    same = results.data.get("reload_equal", (results.data.get("latency") or {}).get("reload_equal"))
    latency = measure(args, dense, ratio, calib)
    results.set("latency", latency)
    results.set("reload_equal", same)
    rows = results.records
    table_rows = [
        {
            "method": r["method"],
            "top-1 one-shot": "-" if r["method"] == "dense" else common.pct(r["top1"]),
            "top-1 fine-tuned": common.pct(r["top1_finetuned"]),
            "FLOPs": f"{r['flops'] / 1e6:.1f}M ({100 * r['flops_fraction']:.0f}%)",
            "params": f"{r['params'] / 1e6:.2f}M",
        }
        for r in rows
    ]
    nchw, cl = latency["nchw"], latency["channels_last"]
    table = common.markdown_table(table_rows, [(c, c) for c in ("method", "top-1 one-shot", "top-1 fine-tuned",
                                                                  "FLOPs", "params")])
    text = (
        "## EfficientNet-Lite0 on Fashion-MNIST (inverted-residual expansion channels)\n\n"
        f"ImageNet-pretrained timm `tf_efficientnet_lite0`, fine-tuned 1 epoch on {args.train_images} Fashion-MNIST "
        f"images at {args.size} px (dense top-1 {common.pct(rows[0]['top1'])}); pruned to about "
        f"{args.flops_fraction:.0%} of dense FLOPs (uniform "
        f"`ffn_keep_ratio={ratio:.3f}` on every inverted residual) with {args.calibration_images} unlabelled "
        f"calibration images; fine-tuned {args.finetune_steps} steps of 64 images after pruning; top-1 on "
        f"{args.test_images} test images (one standard error is about "
        f"{100 * (0.9 * 0.1 / max(args.test_images, 1)) ** 0.5:.1f} points). FLOPs at {args.size} px "
        "(torch FlopCounterMode; the paper's table counts at 224 px). Training and evaluation ran channels-last.\n\n"
        f"{table}\n\n"
        f"CPU latency, batch 32 at {args.size} px, {torch.get_num_threads()} threads, same run, interleaved "
        f"(dense vs i-SpaSP at the same shapes): NCHW dense {1e3 * nchw['dense_s']:.0f} ms, pruned "
        f"{1e3 * nchw['pruned_s']:.0f} ms (x{nchw['speedup']:.2f}); channels-last dense {1e3 * cl['dense_s']:.0f} ms, "
        f"pruned {1e3 * cl['pruned_s']:.0f} ms (x{cl['speedup']:.2f}). The machine was shared with other jobs; "
        "only the ratio within a memory format means anything. "
        f"Saved with `save_pruned` and reloaded with `load_pruned`: outputs equal = {same}.\n\n"
        "Command: `python benchmarks/vision_efficientnet.py` (latency re-measured with `--latency-only`)\n"
    )
    if not args.tiny:
        common.write_fragment(args.output_dir, NAME, text)
    print(text)


if __name__ == "__main__":
    main()
