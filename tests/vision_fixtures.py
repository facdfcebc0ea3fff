"""Tiny random vision models, one per registered vision adapter key (used by the registry-wide test too).

Batch-norm statistics and ConvNeXt layer scales are randomised so that every block contributes to the output
(timm initialises running stats to 0/1 and ConvNeXt's layer scale to 1e-6, which would hide slicing bugs).
Widths are odd where the constructors allow it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

IMAGE_SIZE = 32


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
            gamma = getattr(module, "gamma", None)
            if isinstance(gamma, nn.Parameter):
                gamma.copy_(0.5 + torch.rand(gamma.shape, generator=generator))
    return model.eval()


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from hf_ispasp.timm_format import create_timm_model

        torch.manual_seed(0)
        return _randomize(create_timm_model(name, pretrained=False, num_classes=3, input_size=IMAGE_SIZE, **kwargs))

    return build


def tiny_transformers_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=37, num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def tiny_vision_models() -> dict[str, Callable[[], nn.Module]]:
    """Registry key -> constructor of a tiny random model (timm keys only when timm is installed)."""
    models: dict[str, Callable[[], nn.Module]] = {"vit": tiny_transformers_vit}
    try:
        import timm  # noqa: F401
    except ImportError:
        return models
    models.update({
        "EfficientNet": _timm("tinynet_e"),  # inverted residuals with squeeze-excitation
        "MobileNetV3": _timm("mobilenetv3_small_050"),  # SE with hard-sigmoid gates
        "ResNet": _timm("resnet10t", channels=(8, 12, 16, 20)),  # BasicBlock
        "ConvNeXt": _timm("convnext_atto", dims=(8, 16, 24, 32), depths=(1, 1, 2, 1)),
        "VisionTransformer": _timm(
            "vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8, embed_dim=36, depth=2, num_heads=3,
            mlp_ratio=37 / 36,
        ),
    })
    return models


def extra_timm_models() -> dict[str, Callable[[], nn.Module]]:
    """Further variants covered by the vision tests (not one per registry key)."""
    return {
        "resnet26-bottleneck": _timm("resnet26", channels=(4, 8, 12, 16)),
        "mobilenetv2_035": _timm("mobilenetv2_035"),
        "tf_efficientnet_lite0": _timm("tf_efficientnet_lite0"),  # "same" padding convs, ReLU6, no SE
    }
