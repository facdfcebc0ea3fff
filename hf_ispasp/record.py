"""The width record: where a pruned model keeps its per-layer widths (a leaf module, imported by all sides)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["BASE_MODEL_KEY", "CARD_KEY", "METADATA_KEY", "SUMMARY_KEY", "summarize_prune"]

# Attribute of ``model.config`` (saved in config.json) holding ``{"version", "widths", "pruner_config"}`` and the
# informative entries below (read by the model card, never by loading).
METADATA_KEY = "ispasp"
# Hub id of the dense model the prune started from (kept across later prunes of the same model).
BASE_MODEL_KEY = "base_model"
# Dense-vs-pruned size of the prune: {"params", "layer_params", "flops": [dense, pruned], "flops_input",
# "dense_widths", "prunes", "seconds", "calibration_tokens"}.
SUMMARY_KEY = "summary"
# What the user asked the model card to show (metrics, dataset, latency, ...): see hf_ispasp.set_card_info.
CARD_KEY = "card"


def summarize_prune(
    report: Any, dense_widths: Mapping[str, Any], flops_input: Mapping[str, list[int]],
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record's summary of a prune (``report``: a ``PruningReport``), a few numbers small enough for config.json.

    A model pruned again (iterative schedules, a loaded checkpoint pruned further) keeps the dense side of the
    ``previous`` summary, so "dense" always means the model before the first prune.
    """
    summary: dict[str, Any] = {
        "params": [int(report.params_before), int(report.params_after)],
        "layer_params": [int(report.layer_params_before), int(report.layer_params_after)],
        "flops": [int(report.flops_before), int(report.flops_after)],
        "flops_input": {str(k): [int(n) for n in v] for k, v in flops_input.items()},
        "dense_widths": dict(dense_widths),
        "prunes": 1,
        "seconds": round(float(report.seconds), 3),
        "calibration_tokens": int(report.calibration_tokens),
    }
    if isinstance(previous, Mapping) and previous.get("flops_input") == summary["flops_input"]:
        for key in ("params", "layer_params", "flops"):
            if isinstance(previous.get(key), list) and len(previous[key]) == 2:
                summary[key][0] = int(previous[key][0])
        if isinstance(previous.get("dense_widths"), Mapping):
            summary["dense_widths"] = dict(previous["dense_widths"])
        summary["prunes"] = int(previous.get("prunes", 1)) + 1
        summary["seconds"] = round(float(previous.get("seconds", 0.0)) + summary["seconds"], 3)
    return summary
