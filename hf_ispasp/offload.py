"""Models dispatched by accelerate with CPU or disk offload (``from_pretrained(..., device_map="auto")``).

Offloaded layers keep their weights on the meta device and an ``AlignDevicesHook`` on every submodule loads them
onto the execution device for each forward. The pruner needs a plain copy of one layer at a time with real
weights on that device (:func:`materialized_copy`), and afterwards offloads the pruned copy again
(:func:`offload`) so that device memory stays at one layer. Nothing here knows about the algorithm.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from accelerate import cpu_offload
from accelerate.utils.modeling import align_module_device, has_offloaded_params
from torch import nn

__all__ = ["execution_device", "has_offload", "materialized_copy", "offload"]

# Instance attributes accelerate's add_hook_to_module sets; a plain copy must not carry them (they hold the
# offloaded weights map of the whole model, and a forward bound to the original module).
_HOOK_ATTRIBUTES = ("_hf_hook", "_old_forward", "forward")


def has_offload(module: nn.Module) -> bool:
    """Whether any submodule keeps its weights offloaded (meta device + accelerate hook)."""
    return any(has_offloaded_params(m) for m in module.modules())


def execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else its first real parameter's device."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return default


def materialized_copy(module: nn.Module, device: torch.device, memo: dict[int, Any] | None = None) -> nn.Module:
    """A hook-free copy of ``module`` with every weight loaded onto ``device`` (the original is left as it was).

    ``memo`` (as for ``copy.deepcopy``) names objects the copy shares instead of copying, e.g. the model config.
    """
    with contextlib.ExitStack() as stack:
        for sub in module.modules():
            if has_offloaded_params(sub):
                stack.enter_context(align_module_device(sub, device))
        stashed = {}
        for sub in module.modules():
            found = {name: sub.__dict__.pop(name) for name in _HOOK_ATTRIBUTES if name in sub.__dict__}
            if found:
                stashed[sub] = found
        try:
            clone = copy.deepcopy(module, dict(memo or {}))
        finally:
            for sub, found in stashed.items():
                sub.__dict__.update(found)
    return clone.to(device)


def offload(module: nn.Module, device: torch.device) -> None:
    """Offload ``module``'s weights to CPU memory again; each forward loads them onto ``device``.

    Disk-offloaded layers come back CPU-offloaded: their pruned weights are new and never written to the
    offload folder (which belongs to the caller).
    """
    cpu_offload(module.to("cpu"), execution_device=device)
