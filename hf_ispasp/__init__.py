"""hf_ispasp: structured pruning of Hugging Face Transformers and timm models with i-SpaSP.

i-SpaSP (Wolfe & Kyrillidis, "i-SpaSP: Structured Neural Pruning via Sparse Signal Recovery",
arXiv:2112.04905) selects the attention heads, FFN neurons or channels to keep by sparse signal recovery on
each block's hidden representation.
"""

from .adapters import (
    ModelAdapter,
    PrunableBlock,
    UnsupportedModelError,
    adapter_for,
    register_adapter,
    supported_model_types,
)
from .config import PrunerConfig
from .export import check_onnx, export_onnx
from .portable.card import model_card, set_card_info, widths_svg, write_model_card
from .pruner import ISpaSPPruner, PruningReport
from .serialization import CheckpointFolderError, CheckpointMismatchError, load_pruned, save_pruned
from .statistics import CalibrationError
from .version import __version__

__all__ = [
    "CalibrationError",
    "CheckpointFolderError",
    "CheckpointMismatchError",
    "ISpaSPPruner",
    "ModelAdapter",
    "PrunableBlock",
    "PrunerConfig",
    "PruningReport",
    "UnsupportedModelError",
    "__version__",
    "adapter_for",
    "check_onnx",
    "export_onnx",
    "load_pruned",
    "model_card",
    "register_adapter",
    "save_pruned",
    "set_card_info",
    "supported_model_types",
    "widths_svg",
    "write_model_card",
]
