"""The layer catalog and the staged run, over every supported family of tiny random timm models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from service.engine import BackboneSpec, LayerError, create_backbone, list_layers, resolve_prompt_layers
from service.engine.backbones import Backbone
from tests.conftest import WEIGHTS_DIR

FAMILIES = {
    "test_resnet": "cnn",
    "test_convnext": "cnn",
    "test_efficientnet": "cnn",
    "test_vit": "vit",
    "resnet20_cifar": "cnn",
    "vit_cifar10_p4_d128_l6": "vit",
    "mobilenetv2_100": "cnn",
    "mobilenetv3_small_050": "cnn",  # listed as supported (EfficientNet/MobileNet family): random weights
}

#: The real ImageNet MobileNetV2 at 224 px: `file://` weights plus the model kwargs its README names
#: (TF "same" padding, the 1001-way classifier it was exported with) and its own mean / std.
MOBILENETV2 = BackboneSpec(
    "mobilenetv2_100",
    weights=(WEIGHTS_DIR / "mobilenetv2_100_tflite_dequant.safetensors").as_uri(),
    model_kwargs={"pad_type": "same", "num_classes": 1001},
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)


def _spec(model: str) -> BackboneSpec:
    if model == "mobilenetv2_100":
        return MOBILENETV2
    kwargs = {"img_size": 64} if model == "test_vit" else {}
    size = None if model.endswith(("_cifar", "_l6")) or kwargs else (64, 64)
    return BackboneSpec(model, model_kwargs=kwargs, input_size=size)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def backbone(request: pytest.FixtureRequest) -> Backbone:
    return create_backbone(_spec(request.param))


def test_catalog_shape_and_order(backbone: Backbone) -> None:
    layers = list_layers(backbone)
    assert [layer.index for layer in layers] == list(range(len(layers)))
    assert layers[0].name == "input" and layers[0].kind == "input"
    assert layers[0].shape == (3, *backbone.input_size)
    assert layers[1].kind == "stem"
    assert all(layer.kind == "block" for layer in layers[2:])
    assert len(layers) >= 4
    assert sum(layer.recommended for layer in layers) == 1
    assert all(layer.family == FAMILIES[backbone.spec.model] for layer in layers)
    modules = dict(backbone.model.named_modules())
    for layer in layers[1:]:
        assert layer.name in modules, f"{layer.name} is not a module path"
        assert layer.full_params == torch.Size(layer.shape).numel()


def test_recommended_layer_follows_the_family_prior(backbone: Backbone) -> None:
    blocks = [layer.index for layer in backbone.layers if layer.kind == "block"]
    position = blocks.index(backbone.recommended_layer) / len(blocks)
    if backbone.family == "cnn":
        assert position >= 0.5, "CNNs default to a late block"
    else:
        assert position < 0.5, "ViTs default to an early block"


def test_staged_run_equals_the_plain_model(backbone: Backbone) -> None:
    x = torch.randn(2, 3, *backbone.input_size)
    expected = backbone.model.forward_head(backbone.model.forward_features(x), pre_logits=True)
    assert torch.allclose(backbone.forward_features(x), expected, atol=1e-5)
    # Splitting the run at any layer gives the same features, and each activation has its shape.
    for layer in backbone.layers:
        h = backbone.run(x, 0, layer.index)
        assert tuple(h.shape[1:]) == layer.shape
        assert torch.allclose(backbone.run(h, layer.index, backbone.pooled_index), expected, atol=1e-5)


def test_layer_fn_sees_every_layer_and_changes_the_output(backbone: Backbone) -> None:
    x = torch.randn(2, 3, *backbone.input_size)
    seen: list[int] = []

    def record(index: int, h: torch.Tensor) -> torch.Tensor:
        seen.append(index)
        return h + 1.0 if index == backbone.recommended_layer else h

    out = backbone.run(x, 0, backbone.pooled_index, layer_fn=record)
    assert seen == list(range(1, backbone.pooled_index))
    assert not torch.allclose(out, backbone.forward_features(x))


def test_norm_fn_reaches_every_norm_layer(backbone: Backbone) -> None:
    x = torch.randn(2, 3, *backbone.input_size)
    names: list[str] = []

    def identity(name: str, y: torch.Tensor) -> torch.Tensor:
        names.append(name)
        return y

    same = backbone.run(x, 0, backbone.pooled_index, norm_fn=identity)
    assert sorted(set(names)) == sorted(n.name for n in backbone.norm_layers)
    assert torch.allclose(same, backbone.forward_features(x), atol=1e-6)
    for norm in backbone.norm_layers:
        assert 1 <= norm.layer_index <= backbone.pooled_index


def test_resolve_prompt_layers(backbone: Backbone) -> None:
    layers = backbone.layers
    name = layers[2].name
    assert resolve_prompt_layers(layers, 2) == (2,)
    assert resolve_prompt_layers(layers, name) == (2,)
    assert resolve_prompt_layers(layers, "2") == (2,)
    assert resolve_prompt_layers(layers, [3, name, 3]) == (2, 3)
    assert resolve_prompt_layers(layers, "all") == tuple(x.index for x in layers if x.kind == "block")
    for bad in (len(layers), -1, "no.such.layer", [], True, "auto"):
        with pytest.raises(LayerError) as info:
            resolve_prompt_layers(layers, bad)  # type: ignore[arg-type]
        assert info.value.param == "prompt_layer"


def test_mobilenetv2_file_weights_are_the_imagenet_network() -> None:
    """The dequantised TFLite weights load into timm's layout and classify like an ImageNet model.

    With the wrong padding (timm's default symmetric one) the same state dict loads but its features
    drift; the catalog must see the real 224-px network: 1280 pooled features, 17 blocks, 7x7 at the end.
    """
    bb = create_backbone(MOBILENETV2)
    assert bb.input_size == (224, 224) and bb.num_features == 1280
    assert bb.layers[-1].shape == (320, 7, 7)
    assert sum(layer.kind == "block" for layer in bb.layers) == 17
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    same_padding = bb.forward_features(x)
    plain = create_backbone(replace(MOBILENETV2, model_kwargs={"num_classes": 1001}))
    assert not torch.allclose(same_padding, plain.forward_features(x), atol=1e-3)
