"""Per-method configs (PEFT style): one tagged class per method, foreign options refused, dicts round-trip."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch

from service.engine import (
    ActivationConfig,
    Backbone,
    BackboneSpec,
    DeepActivationNormConfig,
    EngineError,
    FullConfig,
    InputPromptConfig,
    LinearConfig,
    LoRAConfig,
    MethodConfig,
    MethodError,
    NormConfig,
    PromptArtifact,
    PromptModule,
    create_backbone,
    create_method,
    get_config_class,
    list_methods,
    load_module,
    register_method,
)
from service.engine.methods.linear import LinearProbe

#: The expected config class of every registered method (a new method must be added here).
CLASSES: dict[str, type[MethodConfig]] = {
    "activation": ActivationConfig,
    "input": InputPromptConfig,
    "linear": LinearConfig,
    "norm": NormConfig,
    "full": FullConfig,
    "deep_activation_norm": DeepActivationNormConfig,
    "lora": LoRAConfig,
}
#: A value other than the default for every option of every method.
OTHER_VALUE: dict[str, Any] = {
    "prompt_layers": (1, 3),
    "prompt_shape": "channel",
    "input_variant": "additive",
    "pad_size": 3,
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "target_modules": ("layer1.0.conv1", "layer2.0.conv2"),
}
#: What the single MethodConfig wrote before configs had a type tag: every option of every method.
LEGACY_DEFAULTS: dict[str, Any] = {
    "prompt_layers": [],
    "prompt_shape": "full",
    "input_variant": "pad",
    "pad_size": None,
    "lora_rank": 4,
    "lora_alpha": None,  # options added after the tag: their defaults stand in
    "target_modules": None,
}


def _all_options() -> set[str]:
    return {name for cls in CLASSES.values() for name in cls.options()}


def _configured(method: str) -> MethodConfig:
    """The method's config with every option it takes set away from its default."""
    cls = get_config_class(method)
    return cls(num_classes=5, **{k: OTHER_VALUE[k] for k in cls.options()})


def test_every_registered_method_has_its_own_tagged_config_class() -> None:
    assert sorted(list_methods()) == sorted(CLASSES)
    assert _all_options() == set(OTHER_VALUE) == set(LEGACY_DEFAULTS)
    for method in list_methods():
        cls = get_config_class(method)
        assert cls is CLASSES[method] and cls.method == method
    assert ActivationConfig.options() == ("prompt_layers", "prompt_shape")
    assert InputPromptConfig.options() == ("input_variant", "pad_size")
    assert LoRAConfig.options() == ("lora_rank", "lora_alpha", "target_modules")
    assert LinearConfig.options() == NormConfig.options() == FullConfig.options() == ()


def test_a_method_without_its_own_config_class_cannot_be_registered() -> None:
    class NoConfig(PromptModule):
        pass

    with pytest.raises(ValueError, match="own config class"):
        register_method("no_config")(NoConfig)

    class Borrowed(LinearProbe):  # inherits LinearConfig, tagged "linear"
        config_class: ClassVar[type[MethodConfig]] = LinearConfig

    with pytest.raises(ValueError, match="tagged 'linear'"):
        register_method("borrowed")(Borrowed)
    assert "no_config" not in list_methods() and "borrowed" not in list_methods()


def test_the_base_class_is_not_a_config() -> None:
    with pytest.raises(MethodError, match="base class"):
        MethodConfig(3)


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_options_a_method_does_not_take_are_refused(method: str) -> None:
    cls = get_config_class(method)
    foreign = sorted(_all_options() - set(cls.options()))
    for key in foreign:
        with pytest.raises(EngineError) as info:
            MethodConfig.for_method(method, num_classes=2, **{key: OTHER_VALUE[key]})
        if key == "prompt_layers":
            assert (info.value.code, info.value.param) == ("invalid_prompt_layer", "prompt_layer")
        else:
            assert (info.value.code, info.value.param) == ("option_not_applicable", key)
        with pytest.raises(TypeError):  # the class has no such field at all
            cls(2, **{key: OTHER_VALUE[key]})
        # callers passing every option uniformly: the default (or nothing) of another's option is dropped
        lenient = MethodConfig.for_method(method, num_classes=2, **{key: LEGACY_DEFAULTS[key]})
        assert type(lenient) is cls and key not in lenient.to_dict()
    with pytest.raises(EngineError) as info:
        MethodConfig.for_method(method, num_classes=2, prompt_layer_count=2)
    assert (info.value.code, info.value.param) == ("invalid_method_option", "prompt_layer_count")
    own = {k: OTHER_VALUE[k] for k in cls.options()}
    assert MethodConfig.for_method(method, num_classes=2, **own) == cls(2, **own)


def test_each_config_validates_its_own_fields() -> None:
    with pytest.raises(MethodError, match="num_classes"):
        NormConfig(0)
    with pytest.raises(MethodError, match="prompt_shape"):
        ActivationConfig(2, (1,), prompt_shape="diagonal")
    with pytest.raises(MethodError, match="prompt_shape"):
        DeepActivationNormConfig(2, prompt_shape="diagonal")
    with pytest.raises(MethodError, match="input_variant"):
        InputPromptConfig(2, input_variant="crop")
    with pytest.raises(MethodError, match="pad_size"):
        InputPromptConfig(2, pad_size=0)
    with pytest.raises(MethodError, match="lora_rank"):
        LoRAConfig(2, lora_rank=0)
    with pytest.raises(MethodError, match="lora_alpha"):
        LoRAConfig(2, lora_alpha=0)
    with pytest.raises(MethodError, match="target_modules"):
        LoRAConfig(2, target_modules="layer1.0.conv1")  # type: ignore[arg-type]
    assert LoRAConfig(2, lora_rank=4, lora_alpha=8).scale == 2.0
    assert LoRAConfig(2, lora_rank=4).scale == 1.0
    assert ActivationConfig(2, [4, 2]).prompt_layers == (4, 2)  # type: ignore[arg-type]
    assert LinearConfig(2).prompt_layers == ()  # methods without prompt layers read as ()


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_to_dict_from_dict_round_trips_with_the_tag(method: str) -> None:
    cfg = _configured(method)
    d = json.loads(json.dumps(cfg.to_dict()))  # as stored in an artifact or a checkpoint
    assert d["method"] == method
    assert set(d) == {"method", "num_classes", *cfg.options()}
    for again in (
        MethodConfig.from_dict(d),
        MethodConfig.from_dict(d, method=method),
        type(cfg).from_dict(d),
    ):
        assert again == cfg and type(again) is type(cfg)
    other = "norm" if method != "norm" else "linear"
    with pytest.raises(MethodError, match="tagged"):
        MethodConfig.from_dict(d, method=other)
    with pytest.raises(MethodError, match="takes no option"):
        MethodConfig.from_dict({**d, "surprise": 1})


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_a_dict_written_before_the_tag_still_loads_given_its_method(method: str) -> None:
    cfg = _configured(method)
    legacy = {"num_classes": 5, **LEGACY_DEFAULTS}
    legacy.update({k: v for k, v in cfg.to_dict().items() if k != "method"})
    assert MethodConfig.from_dict(legacy, method=method) == cfg
    with pytest.raises(MethodError, match="no method tag"):
        MethodConfig.from_dict(legacy)


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))


def test_create_method_refuses_another_methods_config(bb: Backbone) -> None:
    with pytest.raises(MethodError, match="takes a LinearConfig, got a NormConfig"):
        create_method("linear", bb, NormConfig(2))
    with pytest.raises(MethodError, match="takes a ActivationConfig, got a DeepActivationNormConfig"):
        create_method("activation", bb, DeepActivationNormConfig(2, (1,)))
    with pytest.raises(MethodError, match="takes a DeepActivationNormConfig, got a ActivationConfig"):
        create_method("deep_activation_norm", bb, ActivationConfig(2, (1,)))


def test_an_artifact_stored_before_the_tag_still_loads(bb: Backbone) -> None:
    module = create_method("input", bb, InputPromptConfig(3, pad_size=3))
    with torch.no_grad():
        module.prompt.normal_()
    art = PromptArtifact.from_module(module, classes=["a", "b", "c"])
    assert art.metadata["method_config"] == {
        "method": "input",
        "num_classes": 3,
        "input_variant": "pad",
        "pad_size": 3,
    }
    legacy_meta = {**art.metadata, "method_config": {**LEGACY_DEFAULTS, "num_classes": 3, "pad_size": 3}}
    old = PromptArtifact.from_bytes(PromptArtifact(art.tensors, legacy_meta).to_bytes())
    assert old.method_config == InputPromptConfig(3, pad_size=3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_module(old, bb)(x), module.eval()(x), rtol=0, atol=0)
    assert load_module(old, bb).pad_size == 3  # type: ignore[attr-defined]
    # a config of another method under the artifact's method is refused, not misread
    foreign = PromptArtifact({}, {**art.metadata, "method_config": NormConfig(3).to_dict()})
    with pytest.raises(EngineError, match="invalid method_config"):
        _ = foreign.method_config
