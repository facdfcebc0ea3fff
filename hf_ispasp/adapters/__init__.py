"""Architecture adapters; importing this package registers the built-in ones."""

from . import encoders
from .base import (
    ADAPTER_REGISTRY,
    ModelAdapter,
    PrunableBlock,
    UnsupportedModelError,
    adapter_for,
    register_adapter,
    supported_model_types,
)

__all__ = [
    "ADAPTER_REGISTRY",
    "ModelAdapter",
    "PrunableBlock",
    "UnsupportedModelError",
    "adapter_for",
    "encoders",
    "register_adapter",
    "supported_model_types",
]
