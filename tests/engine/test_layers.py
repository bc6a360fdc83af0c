"""The layer catalog and the staged run, over every supported family of tiny random timm models."""

from __future__ import annotations

import pytest
import torch

from service.engine import BackboneSpec, LayerError, create_backbone, list_layers, resolve_prompt_layers
from service.engine.backbones import Backbone

FAMILIES = {
    "test_resnet": "cnn",
    "test_convnext": "cnn",
    "test_efficientnet": "cnn",
    "test_vit": "vit",
    "resnet20_cifar": "cnn",
    "vit_cifar10_p4_d128_l6": "vit",
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def backbone(request: pytest.FixtureRequest) -> Backbone:
    kwargs = {"img_size": 64} if request.param == "test_vit" else {}
    size = None if request.param.endswith(("_cifar", "_l6")) or kwargs else (64, 64)
    return create_backbone(BackboneSpec(request.param, model_kwargs=kwargs, input_size=size))


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
