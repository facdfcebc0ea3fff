"""Section 6b: ONNX export of dense and compacted models, onnxruntime CPU latency dense vs compacted.

The fine-tuned MiniLM-L6 sentence classifier and the LLaMA decoder trained here (``train_decoders.py``; skipped
when it is not in the cache, it takes 15 minutes to train) are compacted to the widths of the repository's main
budget, FFN 0.5 / heads 0.75 (for the decoder: 0.75 of the KV groups), as in ``inference_speed.py``: latency
depends only on the widths. Both models are exported with ``hf_ispasp.export_onnx`` (dynamic batch and sequence
axes, traced at 2 x 16 tokens) and run at other shapes in onnxruntime CPU sessions, timed interleaved call by
call (``hf_ispasp.metrics.latency_ratio``: median per-pair speedup with its inter-quartile range). Every measured
batch is also checked against PyTorch (``hf_ispasp.export.check_onnx``, largest absolute difference).

    python benchmarks/onnx_latency.py [--threads 1] [--repeats 12] [--no-decoder] [--tiny] [--output-dir DIR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from inference_speed import compacted  # noqa: E402

from hf_ispasp.export import OnnxRunner, check_onnx, export_onnx  # noqa: E402
from hf_ispasp.metrics import count_flops, count_parameters, latency_ratio  # noqa: E402

NAME = "onnx_latency"
MAIN = (0.5, 0.75)
SEQ = 128
BATCHES = {"MiniLM-L6 classifier": (1, 32), "LLaMA-GQA decoder": (1, 8)}


def _tokens(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _models(tiny: bool, decoder: bool, work: Path) -> dict[str, Any]:
    """Name -> dense model: MiniLM (or the tiny BERT) and, when cached, the trained LLaMA (or a tiny random one)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from demo import lm, recipes

    models: dict[str, Any] = {}
    folder = common.tiny_model_folder(work / "tiny-bert") if tiny else recipes.finetuned_minilm_polarity()
    models["MiniLM-L6 classifier"] = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    if not decoder:
        return models
    if tiny:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=37, vocab_size=128, max_position_embeddings=64, use_cache=False)
        models["LLaMA-GQA decoder"] = AutoModelForCausalLM.from_config(config).eval()
    elif (lm.recipe_for("llama").folder() / "config.json").exists():
        models["LLaMA-GQA decoder"] = AutoModelForCausalLM.from_pretrained(lm.trained_decoder("llama")).eval()
    else:
        print("LLaMA decoder not trained yet (python benchmarks/train_decoders.py): measuring MiniLM only")
    return models


def _export(model: Any, path: Path, vocab: int) -> tuple[Path, float]:
    start = time.perf_counter()
    export_onnx(model, path, _tokens(vocab, 2, 16))
    return path, time.perf_counter() - start


def measure(name: str, dense: Any, seq: int, repeats: int, threads: int, work: Path,
            results: common.Results) -> None:
    pruned = compacted(dense, *MAIN)
    vocab = dense.config.vocab_size
    dense_path, dense_export_s = _export(dense, work / f"{name}-dense.onnx".replace(" ", "_"), vocab)
    pruned_path, pruned_export_s = _export(pruned, work / f"{name}-pruned.onnx".replace(" ", "_"), vocab)
    runners = OnnxRunner(dense_path, threads), OnnxRunner(pruned_path, threads)
    flops_probe = _tokens(vocab, 1, seq)
    flops_speedup = count_flops(dense, flops_probe) / count_flops(pruned, flops_probe)
    for batch in BATCHES[name]:
        inputs = _tokens(vocab, batch, seq)
        checks = check_onnx(runners[0], dense, inputs), check_onnx(runners[1], pruned, inputs)
        reps = repeats if batch == 1 else max(2, repeats // 4)
        lat = latency_ratio(runners[0], runners[1], inputs, repeats=reps, rounds=3)
        record = {
            "model": name, "ffn_keep": MAIN[0], "head_keep": MAIN[1], "batch": batch, "seq": seq,
            "dense_ms": 1000 * lat.baseline_s, "pruned_ms": 1000 * lat.candidate_s,
            **{key: getattr(lat, key) for key in ("speedup", "speedup_q25", "speedup_q75", "speedup_min",
                                                    "speedup_max", "pairs")},
            "flops_speedup": flops_speedup,
            "dense_params": count_parameters(dense), "pruned_params": count_parameters(pruned),
            "dense_mb": dense_path.stat().st_size / 2**20, "pruned_mb": pruned_path.stat().st_size / 2**20,
            "dense_export_s": dense_export_s, "pruned_export_s": pruned_export_s,
            "dense_max_abs_diff": checks[0].max_abs_diff, "pruned_max_abs_diff": checks[1].max_abs_diff,
            "checks_ok": checks[0].ok and checks[1].ok, "atol": checks[0].atol, "rtol": checks[0].rtol,
        }
        results.add(record)
        print(f"{name} batch {batch}: onnxruntime x{lat.speedup:.2f} ({lat.speedup_q25:.2f}-{lat.speedup_q75:.2f}), "
              f"max diff {record['dense_max_abs_diff']:.1e}/{record['pruned_max_abs_diff']:.1e}", flush=True)


def report(results: common.Results) -> str:
    rows = [{
        "model": r["model"], "batch": f"{r['batch']} x {r['seq']}",
        "params": f"{r['dense_params'] / 1e6:.1f}M → {r['pruned_params'] / 1e6:.1f}M",
        "size": f"{r['dense_mb']:.1f} → {r['pruned_mb']:.1f}",
        "ms": f"{r['dense_ms']:.1f} → {r['pruned_ms']:.1f}",
        "speedup": f"{r['speedup']:.2f} ({r['speedup_q25']:.2f}-{r['speedup_q75']:.2f})",
        "flops": f"{r['flops_speedup']:.2f}",
        "diff": f"{r['dense_max_abs_diff']:.1e} / {r['pruned_max_abs_diff']:.1e}",
        "ok": "yes" if r["checks_ok"] else "NO",
    } for r in results.records]
    meta = results.data["meta"]
    tol = results.records[0] if results.records else {"atol": 0, "rtol": 0}
    lines = [
        "## ONNX export and onnxruntime latency (CPU)",
        "",
        f"Dense and compacted (FFN {MAIN[0]} / heads {MAIN[1]}; the decoder keeps {MAIN[1]} of its KV groups) models "
        "exported with `hf_ispasp.export_onnx` (torch.onnx dynamo exporter, dynamic batch and sequence axes, traced "
        f"at 2 x 16 tokens, decoder without KV cache), run in onnxruntime {meta.get('onnxruntime')} CPU sessions "
        f"with {meta.get('threads')} intra-op thread(s), dense and compacted timed interleaved call by call "
        "(which goes first alternates); speedup = median of the per-pair ratios (inter-quartile range in brackets). "
        "The machine is shared with other jobs, so only the ratios mean something. 'max |ORT - torch|': largest "
        "absolute difference of the onnxruntime outputs from PyTorch's on the timed batch (dense / compacted); "
        f"'matches' = within atol {tol['atol']:g} + rtol {tol['rtol']:g} everywhere. File sizes in MiB.",
        "",
        common.markdown_table(rows, [
            ("model", "model"), ("batch x tokens", "batch"), ("parameters", "params"), ("ONNX file MiB", "size"),
            ("onnxruntime ms", "ms"), ("onnxruntime speedup", "speedup"), ("FLOPs speedup", "flops"),
            ("max abs ORT - torch", "diff"), ("matches", "ok")]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=12, help="timed pairs per round at batch 1 (a quarter at "
                        "the larger batch), three rounds")
    parser.add_argument("--no-decoder", action="store_true", help="MiniLM only")
    args = parser.parse_args(argv)
    import onnxruntime

    torch.set_num_threads(args.threads)
    seq = 16 if args.tiny else SEQ
    repeats = 2 if args.tiny else args.repeats
    results = common.Results(args.output_dir, NAME, {"tiny": args.tiny, "seq": seq,
                                                      "onnxruntime": onnxruntime.__version__})
    with tempfile.TemporaryDirectory(prefix="onnx-latency-") as tmp:
        work = Path(tmp)
        for name, dense in _models(args.tiny, not args.no_decoder, work).items():
            measure(name, dense, seq, repeats, args.threads, work, results)
    text = report(results)
    common.write_fragment(args.output_dir, NAME, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
