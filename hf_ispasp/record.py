"""The width record: where a pruned model keeps its per-layer widths (a leaf module, imported by all sides)."""

from __future__ import annotations

__all__ = ["METADATA_KEY"]

# Attribute of ``model.config`` (saved in config.json) holding ``{"version", "widths", "pruner_config"}``.
METADATA_KEY = "ispasp"
