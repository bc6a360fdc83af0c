"""Our layer catalog against timm's own `forward_intermediates`: where timm names a cut point (its
`feature_info` modules: stage ends, ViT blocks), the staged run stopped at the matching catalog layer gives
the same activation. The catalog is ours (finer: every block); this checks that its cuts agree with timm's
wherever the two meet, so a timm change in how a family runs would show here."""

from __future__ import annotations

import pytest
import torch

from service.engine import BackboneSpec, create_backbone, list_layers
from service.engine.backbones import Backbone

#: Random-init models of each family whose timm class offers `forward_intermediates`.
SPECS = {
    "test_resnet": BackboneSpec("test_resnet", input_size=(64, 64)),
    "resnet18": BackboneSpec("resnet18", input_size=(64, 64)),
    "test_convnext": BackboneSpec("test_convnext", input_size=(64, 64)),
    "test_efficientnet": BackboneSpec("test_efficientnet", input_size=(64, 64)),
    "mobilenetv3_small_050": BackboneSpec("mobilenetv3_small_050", input_size=(64, 64)),
    "test_vit": BackboneSpec("test_vit", model_kwargs={"img_size": 64}),
}


def _matching_layers(backbone: Backbone) -> list[tuple[int, int]]:
    """(timm feature index, catalog index) for each timm cut point the catalog has: the catalog layer
    named like timm's module, or the last one inside it (a stage's last block is the stage's output).
    A timm cut inside one of our segments (ResNet's `act1`, before the max pool) has no match."""
    names = [layer.name for layer in list_layers(backbone)]
    pairs = []
    for feature, info in enumerate(backbone.model.feature_info):
        module = info["module"]
        inside = [i for i, name in enumerate(names) if name == module or name.startswith(module + ".")]
        if inside:
            pairs.append((feature, inside[-1]))
    return pairs


@pytest.mark.parametrize("model", sorted(SPECS))
def test_catalog_cuts_agree_with_timm_intermediates(model: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(SPECS[model])
    pairs = _matching_layers(backbone)
    assert len(pairs) >= len(backbone.model.feature_info) - 1, pairs  # at most the stem cut is ours alone
    x = torch.randn(2, 3, *backbone.input_size)
    vit = backbone.family == "vit"
    with torch.no_grad():
        theirs = backbone.model.forward_intermediates(
            x,
            indices=[f for f, _ in pairs],
            intermediates_only=True,
            **({"output_fmt": "NLC"} if vit else {}),
        )
        for (feature, index), expected in zip(pairs, theirs, strict=True):
            ours = backbone.run(x, 0, index)
            if vit:  # timm gives the patch tokens only; ours carry the class token in front
                ours = ours[:, backbone.model.num_prefix_tokens :]
            assert ours.shape == expected.shape, (feature, index)
            torch.testing.assert_close(
                ours, expected, rtol=1e-5, atol=1e-5, msg=f"timm {feature} ~ layer {index}"
            )
