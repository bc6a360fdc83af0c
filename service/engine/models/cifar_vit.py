"""The small CIFAR-10 ViT (patch 4, width 128, depth 6) as a registered timm VisionTransformer.

Its weights (../shared/weights/vit_cifar10_p4_d128_l6.safetensors) load with strict=True; the
registration gives it the 32x32 / ImageNet-mean config so a spec needs only name and weights.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from service.engine.models.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD

default_cfgs = generate_default_cfgs(
    {
        "vit_cifar10_p4_d128_l6": {
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
    }
)


@register_model
def vit_cifar10_p4_d128_l6(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT with 4x4 patches, width 128, 6 blocks, 4 heads, on 32x32 images (65 tokens)."""
    args: dict[str, Any] = dict(
        img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, num_classes=10
    )
    args.update(kwargs)
    model: VisionTransformer = build_model_with_cfg(
        VisionTransformer,
        "vit_cifar10_p4_d128_l6",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **args,
    )
    return model
