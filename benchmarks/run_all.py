"""Run every benchmark one after the other (never two heavy jobs at once), then assemble BENCHMARKS.md.

    python benchmarks/run_all.py [--only synthetic selection_rules ...] [--tiny --output-dir DIR]

Each benchmark runs in its own process and writes its JSON incrementally, so an interrupted run keeps
what it measured; ``selection_rules`` resumes where it stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OWN = ["synthetic", "selection_rules", "calibration_size", "selection_precision", "peer_torch_pruning",
       "pruning_speed", "engine_shapes", "inference_speed", "onnx_latency", "load_memory", "train_decoders",
       "decoder_perplexity", "peer_torch_pruning_llm"]
OTHERS = ["finetune_recovery", "vision_efficientnet"]  # written by other engineers: plain invocation
SCRIPTS = OWN + OTHERS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=SCRIPTS)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"skip {name}: {script} does not exist")
            continue
        if name in OWN:
            cmd = [sys.executable, str(script), "--output-dir", str(args.output_dir)]
            cmd += ["--tiny"] if args.tiny else []
        elif args.tiny:
            continue
        else:
            cmd = [sys.executable, str(script)]
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    default = args.output_dir.resolve() == (HERE / "results").resolve()
    report = HERE.parent / "BENCHMARKS.md" if default else args.output_dir / "BENCHMARKS.md"
    subprocess.run([sys.executable, str(HERE / "make_report.py"), "--results-dir", str(args.output_dir),
                    "--output", str(report)], check=True)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
