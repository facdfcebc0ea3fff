"""ONNX export of pruned models, and the onnxruntime check that the exported graph computes what PyTorch does.

A compacted model is an ordinary transformers (or timm) model whose layers may have different widths; every
width is a constant of the traced graph, so the export needs nothing model-specific. :func:`export_onnx` uses
torch's default exporter (``torch.onnx.export(..., dynamo=True)``: ``torch.export`` then onnxscript), which
handles the encoders, the decoders (grouped-query attention included), timm models and per-layer widths. The
legacy TorchScript exporter (``dynamo=False``) is deprecated and, while far faster (0.5 s against about 10 s for
the tiny test LLaMA), it records transformers' shape-dependent branches in the mask code as constants (its
TracerWarnings), so its dynamic axes are not to be trusted; ``torch.export`` keeps them symbolic or refuses.
Batch and sequence axes are symbolic (``batch``, ``sequence``), so one file serves any batch size and length.
Decoders are exported without a KV cache (``use_cache=False``): one forward from ``input_ids`` and
``attention_mask`` to the full ``logits``, the graph every runtime can run; incremental decoding belongs to
serving engines, which read the plain checkpoint (``hf_ispasp.portable``) instead.

The optional dependencies (``onnx``, ``onnxscript``, ``onnxruntime``) come with ``pip install hf_ispasp[onnx]``;
they are imported only when a function here runs, and a missing one is named in the error.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["OnnxCheck", "OnnxRunner", "check_onnx", "export_onnx"]

# Inputs whose second axis is the token axis (all other inputs get a dynamic batch axis only).
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
_EXAMPLE_BATCH, _EXAMPLE_LENGTH = 2, 8


def _require(*names: str) -> None:
    """Import the optional dependencies now, so a missing one is named with the install command."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX support needs {', '.join(missing)}, which is not installed; "
                          "pip install 'hf_ispasp[onnx]'")


class _Exportable(nn.Module):
    """The model as a function of positional tensors returning a tuple of tensors (what the exporter traces)."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output_names: Sequence[str] | None,
                 extra: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names) if output_names is not None else None
        self.extra = dict(extra)

    def raw(self, *tensors: torch.Tensor) -> Any:
        """The model's own output (a ``ModelOutput`` or tensor) for the inputs in ``input_names`` order."""
        if self.input_names == [""]:  # a timm model: one positional image tensor
            return self.model(*tensors)
        return self.model(**dict(zip(self.input_names, tensors, strict=True)), **self.extra)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = _named_outputs(self.raw(*tensors))
        if self.output_names is None:
            return tuple(named.values())
        return tuple(named[name] for name in self.output_names)


def _named_outputs(out: Any) -> dict[str, torch.Tensor]:
    """The tensor outputs of a forward by name (a ``ModelOutput`` keeps its field names; ``None`` fields drop)."""
    if isinstance(out, torch.Tensor):
        return {"logits": out}
    if isinstance(out, Mapping):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise TypeError(f"the model returned {type(out).__name__}; ONNX export needs tensors, a tuple or a ModelOutput")


def _default_inputs(model: nn.Module) -> dict[str, torch.Tensor] | torch.Tensor:
    """Random example inputs: token ids for a text model, ``pixel_values`` for a transformers vision model, an
    image batch of the timm ``input_size`` for a timm model."""
    gen = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        ids = torch.randint(0, vocab, (_EXAMPLE_BATCH, _EXAMPLE_LENGTH), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(_EXAMPLE_BATCH, channels, size, size, generator=gen)}
    pretrained = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained, Mapping) and pretrained.get("input_size"):
        return torch.randn(_EXAMPLE_BATCH, *pretrained["input_size"], generator=gen)
    raise ValueError(
        f"cannot make example inputs for {type(model).__name__} (no config.vocab_size or image_size, no timm "
        "pretrained_cfg input_size): pass example_inputs, e.g. {'input_ids': ..., 'attention_mask': ...}"
    )


def _as_named(inputs: Mapping[str, Any] | torch.Tensor) -> dict[str, torch.Tensor]:
    """Named input tensors (``""`` names the single positional input of a timm model)."""
    if isinstance(inputs, torch.Tensor):
        return {"": inputs}
    if not isinstance(inputs, Mapping):
        raise TypeError(f"example_inputs must be a dict of tensors or one tensor, got {type(inputs).__name__}")
    named = {k: v for k, v in inputs.items() if v is not None}
    bad = sorted(k for k, v in named.items() if not isinstance(v, torch.Tensor))
    if bad or not named:
        raise TypeError(f"example_inputs must hold tensors; {bad or 'nothing'} is not (keys: {sorted(inputs)})")
    return named


def _dynamic_shapes(named: Mapping[str, torch.Tensor]) -> tuple[dict[int, Any], ...]:
    """One shared ``batch`` dimension for every input, one shared ``sequence`` dimension for the token inputs.

    ``torch.export`` specialises an axis whose example size is 0 or 1 to that constant, so such examples are
    refused here rather than giving a file that silently accepts only that size.
    """
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = []
    for name, tensor in named.items():
        axes = {0: batch}
        if name in _TOKEN_INPUTS and tensor.dim() >= 2:
            axes[1] = sequence
        for axis in axes:
            if tensor.dim() <= axis or tensor.shape[axis] < 2:
                label = name or "the input"
                raise ValueError(
                    f"example input {label!r} has shape {tuple(tensor.shape)}: the batch and sequence axes of the "
                    "example must be at least 2 long, or the exported graph would accept only that size"
                )
        shapes.append(axes)
    return tuple(shapes)


def _extra_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` for models that take it: the export is one full forward without a KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _place_files(staging: Path, target: Path) -> None:
    """Move the exported files next to ``target``; weights files first, the graph (which names them) last."""
    files = sorted(p for p in staging.iterdir() if p.is_file())
    for path in sorted(files, key=lambda p: p.name == target.name):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(path, target.parent / path.name)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    *,
    opset_version: int | None = None,
) -> Path:
    """Export ``model`` (pruned or dense) to ONNX with dynamic batch and sequence axes.

    Args:
        model: A transformers model (encoder or decoder, any head) or a timm model, with any per-layer widths.
        path: The ``.onnx`` file to write. The file appears complete or not at all (written next to it, then
            renamed); a model over 2 GB gets its weights in ``<path>.data`` beside it (ONNX's protobuf limit).
        example_inputs: What the model is traced with: a dict of tensors for transformers models (its keys become
            the ONNX input names; batch and sequence axes at least 2 long), one image tensor for timm models.
            Default: random ``input_ids`` and ``attention_mask`` of shape (2, 8) (no ``token_type_ids``: pass
            them here for sentence pairs); ``pixel_values`` of 2 images for transformers vision models; 2 images
            of the timm ``input_size`` for timm models. Made on the device of the model's first parameter.
        opset_version: ONNX opset; default: the exporter's.

    Returns:
        The path written. Inputs are named after the keys of ``example_inputs`` (``input`` for a timm model),
        outputs after the fields of the model's output (``logits`` for classifiers and causal LMs).

    Raises:
        ImportError: ``onnx`` or ``onnxscript`` is missing (``pip install hf_ispasp[onnx]``).
        ValueError: the example inputs cannot define dynamic axes, or none can be made for this model.
        RuntimeError: the exporter failed (its error is chained).
    """
    _require("onnx", "onnxscript")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx takes a torch nn.Module, got {type(model).__name__}")
    target = Path(path).absolute()
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder: pass the path of the .onnx file, e.g. {target}/model.onnx")
    if example_inputs is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        example_inputs = _default_inputs(model)
        example_inputs = (example_inputs.to(device) if isinstance(example_inputs, torch.Tensor)
                          else {k: v.to(device) for k, v in example_inputs.items()})
    named = _as_named(example_inputs)
    dynamic = _dynamic_shapes(named)
    input_names = ["input"] if list(named) == [""] else list(named)
    extra = _extra_kwargs(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # one forward names the outputs after the model's output fields
            output_names = list(_named_outputs(_Exportable(model, list(named), None, extra).raw(*named.values())))
        wrapper = _Exportable(model, list(named), output_names, extra).eval()
        program = _export(wrapper, tuple(named.values()), input_names, output_names, dynamic, opset_version)
    finally:
        model.train(was_training)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hf_ispasp-onnx-", dir=target.parent))
    try:
        program.save(staging / target.name)
        _place_files(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _export(wrapper: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
            dynamic: tuple[dict[int, Any], ...], opset_version: int | None) -> Any:
    with warnings.catch_warnings():
        # The exporter warns that each shared Dim keeps its first name, which is what we want.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        try:
            return torch.onnx.export(
                wrapper, args, f=None, input_names=input_names, output_names=output_names,
                dynamic_shapes=(dynamic,), opset_version=opset_version, dynamo=True, verbose=False,
            )
        except Exception as err:
            raise RuntimeError(f"torch.onnx.export failed for {type(wrapper.model).__name__}: {err}") from err


# onnxruntime ---------------------------------------------------------------------------------------------------
class OnnxRunner:
    """An onnxruntime CPU session called like the model: ``runner(**inputs)`` returns the outputs in graph order.

    Torch tensors are converted to numpy of the graph's input types, so the same input dict drives the PyTorch
    model and the session (``hf_ispasp.metrics.latency_ratio`` times two runners as it times two models).

    Args:
        path: The ``.onnx`` file.
        threads: onnxruntime intra-op threads (default 1, like the repository's CPU benchmarks; 0: onnxruntime's).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        _require("onnxruntime")
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._types = {i.name: _NUMPY_TYPES.get(i.type) for i in self.session.get_inputs()}

    def feeds(self, *args: Any, **inputs: Any) -> dict[str, np.ndarray]:
        """The session's input dict from tensors or arrays (one positional input for an image model)."""
        if args:
            if len(args) != 1 or inputs or len(self.input_names) != 1:
                raise TypeError(f"pass the inputs by name: {self.input_names}")
            inputs = {self.input_names[0]: args[0]}
        missing = [n for n in self.input_names if n not in inputs or inputs[n] is None]
        if missing:
            raise ValueError(f"{self.path.name} needs inputs {self.input_names}; missing {missing}")
        feeds = {}
        for name in self.input_names:
            value = inputs[name]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            dtype = self._types[name]
            feeds[name] = array.astype(dtype, copy=False) if dtype is not None else array
        return feeds

    def __call__(self, *args: Any, **inputs: Any) -> list[np.ndarray]:
        return self.session.run(None, self.feeds(*args, **inputs))


_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_}


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime against PyTorch on the same inputs.

    ``ok`` when every output has PyTorch's shape and ``|onnx - torch| <= atol + rtol * |torch|`` elementwise
    (``torch.allclose``'s rule); ``max_abs_diff`` is the largest difference over all outputs (``inf`` on a
    shape mismatch) and ``diffs`` the largest per output.
    """

    max_abs_diff: float
    ok: bool
    atol: float
    rtol: float
    diffs: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def check_onnx(
    path: str | os.PathLike | OnnxRunner,
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    ignore_padding: bool = True,
) -> OnnxCheck:
    """Run the exported file with onnxruntime and ``model`` with PyTorch on ``inputs`` and compare the outputs.

    Args:
        path: The ``.onnx`` file (or an :class:`OnnxRunner` already open on it).
        model: The PyTorch model that was exported.
        inputs: The same kind of inputs as the export's example (any batch size and sequence length).
        atol: Absolute tolerance. float32 graphs differ by operator fusion and summation order only.
        rtol: Relative tolerance.
        ignore_padding: Compare per-token outputs only where ``attention_mask`` is 1. A left-padded position of
            a causal decoder attends to no key at all; its output is undefined and differs between PyTorch's and
            onnxruntime's attention (by ~0.3 in the logits of the tiny test LLaMA, while every real token agrees
            to 1e-7), and no generated token is read from it.

    Raises:
        ImportError: ``onnxruntime`` is missing (``pip install hf_ispasp[onnx]``).
    """
    runner = path if isinstance(path, OnnxRunner) else OnnxRunner(path)
    named = _as_named(inputs)
    wrapper = _Exportable(model, list(named), None, _extra_kwargs(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = _named_outputs(wrapper.raw(*named.values()))
    finally:
        model.train(was_training)
    feeds = {runner.input_names[0]: named[""]} if list(named) == [""] else named
    got = dict(zip(runner.output_names, runner(**feeds), strict=True))
    mask = named.get("attention_mask")
    mask = mask.detach().cpu().bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    diffs, shapes, ok = {}, {}, True
    for name, value in got.items():
        reference = expected.get(name)
        shapes[name] = tuple(value.shape)
        if reference is None or tuple(reference.shape) != tuple(value.shape):
            diffs[name], ok = math.inf, False
            continue
        reference = reference.detach().float().cpu()
        actual = torch.from_numpy(np.asarray(value, dtype=np.float32))
        if ignore_padding and mask is not None and tuple(actual.shape[:2]) == tuple(mask.shape):
            actual, reference = actual[mask], reference[mask]
        diffs[name] = float((actual - reference).abs().max()) if reference.numel() else 0.0
        ok = ok and bool(torch.allclose(actual, reference, atol=atol, rtol=rtol))
    return OnnxCheck(max(diffs.values(), default=0.0), ok and bool(got), atol, rtol, diffs, shapes)
