"""Backbone specs, weights sources and the real CIFAR checkpoints in ../shared/weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from service.engine import BackboneError, BackboneSpec, create_backbone
from service.engine.backbones import load_checkpoint_state


def test_cifar_resnets_are_timm_models_with_their_config() -> None:
    for depth, params in ((20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)):
        model = timm.create_model(f"resnet{depth}_cifar")
        assert sum(p.numel() for p in model.parameters()) == params
        assert model.pretrained_cfg["input_size"] == (3, 32, 32)
        assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    spec = BackboneSpec("resnet56_cifar").resolved()
    assert spec.input_size == (32, 32) and spec.std == (0.229, 0.224, 0.225)


def test_spec_round_trip_and_hash() -> None:
    spec = BackboneSpec("test_vit", model_kwargs={"img_size": 64})
    resolved = spec.resolved()
    assert resolved.input_size == (64, 64)
    assert BackboneSpec.from_dict(resolved.to_dict()) == resolved
    assert spec.spec_hash() == resolved.spec_hash()
    assert spec.spec_hash() != BackboneSpec("test_vit", model_kwargs={"img_size": 32}).spec_hash()


@pytest.mark.parametrize(
    "spec",
    [
        BackboneSpec("no_such_model_xyz"),
        BackboneSpec("resnet20_cifar", weights="file:///nonexistent/weights.th"),
        BackboneSpec("test_resnet", model_kwargs={"not_a_kwarg": 3}),
    ],
)
def test_bad_specs_raise_backbone_errors(spec: BackboneSpec) -> None:
    with pytest.raises(BackboneError):
        create_backbone(spec)


def test_bad_weights_source_is_rejected() -> None:
    with pytest.raises(BackboneError) as info:
        BackboneSpec("test_resnet", weights="s3://bucket/w.th")
    assert info.value.param == "weights"


def test_mismatched_checkpoint_is_rejected(weights_dir: Path) -> None:
    uri = (weights_dir / "resnet56-4bfd9763.th").as_uri()
    with pytest.raises(BackboneError, match="do not"):
        create_backbone(BackboneSpec("resnet20_cifar", weights=uri))


def test_checkpoint_keys_are_cleaned_and_safetensors_load(weights_dir: Path, tmp_path: Path) -> None:
    state = load_checkpoint_state(weights_dir / "resnet20-12fca82f.th")
    assert "conv1.weight" in state and not any(k.startswith("module.") for k in state)
    # Re-save under a DataParallel prefix as safetensors: the same backbone comes back.
    from safetensors.torch import save_file

    path = tmp_path / "r20.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    a = create_backbone(
        BackboneSpec("resnet20_cifar", weights=(weights_dir / "resnet20-12fca82f.th").as_uri())
    )
    b = create_backbone(BackboneSpec("resnet20_cifar", weights=path.as_uri()))
    assert a.parameter_fingerprint() == b.parameter_fingerprint()
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training


def test_cifar_vit_loads_strictly(weights_dir: Path) -> None:
    uri = (weights_dir / "vit_cifar10_p4_d128_l6.safetensors").as_uri()
    backbone = create_backbone(BackboneSpec("vit_cifar10_p4_d128_l6", weights=uri))
    assert backbone.family == "vit" and backbone.layers[1].shape == (65, 128)


@pytest.mark.slow
def test_resnet20_reproduces_its_cifar10_accuracy(resnet20_uri: str, data_dir: Path) -> None:
    """README of ../shared/weights: 81.03 % on the JPEG CIFAR-10 test set."""
    backbone = create_backbone(BackboneSpec("resnet20_cifar", weights=resnet20_uri))
    data = np.load(data_dir / "cifar10_jpeg.npz")
    mean = torch.tensor(backbone.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.spec.std).view(1, 3, 1, 1)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data["y_test"]), 2000):
            x = torch.from_numpy(data["x_test"][start : start + 2000]).permute(0, 3, 1, 2).float() / 255
            logits = backbone.model((x - mean) / std)
            correct += int((logits.argmax(1).numpy() == data["y_test"][start : start + 2000]).sum())
    assert correct / len(data["y_test"]) == pytest.approx(0.8103, abs=0.0005)


def test_random_weights_are_the_same_in_every_process() -> None:
    """A gateway must serve the network a worker trained, so `random` is seeded from the spec."""
    a = create_backbone(BackboneSpec("test_resnet"))
    torch.manual_seed(12345)
    b = create_backbone(BackboneSpec("test_resnet"))
    assert a.parameter_fingerprint() == b.parameter_fingerprint()
    assert (
        a.parameter_fingerprint()
        != create_backbone(BackboneSpec("test_resnet", input_size=(64, 64))).parameter_fingerprint()
    )


def test_naming_a_backbone_does_not_load_torch() -> None:
    """The use cases and the gateway's routes hold specs; only resolving one (timm) may pull torch in."""
    code = (
        "import sys\n"
        "import service.domain.backbones, service.api.routes.backbones\n"
        "from service.engine import BackboneSpec\n"
        "spec = BackboneSpec.from_dict(BackboneSpec('resnet20_cifar', input_size=(32, 32)).to_dict())\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch loaded'\n"
        "spec.resolved()\n"
        "assert 'timm' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
