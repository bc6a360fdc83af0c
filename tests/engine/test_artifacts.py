"""Artifacts: round trip, size, metadata, and clear rejection of corrupt bytes and foreign backbones."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from service.engine import ArtifactError, Backbone, BackboneSpec, create_backbone
from service.engine.artifacts import FORMAT_VERSION, PromptArtifact, load_module
from service.engine.methods import ActivationConfig
from service.engine.mixed_batch import predict_single
from service.engine.train import TrainConfig, fit

CLASSES = ["cat", "dog", "emu"]


@pytest.fixture(scope="module")
def bb() -> Backbone:
    return create_backbone(BackboneSpec("test_resnet", input_size=(32, 32)))


@pytest.fixture(scope="module")
def artifact(bb: Backbone) -> PromptArtifact:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 32, 32, generator=gen), torch.arange(24) % 3
    cfg = ActivationConfig(3, (3, 4), prompt_shape="channel")
    return fit(
        bb, "activation", cfg, (x, y), None, (x, y), TrainConfig(epochs=1, batch_size=8), classes=CLASSES
    ).artifact


def test_round_trip_keeps_tensors_metadata_and_predictions(bb: Backbone, artifact: PromptArtifact) -> None:
    data = artifact.to_bytes()
    again = PromptArtifact.from_bytes(data, expected_sha256=artifact.sha256)
    assert again.sha256 == artifact.sha256 and again.to_bytes() == data
    assert again.metadata == artifact.metadata
    assert again.tensors.keys() == artifact.tensors.keys()
    for k, v in artifact.tensors.items():
        assert torch.equal(v, again.tensors[k])
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(predict_single(bb, again, x), predict_single(bb, artifact, x), rtol=0, atol=0)


def test_metadata_describes_the_prompt(bb: Backbone, artifact: PromptArtifact) -> None:
    m = artifact.metadata
    assert m["format_version"] == FORMAT_VERSION
    assert m["backbone"] == bb.spec.to_dict() and m["spec_hash"] == bb.spec.spec_hash()
    assert m["method"] == "activation" and m["prompt_shape"] == "channel"
    assert m["prompt_layers"] == [3, 4]
    assert m["prompt_layer_names"] == [bb.layers[3].name, bb.layers[4].name]
    assert m["classes"] == CLASSES and artifact.num_classes == 3
    assert m["preprocessing"] == bb.preprocessing.to_dict()
    assert m["preprocessing"]["input_size"] == [32, 32] and m["preprocessing"]["mean"] == list(bb.spec.mean)
    assert set(m["metrics"]) == {"train_seconds", "test"}  # the small summary, no per-class tables
    assert m["metrics"]["test"]["n"] == 24 and m["metrics"]["test"]["top5"] >= m["metrics"]["test"]["top1"]
    assert m["created_at"]
    assert len(artifact.to_bytes()) < 16_000  # kilobytes, the backbone is referenced not copied


def test_load_module_rebuilds_the_trained_prompt(bb: Backbone, artifact: PromptArtifact) -> None:
    module = load_module(artifact, bb)
    assert module.prompt_layers == (3, 4)
    assert torch.equal(module.deltas["3"].detach(), artifact.tensors["delta.3"])


def test_a_different_backbone_is_rejected(artifact: PromptArtifact) -> None:
    for spec in (
        BackboneSpec("test_resnet", input_size=(48, 48)),
        BackboneSpec("test_convnext", input_size=(32, 32)),
    ):
        with pytest.raises(ArtifactError, match="trained on backbone 'test_resnet'") as info:
            artifact.check_backbone(create_backbone(spec))
        assert info.value.code == "invalid_artifact"


def _header_with(metadata: dict) -> bytes:
    return st_save({"head.weight": torch.zeros(1, 1)}, metadata={"actprompt": json.dumps(metadata)})


def test_corrupt_bytes_are_rejected_with_a_clear_error(artifact: PromptArtifact) -> None:
    data = artifact.to_bytes()
    flipped = bytearray(data)
    flipped[8] ^= 0xFF  # the header's opening brace: no longer JSON
    (n,) = struct.unpack("<Q", data[:8])
    too_long = struct.pack("<Q", n + 10_000) + data[8:]  # a header length past the end
    cases = {
        "empty": b"",
        "garbage": b"not a safetensors file at all",
        "truncated": data[: len(data) // 2],
        "flipped header": bytes(flipped),
        "bad header length": too_long,
        "plain safetensors": st_save({"x": torch.zeros(2)}),
        "future version": _header_with({**artifact.metadata, "format_version": FORMAT_VERSION + 1}),
        "missing keys": _header_with({"format_version": FORMAT_VERSION}),
    }
    corrupt = "not a readable safetensors file"
    expected = {
        "empty": corrupt,
        "garbage": corrupt,
        "truncated": corrupt,
        "flipped header": corrupt,
        "bad header length": corrupt,
        "plain safetensors": "no actprompt metadata",
        "future version": f"format version {FORMAT_VERSION + 1} is not supported",
        "missing keys": "metadata lacks backbone",
    }
    for label, blob in cases.items():
        with pytest.raises(ArtifactError) as info:
            PromptArtifact.from_bytes(blob)
        assert info.value.code == "invalid_artifact" and info.value.param == "artifact", label
        assert expected[label] in str(info.value), (label, str(info.value))
    with pytest.raises(ArtifactError, match="sha256"):
        PromptArtifact.from_bytes(data, expected_sha256="0" * 64)


def test_tensors_that_do_not_fit_the_method_are_rejected(bb: Backbone, artifact: PromptArtifact) -> None:
    tensors = dict(artifact.tensors)
    tensors["delta.3"] = torch.zeros(7)
    with pytest.raises(ArtifactError, match=r"delta\.3"):
        load_module(PromptArtifact(tensors, artifact.metadata), bb)
    del tensors["delta.3"]
    with pytest.raises(ArtifactError, match=r"lacks tensor 'delta\.3'"):
        load_module(PromptArtifact(tensors, artifact.metadata), bb)
