"""Shared benchmark plumbing: the fine-tuned MiniLM task, a fixed calibration set, evaluation against the
dense model, incremental JSON results and markdown tables.

Every benchmark script imports this module (``benchmarks/`` is put on ``sys.path`` by the script itself),
writes ``<output-dir>/<name>.json`` after every measured point (a cut-off run keeps its partial results)
and a markdown fragment ``<output-dir>/<name>.md`` that ``make_report.py`` assembles into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from demo import recipes  # noqa: E402
from hf_ispasp import classification  # noqa: E402
from hf_ispasp.metrics import count_flops  # noqa: E402

CALIBRATION_SIZE = 512
CALIBRATION_SEED = 0
BUDGETS = [(f, h) for f in (0.75, 0.5, 0.25) for h in (1.0, 0.75, 0.5)]


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where JSON / markdown / PNG go")
    parser.add_argument("--tiny", action="store_true", help="tiny random model and a few samples (for tests)")
    return parser


def environment() -> dict[str, Any]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


class Results:
    """A JSON results file rewritten after every record, so partial runs keep what they measured."""

    def __init__(self, output_dir: Path, name: str, meta: dict[str, Any] | None = None, resume: bool = False):
        self.path = Path(output_dir) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"name": name, "meta": {**environment(), **(meta or {})}, "records": []}
        if resume and self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("meta", {}).get("tiny") == self.data["meta"].get("tiny"):
                self.data = {**old, "meta": self.data["meta"]}
        self.flush()

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.data["records"]

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.flush()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False, default=_jsonable))
        tmp.replace(self.path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table; ``columns`` are (header, key) pairs; floats are formatted by magnitude."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key, "")
            if isinstance(value, float):
                value = f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3f}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_fragment(output_dir: Path, name: str, text: str) -> Path:
    path = Path(output_dir) / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    return path


def publish(output_dir: Path, name: str, text: str) -> int:
    """Write a benchmark's markdown fragment and print it; the exit status of its ``main``."""
    write_fragment(output_dir, name, text)
    print(text)
    return 0


def rebuild(output_dir: Path, name: str, report: Any) -> int:
    """``--report-only``: the fragment again from the JSON of an earlier run (``report(data) -> markdown``)."""
    return publish(output_dir, name, report(json.loads((Path(output_dir) / f"{name}.json").read_text())))


def size_sweep(argv: list[str] | None, description: str, name: str, sizes: list[int], tiny_sizes: list[int],
               run: Any, report: Any) -> int:
    """The ``main`` of a benchmark that sweeps calibration-set sizes on the polarity task: ``--sizes``,
    ``--fresh``, ``--report-only``; ``run(task, results, sizes)`` adds the records (a rerun resumes them),
    ``report(data)`` writes the markdown."""
    parser = base_parser(description)
    parser.add_argument("--sizes", nargs="*", type=int, default=None, help="calibration sequences to sweep")
    parser.add_argument("--fresh", action="store_true", help="ignore records of an earlier run")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args(argv)
    if args.report_only:
        return rebuild(args.output_dir, name, report)
    chosen = args.sizes or (tiny_sizes if args.tiny else sizes)
    task = load_task(tiny=args.tiny, calibration_size=max(chosen), work_dir=args.output_dir)
    results = Results(args.output_dir, name, {"tiny": args.tiny, "dense": task.dense_metrics, "sizes": chosen},
                      resume=not args.fresh)
    run(task, results, chosen)
    return publish(args.output_dir, name, report(results.data))


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


# ------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """The model under test, its tokenizer, tokenized splits, the calibration set and the dense reference."""

    model: Any
    tokenizer: Any
    train: Any
    test: Any
    calibration: Any  # tokenized examples with labels (taylor needs them; the other rules ignore them)
    dense_logits: torch.Tensor
    dense_metrics: dict[str, float]
    dense_flops: int
    tiny: bool

    def calibration_loader(self, num_samples: int | None = None, batch_size: int = 32,
                           labels: bool = True) -> DataLoader:
        """Batches over the fixed calibration sentences (the first ``num_samples`` of them)."""
        data = self.calibration
        if num_samples is not None:
            data = data.select(range(min(num_samples, len(data))))
        if not labels:
            data = data.remove_columns([c for c in data.column_names if c in ("label", "labels")])
        from transformers import DataCollatorWithPadding

        return DataLoader(data, batch_size=batch_size, collate_fn=DataCollatorWithPadding(self.tokenizer))

    def evaluate(self, model: Any) -> dict[str, float]:
        logits = classification.predict_logits(model, self.test, self.tokenizer)
        result = classification.classification_metrics(logits, self.test["label"], self.dense_logits)
        result["flops"] = flops(model, self.tiny)
        result["flops_ratio"] = result["flops"] / self.dense_flops
        return result


def example_inputs(tiny: bool, batch: int = 1, seq: int = 128) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000 if not tiny else 1000 + 50, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def flops(model: Any, tiny: bool = False) -> int:
    """FLOPs of one sequence of 128 tokens."""
    return count_flops(model, example_inputs(tiny))


def tiny_model_folder(path: Path) -> str:
    """A randomly initialised 2-layer BERT classifier with odd widths, saved with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from demo.assets import minilm_path

    if (path / "config.json").exists():
        return str(path)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=128, num_labels=2,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load_task(tiny: bool = False, calibration_size: int = CALIBRATION_SIZE, test_size: int | None = None,
              work_dir: Path | None = None) -> Task:
    """Fine-tuned MiniLM-L6 on sentence polarity (or a tiny random BERT), tokenized splits, calibration set.

    The calibration set is the same ``calibration_size`` training sentences for every rule (shuffle seed 0).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from demo.assets import polarity_dataset

    torch.manual_seed(0)
    if tiny:
        folder = tiny_model_folder(Path(work_dir or RESULTS_DIR) / "tiny-bert")
        calibration_size = min(calibration_size, 32)
        test_size = test_size or 48
    else:
        folder = recipes.finetuned_minilm_polarity()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.eval()
    data = polarity_dataset()
    train = classification.tokenize_dataset(data["train"], tokenizer)
    test = classification.tokenize_dataset(data["test"], tokenizer)
    if test_size is not None:
        test = test.select(range(min(test_size, len(test))))
    if tiny:
        train = train.select(range(64))
    calibration = train.shuffle(seed=CALIBRATION_SEED).select(range(min(calibration_size, len(train))))
    dense_logits = classification.predict_logits(model, test, tokenizer)
    dense_metrics = classification.classification_metrics(dense_logits, test["label"], dense_logits)
    dense_flops = flops(model, tiny)
    dense_metrics["flops"] = dense_flops
    dense_metrics["flops_ratio"] = 1.0
    return Task(model, tokenizer, train, test, calibration, dense_logits, dense_metrics, dense_flops, tiny)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
