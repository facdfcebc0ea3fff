"""Budgets stated as a cost target: the keep ratio that brings a model to a fraction of its dense FLOPs."""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from .adapters.base import adapter_for
from .config import kept_count
from .metrics import count_flops
from .partitions import first_per_run

__all__ = ["ffn_ratio_for_flops", "uniform_compaction"]

logger = logging.getLogger(__name__)


def ffn_ratio_for_flops(
    model: nn.Module, fraction: float, head_keep_ratio: float = 1.0, inputs: Any = None, tolerance: float = 0.005
) -> float:
    """Uniform ``ffn_keep_ratio`` whose compacted model costs about ``fraction`` of the dense FLOPs.

    Bisects on a weight-free compaction (the first ``k`` groups of every block, which costs the same as any
    other ``k`` groups), so no data is needed. Heads, when the model has any, are kept at ``head_keep_ratio``.

    Args:
        model: A supported model.
        fraction: Target FLOPs as a fraction of the dense model's, in (0, 1].
        head_keep_ratio: Keep ratio of attention heads held fixed while the FFN ratio is searched.
        inputs: Inputs for counting (default: the adapter's ``example_inputs()``).
        tolerance: Stop once the bracket on the ratio is this narrow.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    inputs = inputs if inputs is not None else adapter_for(model).example_inputs()
    dense = count_flops(model, inputs)

    def cost(ratio: float) -> float:
        return count_flops(uniform_compaction(model, ratio, head_keep_ratio), inputs) / dense

    low, high = 0.0, 1.0
    if cost(1e-6) > fraction:
        logger.warning("even one group per block costs more than %.3f of the dense FLOPs", fraction)
        return 1e-6
    while high - low > tolerance:
        mid = (low + high) / 2
        if cost(mid) > fraction:
            high = mid
        else:
            low = mid
    return max(low, 1e-6)


def uniform_compaction(model: nn.Module, ffn_keep_ratio: float, head_keep_ratio: float, options: Any = None
                       ) -> nn.Module:
    """A copy of ``model`` with every block cut to its budgeted count (its first groups; weights do not matter).

    Any ``k`` groups of a block cost the same FLOPs and parameters, so this prices a budget without data.
    ``options``: a :class:`~hf_ispasp.PrunerConfig` whose group options apply (``gqa_groups``).
    """
    candidate = copy.deepcopy(model)
    adapter = adapter_for(candidate)
    if options is not None:
        adapter.configure(options)
    for index in range(len(adapter.layers())):
        for block in adapter.blocks(index):
            ratio = ffn_keep_ratio if block.kind == "ffn" else head_keep_ratio
            keep = kept_count(block.num_groups, ratio, partitions=block.partitions)
            if keep < block.num_groups:
                adapter.compact(block, first_per_run(block.num_groups, keep // block.partitions, block.partitions))
    return candidate
