"""Model cards of pruned checkpoints (:mod:`hf_ispasp.portable.hub` uploads them with the checkpoint).

The card is a :class:`huggingface_hub.ModelCard` (metadata in :class:`~huggingface_hub.ModelCardData`: base
model, tags, library, pipeline tag, evaluation results) whose body says how to load the checkpoint (as
:func:`~hf_ispasp.portable.finish_checkpoint` wrote it), shows the kept width of every layer (a self-contained SVG
written next to the card, :data:`WIDTHS_PICTURE`, plus a table), compares parameters, FLOPs and (when measured)
latency with the dense model, lists the user's metrics and the :class:`~hf_ispasp.PrunerConfig`, and cites i-SpaSP.

Everything the card shows comes from the width record in ``config.json`` (``config.ispasp``: widths, the pruner's
summary, and what :func:`set_card_info` stored), so a checkpoint loaded back and pushed again keeps its card.

A card we wrote carries :data:`CARD_MARKER`; a ``README.md`` without it is the user's and is never replaced,
neither in a folder nor on the Hub.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from torch import nn

from ..config import PrunerConfig
from ..metrics import LatencyComparison, count_parameters
from ..record import BASE_MODEL_KEY, CARD_KEY, METADATA_KEY, SUMMARY_KEY
from . import MODELING_FILE, _auto_classes, _layout, _stock_class, plain_config_updates

__all__ = [
    "CARD_MARKER",
    "CITATION",
    "WIDTHS_PICTURE",
    "is_ispasp_card",
    "model_card",
    "set_card_info",
    "widths_svg",
    "write_model_card",
]

logger = logging.getLogger(__name__)

README = "README.md"
WIDTHS_PICTURE = "ispasp_widths.svg"
CARD_MARKER = "<!-- hf_ispasp model card"
_MARKER_LINE = (f"{CARD_MARKER}: save_pretrained and push_to_hub rewrite this file while this line is in it; "
                "delete the line to keep your edits. -->")
_SVG_MARKER = "<!-- hf_ispasp widths picture -->"
PAPER_URL = "https://arxiv.org/abs/2112.04905"
CITATION = """@inproceedings{wolfe2022ispasp,
  title         = {i-SpaSP: Structured Neural Pruning via Sparse Signal Recovery},
  author        = {Wolfe, Cameron R. and Kyrillidis, Anastasios},
  booktitle     = {Proceedings of The 4th Annual Learning for Dynamics and Control Conference},
  series        = {Proceedings of Machine Learning Research},
  volume        = {168},
  pages         = {248--262},
  publisher     = {PMLR},
  year          = {2022},
  url           = {https://proceedings.mlr.press/v168/wolfe22a.html},
  eprint        = {2112.04905},
  archivePrefix = {arXiv}
}"""
TAGS = ("pruned", "structured-pruning", "i-spasp", "hf_ispasp")
# Hub pipeline tag of the auto class a checkpoint loads with (base models have none we could be sure of).
_PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForImageClassification": "image-classification",
}
_LATENCY_FIELDS = tuple(f.name for f in dataclasses.fields(LatencyComparison))


# What the user adds ------------------------------------------------------------------------------------------
def _record(model: nn.Module) -> dict[str, Any]:
    record = getattr(getattr(model, "config", None), METADATA_KEY, None) or getattr(model, "ispasp_metadata", None)
    if not isinstance(record, dict) or not isinstance(record.get("widths"), dict):
        raise ValueError(f"the {type(model).__name__} has no width record ({METADATA_KEY}): it was not pruned by "
                         "hf_ispasp (ISpaSPPruner.prune) nor loaded with hf_ispasp.load_pruned")
    return record


def _numbers(name: str, values: Any) -> dict[str, float | int]:
    if not isinstance(values, Mapping):
        raise TypeError(f"{name} must be a dict of metric name -> number, got {type(values).__name__}")
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{name}[{key!r}] must be a finite number, got {value!r}")
        out[str(key)] = value if isinstance(value, int) else float(value)
    return out


def _card_fields(
    metrics: Mapping[str, float] | None = None, dense_metrics: Mapping[str, float] | None = None,
    dataset: str | Mapping[str, str] | None = None, latency: LatencyComparison | Mapping[str, float] | None = None,
    latency_setting: str | None = None, base_model: str | None = None, title: str | None = None,
    license: str | None = None, language: str | Sequence[str] | None = None, tags: Sequence[str] | None = None,
    notes: str | None = None,
) -> dict[str, Any]:
    """The given fields, checked and made plain JSON (they are stored in config.json)."""
    fields: dict[str, Any] = {}
    if metrics is not None:
        fields["metrics"] = _numbers("metrics", metrics)
    if dense_metrics is not None:
        fields["dense_metrics"] = _numbers("dense_metrics", dense_metrics)
    if dataset is not None:
        data = {"id": dataset} if isinstance(dataset, str) else dict(dataset)
        unknown = sorted(set(data) - {"id", "name", "config", "split", "task"})
        if not isinstance(data.get("id"), str) or unknown:
            raise ValueError(f"dataset must be a Hub dataset id or a dict with 'id' and optionally 'name', 'config', "
                             f"'split', 'task'; got {dataset!r}")
        fields["dataset"] = {k: str(v) for k, v in data.items() if v is not None}
    if latency is not None:
        values = latency.to_dict() if isinstance(latency, LatencyComparison) else dict(latency)
        missing = [k for k in ("baseline_s", "candidate_s", "speedup") if k not in values]
        if missing:
            raise ValueError(f"latency needs {missing}: pass hf_ispasp.metrics.latency_ratio(dense, pruned, inputs)")
        fields["latency"] = {k: float(values[k]) for k in _LATENCY_FIELDS if values.get(k) is not None}
    if latency_setting is not None:
        fields["latency_setting"] = str(latency_setting)
    for key, value in (("base_model", base_model), ("title", title), ("license", license), ("notes", notes)):
        if value is not None:
            fields[key] = str(value)
    if language is not None:
        fields["language"] = [language] if isinstance(language, str) else [str(x) for x in language]
    if tags is not None:
        fields["tags"] = [tags] if isinstance(tags, str) else [str(x) for x in tags]
    return fields


def set_card_info(
    model: nn.Module, *, metrics: Mapping[str, float] | None = None, dense_metrics: Mapping[str, float] | None = None,
    dataset: str | Mapping[str, str] | None = None, latency: LatencyComparison | Mapping[str, float] | None = None,
    latency_setting: str | None = None, base_model: str | None = None, title: str | None = None,
    license: str | None = None, language: str | Sequence[str] | None = None, tags: Sequence[str] | None = None,
    notes: str | None = None,
) -> None:
    """Store what the model card of ``model`` should show; ``save_pretrained`` / ``push_to_hub`` then write it.

    The fields go into the width record (``config.ispasp["card"]``), so they travel with ``config.json`` and a
    checkpoint loaded back and pushed again keeps them. Each given field replaces the stored one; ``None`` leaves
    it. A later prune of the model drops them (they described the model before it).

    Args:
        model: A model pruned by hf_ispasp (or loaded with ``load_pruned``).
        metrics: This model's evaluation results, e.g. ``{"accuracy": 0.912}``; with ``dataset`` they also become
            the card's ``model-index`` (Hub evaluation results).
        dense_metrics: The dense model's results on the same data, for the comparison table.
        dataset: Hub id of the evaluation dataset, or a dict with ``id`` and optionally ``name``, ``config``,
            ``split`` and ``task`` (pipeline tag of the evaluation; default: the model's).
        latency: Dense-vs-pruned timing, a :class:`~hf_ispasp.metrics.LatencyComparison` from
            ``hf_ispasp.metrics.latency_ratio`` (its median and spread are shown) or a dict of its fields.
        latency_setting: Where it was measured, e.g. ``"1 x 128 tokens, 1 CPU thread, float32"``.
        base_model: Hub id of the dense model (default: what the prune recorded from ``config._name_or_path``).
        title: Heading of the card.
        license: SPDX-style license id for the metadata (e.g. the base model's, ``"apache-2.0"``).
        language: Language code(s) for the metadata.
        tags: Tags added to the card's own (``pruned``, ``i-spasp``, ...).
        notes: Free Markdown, shown as a "Notes" section.
    """
    record = _record(model)
    fields = _card_fields(metrics, dense_metrics, dataset, latency, latency_setting, base_model, title, license,
                          language, tags, notes)
    record[CARD_KEY] = {**(record.get(CARD_KEY) or {}), **fields}


# The picture -------------------------------------------------------------------------------------------------
def _series(record: Mapping[str, Any]) -> list[tuple[str, list[int], list[int] | None]]:
    """(label, kept per layer, dense per layer or ``None``) for every kind of group the record holds."""
    widths = record["widths"]
    dense = (record.get(SUMMARY_KEY) or {}).get("dense_widths") or {}

    def ints(source: Mapping[str, Any], key: str) -> list[int] | None:
        value = source.get(key)
        return [int(v) for v in value] if isinstance(value, list) and all(isinstance(v, int) for v in value) else None

    def pair(label: str, kept: list[int] | None, base: list[int] | None) -> None:
        if kept:
            series.append((label, kept, base if base is not None and len(base) == len(kept) else None))

    series: list[tuple[str, list[int], list[int] | None]] = []
    heads, ratio = ints(widths, "heads"), ints(widths, "q_per_kv")
    if heads and ratio and len(ratio) == len(heads):  # decoders: KV heads, each with its query heads
        dense_heads, dense_ratio = ints(dense, "heads"), ints(dense, "q_per_kv")
        dense_query = ([h * r for h, r in zip(dense_heads, dense_ratio, strict=True)]
                       if dense_heads and dense_ratio and len(dense_heads) == len(dense_ratio) else None)
        pair("query heads", [h * r for h, r in zip(heads, ratio, strict=True)], dense_query)
        pair("key/value heads", heads, dense_heads)
    else:
        pair("attention heads", heads, ints(dense, "heads"))
    cnn = "cnn" in str(widths.get("format", ""))
    pair("inner channels" if cnn else "FFN neurons", ints(widths, "ffn"), ints(dense, "ffn"))
    layers = widths.get("layers")
    if isinstance(layers, list) and layers and all(isinstance(x, list) for x in layers):
        width = min(len(x) for x in layers)
        dense_layers = dense.get("layers") if isinstance(dense.get("layers"), list) else None
        for j in range(width):
            label = "inner channels" if width == 1 else f"inner channels, block part {j + 1}"
            base = ([int(x[j]) for x in dense_layers] if dense_layers and len(dense_layers) == len(layers)
                    and all(isinstance(x, list) and len(x) > j for x in dense_layers) else None)
            pair(label, [int(x[j]) for x in layers], base)
    return series


def _same_shares(one: tuple[str, list[int], list[int] | None], other: tuple[str, list[int], list[int] | None]) -> bool:
    """Whether two series keep the same fraction of every layer."""
    if one[2] is None or other[2] is None or len(one[1]) != len(other[1]):
        return False
    return all(k * d0 == k0 * d for k, d, k0, d0 in zip(one[1], one[2], other[1], other[2], strict=True))


def widths_svg(model: nn.Module) -> str:
    """A self-contained SVG of the kept width of every layer (one panel per kind of group), without matplotlib.

    Bars are the kept fraction of the dense width (grey: removed); hovering a bar names the counts. Without
    dense widths in the record (written before the pruner stored its summary) the bars are counts, scaled
    to the widest layer.
    """
    series = _series(_record(model))
    if not series:
        raise ValueError("the width record holds no per-layer widths to draw")
    # Key/value heads cut in the query heads' ratio (gqa_groups="kv") would repeat the panel above; the table has them.
    series = [s for i, s in enumerate(series)
              if not (s[0] == "key/value heads" and i and _same_shares(s, series[i - 1]))]
    width, left, right, plot_h, panel_h, top = 760, 56, 16, 110, 168, 52
    plot_w = width - left - right
    height = top + panel_h * len(series)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        _SVG_MARKER,
        "<title>Kept width per layer after i-SpaSP pruning</title>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{left}" y="22" font-size="15" font-weight="bold" fill="#111827">Kept width per layer '
        "(i-SpaSP, hf_ispasp)</text>",
        f'<rect x="{left}" y="32" width="10" height="10" fill="#2563eb"/>'
        f'<text x="{left + 14}" y="41" fill="#374151">kept</text>'
        f'<rect x="{left + 56}" y="32" width="10" height="10" fill="#e5e7eb"/>'
        f'<text x="{left + 70}" y="41" fill="#374151">removed</text>',
    ]
    for index, (label, kept, dense) in enumerate(series):
        y0 = top + index * panel_h
        y_top, y_bottom = y0 + 30, y0 + 30 + plot_h
        n = len(kept)
        if dense is not None:
            share = 100 * sum(kept) / max(sum(dense), 1)
            heading = f"{label}: {sum(kept):,} of {sum(dense):,} kept ({share:.1f}%)"
            scale, ticks = [max(d, 1) for d in dense], ("0%", "50%", "100%")
        else:
            widest = max(max(kept), 1)
            heading = f"{label}: {sum(kept):,} kept (dense widths not recorded)"
            scale, ticks = [widest] * n, ("0", f"{widest / 2:g}", f"{widest}")
        out.append(f'<text x="{left}" y="{y0 + 20}" font-weight="bold" fill="#111827">{escape(heading)}</text>')
        for k, tick in enumerate(ticks):
            y = y_bottom - plot_h * k / 2
            out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#d1d5db" '
                       'stroke-width="0.5"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#6b7280" '
                       f'font-size="10">{escape(tick)}</text>')
        step = plot_w / n
        bar = min(max(step * 0.8, 1.0), 48.0)
        every = max(1, math.ceil(n / 24))
        for layer in range(n):
            x = left + layer * step + (step - bar) / 2
            fraction = min(kept[layer] / scale[layer], 1.0)
            what = (f"layer {layer}: {kept[layer]} of {dense[layer]} {label} kept ({100 * fraction:.1f}%)"
                    if dense is not None else f"layer {layer}: {kept[layer]} {label} kept")
            if dense is not None:
                out.append(f'<rect x="{x:.2f}" y="{y_top}" width="{bar:.2f}" height="{plot_h}" fill="#e5e7eb"/>')
            h = plot_h * fraction
            out.append(f'<rect class="kept" x="{x:.2f}" y="{y_bottom - h:.2f}" width="{bar:.2f}" height="{h:.2f}" '
                       f'fill="#2563eb"><title>{escape(what)}</title></rect>')
            if layer % every == 0:
                out.append(f'<text x="{x + bar / 2:.2f}" y="{y_bottom + 14}" text-anchor="middle" fill="#6b7280" '
                           f'font-size="10">{layer}</text>')
        out.append(f'<text x="{left + plot_w}" y="{y_bottom + 28}" text-anchor="end" fill="#6b7280" '
                   'font-size="10">layer</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# The card ----------------------------------------------------------------------------------------------------
def _checkpoint_kind(model: nn.Module) -> str:
    """How the saved checkpoint loads, decided as :func:`finish_checkpoint` decides it."""
    if not hasattr(getattr(model, "config", None), "to_dict"):
        return "hf_ispasp"
    if plain_config_updates(model) is not None:
        return "plain"
    try:
        _layout(model)
    except TypeError:
        return "hf_ispasp"
    return "remote_code"


def _auto_class(model: nn.Module) -> str:
    """The most specific ``AutoModel*`` class that builds ``model``'s class (``AutoModel`` when none does)."""
    name = _stock_class(type(model)).__name__
    autos = _auto_classes(model.config.model_type, name)
    matching = [a for a in autos if a != "AutoModel" and name.endswith(a.removeprefix("AutoModel"))]
    return max(matching, key=len) if matching else ("AutoModel" if "AutoModel" in autos or not autos else autos[0])


def _count(value: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g}"


def _number(value: float | int) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.2f}"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _share(after: float, before: float) -> str:
    return f"{100 * after / before:.1f}%" if before else "-"


def _size_table(model: nn.Module, record: Mapping[str, Any], card: Mapping[str, Any]) -> list[str]:
    summary = record.get(SUMMARY_KEY) or {}
    rows = ["| | dense | pruned | pruned / dense |", "|---|---:|---:|---:|"]
    params = summary.get("params")
    if params:
        rows.append(f"| parameters | {params[0]:,} | {params[1]:,} | {_share(params[1], params[0])} |")
        layer = summary.get("layer_params")
        if layer:
            rows.append(f"| parameters of the pruned layers | {layer[0]:,} | {layer[1]:,} | "
                        f"{_share(layer[1], layer[0])} |")
    else:
        rows.append(f"| parameters | - | {count_parameters(model):,} | - |")
    flops = summary.get("flops")
    if flops:
        shape = next(iter((summary.get("flops_input") or {}).items()), None)
        where = f" on `{shape[0]}` of shape {' x '.join(map(str, shape[1]))}" if shape else ""
        rows.append(f"| FLOPs of one forward pass{where} | {_count(flops[0])} | "
                    f"{_count(flops[1])} | {_share(flops[1], flops[0])} |")
    latency = card.get("latency")
    if latency:
        spread = ""
        if "speedup_q25" in latency and "speedup_q75" in latency:
            spread = f"; IQR {latency['speedup_q25']:.2f}-{latency['speedup_q75']:.2f}x"
        if "speedup_min" in latency and "speedup_max" in latency:
            spread += f", range {latency['speedup_min']:.2f}-{latency['speedup_max']:.2f}x"
        pairs = f" over {int(latency['pairs'])} interleaved pairs" if latency.get("pairs") else ""
        rows.append(f"| latency per forward pass (median) | {_seconds(latency['baseline_s'])} | "
                    f"{_seconds(latency['candidate_s'])} | {latency['speedup']:.2f}x faster{spread} |")
        where = card.get("latency_setting")
        rows += ["", f"Latency: median of the per-pair dense/pruned time ratios{pairs}"
                 f"{' (' + where + ')' if where else ''}, measured with `hf_ispasp.metrics.latency_ratio`."]
    elif flops:
        rows += ["", "FLOPs are counted by `torch.utils.flop_counter` (matmuls, convolutions, attention). Latency "
                 "was not measured for this card."]
    return rows


def _widths_table(series: list[tuple[str, list[int], list[int] | None]]) -> list[str]:
    rows = ["| layer | " + " | ".join(label for label, _, _ in series) + " |", "|---:" + "|---:" * len(series) + "|"]
    for layer in range(max(len(kept) for _, kept, _ in series)):
        cells = []
        for _, kept, dense in series:
            if layer >= len(kept):
                cells.append("-")
            else:
                cells.append(f"{kept[layer]} / {dense[layer]}" if dense is not None else str(kept[layer]))
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return rows


def _loading(kind: str, model_id: str, auto: str | None, base_model: str | None) -> list[str]:
    lines: list[str] = []
    if kind == "plain":
        lines += ["Every layer has the same widths, so `config.json` states them and the stock transformers class "
                  "loads this checkpoint (no extra code):", "", "```python", f"from transformers import {auto}", "",
                  f'model = {auto}.from_pretrained("{model_id}")', "```"]
    elif kind == "remote_code":
        lines += ["The layers have different widths, which the stock transformers classes cannot build from a "
                  f"config. The checkpoint carries `{MODELING_FILE}` (the stock classes with per-layer widths; it "
                  "needs only transformers), so load it with `trust_remote_code=True`:", "", "```python",
                  f"from transformers import {auto}", "",
                  f'model = {auto}.from_pretrained("{model_id}", trust_remote_code=True)', "```", "",
                  "Without `trust_remote_code=True` loading stops with an error that says so; it never builds the "
                  "dense shapes with random weights."]
    lines += ["", "With hf_ispasp installed, `load_pruned` rebuilds the pruned shapes from the width record in "
              "`config.json` and loads the weights strictly:", "", "```python", "from hf_ispasp import load_pruned",
              "", f'model = load_pruned("{model_id}")', "```"]
    if base_model:
        lines += ["", f"The tokenizer / processor is the dense model's (`{base_model}`) unless this repository has "
                  "its own."]
    return lines


def _pruning(record: Mapping[str, Any]) -> list[str]:
    stored = dict(record.get("pruner_config") or {})
    defaults = PrunerConfig().to_dict()
    changed = {k: v for k, v in stored.items() if k != "show_progress" and k in defaults and v != defaults[k]}
    if isinstance(changed.get("layer_overrides"), dict):
        changed["layer_overrides"] = {int(k): v for k, v in changed["layer_overrides"].items()}
    arguments = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    summary = record.get(SUMMARY_KEY) or {}
    lines = [f"Pruned with hf_ispasp {record.get('version', '?')}: whole attention heads and FFN neurons (or "
             "channels) were removed, layer by layer in forward order, each block's groups chosen by i-SpaSP so that "
             "the block's output on calibration data stays close to the dense block's. The weights are physically "
             "smaller; nothing is masked."]
    facts = []
    if summary.get("calibration_tokens"):
        facts.append(f"{summary['calibration_tokens']:,} calibration tokens (or positions)")
    if summary.get("prunes", 1) > 1:
        facts.append(f"{summary['prunes']} successive prunes")
    if summary.get("seconds"):
        facts.append(f"{summary['seconds']:.1f} s of pruning")
    if record.get("schedule"):
        facts.append(f"iterative schedule {json.dumps(record['schedule'], sort_keys=True)}")
    if facts:
        lines += ["", "Prune: " + ", ".join(facts) + "."]
    lines += ["", "```python", "from hf_ispasp import ISpaSPPruner, PrunerConfig", "",
              f"config = PrunerConfig({arguments})", "pruned = ISpaSPPruner(model, config).prune(calibration_data)",
              "```", "", "<details><summary>Full <code>PrunerConfig</code></summary>", "", "```json",
              json.dumps(stored, indent=2, sort_keys=True), "```", "", "</details>"]
    return lines


def _evaluation(card: Mapping[str, Any]) -> list[str]:
    mine, dense = card.get("metrics") or {}, card.get("dense_metrics") or {}
    if not mine and not dense:
        return []
    names = list(dict.fromkeys([*dense, *mine]))
    data = card.get("dataset") or {}
    where = ""
    if data:
        where = " on " + " / ".join(f"`{data[k]}`" for k in ("id", "config", "split") if data.get(k))
    lines = ["## Evaluation", "", f"As reported by the uploader{where}.", "",
             "| metric | dense | pruned | pruned - dense |", "|---|---:|---:|---:|"]
    for name in names:
        a, b = dense.get(name), mine.get(name)
        change = _number(b - a) if a is not None and b is not None else "-"
        lines.append(f"| {name} | {'-' if a is None else _number(a)} | {'-' if b is None else _number(b)} | "
                     f"{change} |")
    return lines + [""]


def model_card(
    model: nn.Module, *, repo_id: str | None = None, checkpoint: str | None = None, **info: Any
) -> Any:
    """The :class:`huggingface_hub.ModelCard` of a pruned model.

    Args:
        model: A model pruned by hf_ispasp (or loaded with ``load_pruned``).
        repo_id: Hub id used in the loading snippets and as the evaluation results' model name (default: a
            placeholder).
        checkpoint: How the saved checkpoint loads, ``"plain"``, ``"remote_code"`` or ``"hf_ispasp"``, as
            :func:`~hf_ispasp.portable.finish_checkpoint` decided (default: decided the same way here).
        info: Fields of :func:`set_card_info`, for this card only, over the stored ones (``tags`` are added).

    The picture is referenced as :data:`WIDTHS_PICTURE` next to the card; :func:`write_model_card` writes both.
    ``card.push_to_hub(repo_id)`` (huggingface_hub) replaces a repository's README with this card explicitly.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    record = _record(model)
    stored, given = record.get(CARD_KEY) or {}, _card_fields(**info)
    card = {**stored, **given}
    kind = checkpoint or _checkpoint_kind(model)
    transformers_model = hasattr(getattr(model, "config", None), "to_dict")
    auto = _auto_class(model) if transformers_model else None
    pipeline_tag = _PIPELINE_TAGS.get(auto or "") or (None if transformers_model else "image-classification")
    base_model = card.get("base_model") or record.get(BASE_MODEL_KEY)
    model_id = repo_id or "path/or/repo-id"
    name = repo_id.split("/")[-1] if repo_id else (f"{base_model.split('/')[-1]}-pruned" if base_model
                                                   else f"{type(model).__name__}-pruned")
    title = card.get("title") or (f"{base_model} pruned with i-SpaSP" if base_model
                                  else f"{type(model).__name__} pruned with i-SpaSP")
    data = card.get("dataset") or {}
    eval_results = None
    task = data.get("task") or pipeline_tag
    if card.get("metrics") and data and task:
        eval_results = [EvalResult(task_type=task, dataset_type=data["id"], dataset_name=data.get("name", data["id"]),
                                   dataset_config=data.get("config"), dataset_split=data.get("split"),
                                   metric_type=key, metric_value=value, metric_name=key)
                        for key, value in card["metrics"].items()]
    tags = list(dict.fromkeys([*TAGS, *stored.get("tags", []), *given.get("tags", [])]))
    metadata = ModelCardData(
        base_model=base_model, library_name="transformers" if transformers_model else "timm", tags=tags,
        pipeline_tag=pipeline_tag, license=card.get("license"), language=card.get("language"),
        datasets=[data["id"]] if data else None, model_name=name if eval_results else None,
        eval_results=eval_results,
    )
    series = _series(record)
    params = (record.get(SUMMARY_KEY) or {}).get("params")
    base = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else f"a `{type(model).__name__}`"
    body = [_MARKER_LINE, "", f"# {title}", "",
            f"A structurally pruned version of {base}: {_joined([label for label, _, _ in series])} were removed with "
            f"[i-SpaSP]({PAPER_URL}) (Wolfe & Kyrillidis, L4DC 2022) by hf_ispasp"
            + (f", keeping {_share(params[1], params[0])} of the parameters." if params else "."), "",
            "## Size and speed", "", *_size_table(model, record, card), ""]
    if series:
        body += ["## Widths per layer", "", f"![Kept width of every layer]({WIDTHS_PICTURE})", "",
                 "<details><summary>Widths per layer (kept / dense)</summary>", "", *_widths_table(series), "",
                 "</details>", ""]
    body += _evaluation(card)
    body += ["## How to load", "", *_loading(kind, model_id, auto, base_model), "",
             "## How it was pruned", "", *_pruning(record), ""]
    if card.get("notes"):
        body += ["## Notes", "", card["notes"], ""]
    body += ["## Citation", "", "The pruning algorithm, i-SpaSP:", "", "```bibtex", CITATION, "```", ""]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(body))


def _joined(labels: list[str]) -> str:
    labels = labels or ["groups of units"]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def is_ispasp_card(text: str) -> bool:
    """Whether a README is a card that hf_ispasp wrote (and may therefore rewrite)."""
    return CARD_MARKER in text


def _ours(path: Path, marker: str) -> bool:
    return marker in path.read_text(encoding="utf-8", errors="replace")


def write_model_card(model: nn.Module, folder: str | os.PathLike, target: str | os.PathLike | None = None,
                     **kwargs: Any) -> bool:
    """Write ``README.md`` (:func:`model_card`) and :data:`WIDTHS_PICTURE` into ``folder``; ``False`` if not written.

    A ``README.md`` that hf_ispasp did not write (no :data:`CARD_MARKER`) is left as it is, and so is a picture
    file of that name that we did not write. ``target``: the folder whose files decide that, when ``folder`` is
    a staging folder that will be moved onto it (``save_pruned``). ``kwargs`` go to :func:`model_card`.
    """
    folder, existing = Path(folder), Path(target if target is not None else folder)
    readme, picture = existing / README, existing / WIDTHS_PICTURE
    if readme.exists() and not _ours(readme, CARD_MARKER):
        logger.info("%s was not written by hf_ispasp: the model card is not written over it", readme)
        return False
    card = model_card(model, **kwargs)
    if _series(_record(model)):
        if picture.exists() and not _ours(picture, _SVG_MARKER):
            logger.warning("%s was not written by hf_ispasp: left as it is (the card shows it)", picture)
        else:
            (folder / WIDTHS_PICTURE).write_text(widths_svg(model), encoding="utf-8")
    card.save(folder / README)
    return True
