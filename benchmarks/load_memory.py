"""Peak memory of loading a pruned checkpoint, against the size of the pruned model.

Each model is pruned to non-uniform widths (per layer, FFN keep 0.3 ... 0.7 and head/KV-group keep 1.0 ... 0.5,
the first groups of each block: which groups are kept does not change the memory of a load), saved with
``save_pruned`` and then loaded in a fresh process. The process reads its resident-set peak from
``/proc/self/status`` (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the load, after the imports),
touches every parameter (memory-mapped weights count once they are read) and reports
``peak extra memory / pruned model size`` for

- ``load_pruned``: hf_ispasp's loader;
- ``from_pretrained``: the stock transformers loader on the same folder (``trust_remote_code=True`` for the
  remote-code checkpoints that non-uniform widths give), as a reference measured the same way.

Models: the real MiniLM-L6 (sentence-transformers weights), a BERT-base-shaped classifier and a LLaMA-shaped
decoder with grouped-query attention (about 200M parameters, stored in bfloat16), both randomly initialised.

    python benchmarks/load_memory.py                  # ~2 min
    python benchmarks/load_memory.py --tiny --output-dir /tmp/x
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from hf_ispasp import PrunerConfig, adapter_for, save_pruned  # noqa: E402
from hf_ispasp.partitions import first_per_run  # noqa: E402
from hf_ispasp.record import METADATA_KEY  # noqa: E402
from hf_ispasp.version import __version__  # noqa: E402

NAME = "load_memory"
METHODS = ("load_pruned", "from_pretrained")

# Runs in the fresh process: argv = folder, method, auto class. Prints one JSON line.
_CHILD = r"""
import json, sys
import torch, transformers
import hf_ispasp
folder, method, auto = sys.argv[1:4]
config = json.load(open(folder + "/config.json"))
getattr(transformers, config["architectures"][0].removeprefix("Pruned"))  # import the modeling module first
loader = getattr(transformers, auto)

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
if method == "load_pruned":
    model = hf_ispasp.load_pruned(folder)
else:
    model = loader.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    # read every weight; a reduction makes no copy (t.float() would add one tensor in float32)
    touched = sum(float(t.amax()) - float(t.amin()) for t in model.state_dict().values() if t.numel())
tensors = {t.data_ptr(): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
print(json.dumps({"peak_extra": status("VmHWM") - before, "size": sum(tensors.values()),
                  "finite": touched == touched}))
"""


def _shapes(tiny: bool) -> list[dict[str, Any]]:
    from transformers import BertConfig, LlamaConfig

    if tiny:
        return [
            {"name": "tiny BERT", "config": BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=128, vocab_size=1000),
             "class": "BertForSequenceClassification", "auto": "AutoModelForSequenceClassification"},
            {"name": "tiny LLaMA-GQA", "dtype": torch.bfloat16,
             "config": LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=1000),
             "class": "LlamaForCausalLM", "auto": "AutoModelForCausalLM"},
        ]
    return [
        {"name": "MiniLM-L6 (real weights)", "class": "BertModel", "auto": "AutoModel"},
        {"name": "BERT-base shape", "config": BertConfig(num_labels=2),
         "class": "BertForSequenceClassification", "auto": "AutoModelForSequenceClassification"},
        {"name": "LLaMA-GQA shape, ~200M, bf16", "dtype": torch.bfloat16,
         "config": LlamaConfig(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
                               num_key_value_heads=4, intermediate_size=2816, vocab_size=32000),
         "class": "LlamaForCausalLM", "auto": "AutoModelForCausalLM"},
    ]


def _build(shape: dict[str, Any]) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, shape["class"])
    if "config" not in shape:
        from demo.assets import minilm_path

        return cls.from_pretrained(minilm_path())
    return cls(shape["config"]).to(shape.get("dtype", torch.float32))


def prune_non_uniform(model: torch.nn.Module) -> dict[str, Any]:
    """Cut layer ``i`` of ``L`` to FFN keep 0.3 + 0.4 i/(L-1) and head keep 1 - 0.5 i/(L-1); record the widths."""
    adapter = adapter_for(model)
    count = len(adapter.layers())
    for index in range(count):
        share = index / max(count - 1, 1)
        for block in adapter.blocks(index):
            ratio = 0.3 + 0.4 * share if block.kind == "ffn" else 1.0 - 0.5 * share
            keep = max(block.partitions, round(block.num_groups * ratio) // block.partitions * block.partitions)
            if keep < block.num_groups:
                adapter.compact(block, first_per_run(block.num_groups, keep // block.partitions, block.partitions))
    widths = adapter.widths()
    setattr(model.config, METADATA_KEY, {"version": __version__, "widths": widths,
                                         "pruner_config": PrunerConfig().to_dict()})
    return widths


def measure(folder: str, method: str, auto: str) -> dict[str, Any]:
    """Load ``folder`` in a fresh process; its peak extra resident memory and the loaded model's size."""
    done = subprocess.run([sys.executable, "-c", _CHILD, folder, method, auto], capture_output=True, text=True,
                          cwd=common.ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f"{method} of {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process loads per method (the median is kept)")
    args = parser.parse_args(argv)
    results = common.Results(args.output_dir, NAME, {"tiny": args.tiny, "repeats": args.repeats})
    for shape in _shapes(args.tiny):
        model = _build(shape)
        dense = sum(p.numel() * p.element_size() for p in model.parameters())
        widths = prune_non_uniform(model)
        with tempfile.TemporaryDirectory() as folder:
            save_pruned(model, folder)
            kind = "plain" if "auto_map" not in json.loads(Path(folder, "config.json").read_text()) else "remote code"
            for method in METHODS:
                runs = [measure(folder, method, shape["auto"]) for _ in range(args.repeats)]
                peaks = sorted(r["peak_extra"] for r in runs)
                size = runs[0]["size"]
                results.add({
                    "model": shape["name"], "method": method, "checkpoint": kind, "dense_mb": dense / 2**20,
                    "size_mb": size / 2**20, "peak_extra_mb": peaks[len(peaks) // 2] / 2**20,
                    "peak_extra_mb_min": peaks[0] / 2**20, "peak_extra_mb_max": peaks[-1] / 2**20,
                    "ratio": peaks[len(peaks) // 2] / size, "finite": all(r["finite"] for r in runs),
                    "ffn_widths": widths.get("ffn"), "head_widths": widths.get("heads"),
                })
                print(results.records[-1]["model"], method, f"{results.records[-1]['ratio']:.3f}", flush=True)
        del model
    report(results.data, args.output_dir)
    return 0


def report(data: dict[str, Any], output_dir: Path) -> str:
    rows = [{**r, "peak": f"{r['peak_extra_mb']:.1f} ({r['peak_extra_mb_min']:.1f}-{r['peak_extra_mb_max']:.1f})"}
            for r in data["records"]]
    table = common.markdown_table(rows, [
        ("model", "model"), ("checkpoint", "checkpoint"), ("loader", "method"), ("dense MB", "dense_mb"),
        ("pruned MB", "size_mb"), ("peak extra MB, median (min-max)", "peak"), ("peak / pruned size", "ratio"),
    ])
    text = (f"## Memory of loading a pruned checkpoint\n\n"
            f"Peak extra resident memory of one load in a fresh process ({data['meta']['repeats']} loads each), "
            f"against the pruned model's size. torch {data['meta']['torch']}, transformers "
            f"{data['meta']['transformers']}.\n\n{table}\n")
    common.write_fragment(output_dir, NAME, text)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
