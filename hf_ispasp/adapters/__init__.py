"""Architecture adapters; importing this package registers the built-in ones."""

from . import decoders, encoders, vit  # noqa: F401  (registers the adapters)
from .base import (
    ADAPTER_REGISTRY,
    ModelAdapter,
    PrunableBlock,
    UnsupportedModelError,
    adapter_for,
    register_adapter,
    supported_model_types,
)
from .groups import Attr, Cut, GroupSpec, SpecAdapter

try:  # timm is an optional extra (pip install hf_ispasp[timm]); its adapters register only when it is installed
    import timm as _timm  # noqa: F401
except ImportError:
    pass
else:
    from . import timm_cnn, timm_vit  # noqa: F401

__all__ = [
    "ADAPTER_REGISTRY",
    "Attr",
    "Cut",
    "GroupSpec",
    "ModelAdapter",
    "PrunableBlock",
    "SpecAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "decoders",
    "encoders",
    "register_adapter",
    "supported_model_types",
]
