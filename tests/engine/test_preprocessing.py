"""Images reach a backbone through timm's own eval pipeline when timm has a pretrained data config for it
(resize the shorter side, centre-crop, the config's interpolation), the CIFAR backbones keep their
whole-image resize, every artifact records its pipeline, and serving uses the recorded one."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from service.engine import Backbone, BackboneSpec, create_backbone, preprocess
from service.engine.artifacts import PromptArtifact
from service.engine.methods import ActivationConfig, create_method
from service.engine.mixed_batch import predict_single
from service.engine.preprocessing import Preprocessing, preprocessing_for
from service.launch.front import EnginePredictor
from service.serving.cache import MemorySource
from service.serving.core import EngineCore


@pytest.fixture(scope="module")
def timm_spec(tmp_path_factory: pytest.TempPathFactory) -> BackboneSpec:
    """timm's tiny `test_resnet` with a checkpoint file (pretrained weights, as far as the spec can tell)."""
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return BackboneSpec("test_resnet", weights=path.as_uri(), input_size=(48, 48))


@pytest.fixture(scope="module")
def timm_backbone(timm_spec: BackboneSpec) -> Backbone:
    return create_backbone(timm_spec)


def _images(seed: int) -> list[np.ndarray]:
    """Uint8 images of other aspect ratios than the input (where a squash and a crop differ)."""
    rng = np.random.default_rng(seed)
    shapes = [(40, 96, 3), (120, 50, 3), (64, 64, 1), (33, 70, 4)]
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]


def test_pretrained_backbones_use_timms_eval_pipeline(timm_backbone: Backbone) -> None:
    config = resolve_data_config({"input_size": (3, 48, 48)}, model=timm_backbone.model)
    reference = create_transform(**config, is_training=False)
    images = _images(0)
    expected = torch.stack(
        [reference(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("RGB")) for im in images]
    )
    got = timm_backbone.preprocessing(images)
    assert got.shape == (4, 3, 48, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    squashed = preprocess(images, (48, 48), config["mean"], config["std"])  # the whole image, squashed
    assert (got - squashed).abs().amax() > 0.1


def test_cifar_and_random_backbones_keep_the_whole_image_resize(resnet20_uri: str) -> None:
    p = preprocessing_for(BackboneSpec("resnet20_cifar", weights=resnet20_uri))
    assert p.pipeline == "resize" and p.input_size == (32, 32)
    assert preprocessing_for(BackboneSpec("test_resnet", weights="random")).pipeline == "resize"
    images = _images(1)
    torch.testing.assert_close(p(images), preprocess(images, (32, 32), p.mean, p.std), atol=0, rtol=0)


def _artifact(bb: Backbone, seed: int) -> PromptArtifact:
    module = create_method("activation", bb, ActivationConfig(3, (bb.recommended_layer,)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return PromptArtifact.from_module(module, classes=["a", "b", "c"])


def test_the_artifact_records_its_pipeline_and_serving_uses_it(
    timm_spec: BackboneSpec, timm_backbone: Backbone
) -> None:
    current = _artifact(timm_backbone, 0)
    assert current.preprocessing(timm_backbone) == timm_backbone.preprocessing
    roundtrip = PromptArtifact.from_bytes(current.to_bytes())
    assert roundtrip.metadata["preprocessing"]["pipeline"] == "timm_eval"
    assert roundtrip.preprocessing(timm_backbone) == timm_backbone.preprocessing
    # an artifact whose record predates the pipeline field was trained with the whole-image resize
    older = PromptArtifact(
        current.tensors,
        {**current.metadata, "preprocessing": {"input_size": [48, 48], "mean": [0.5] * 3, "std": [0.5] * 3}},
    )
    assert older.preprocessing(timm_backbone) == Preprocessing((48, 48), (0.5,) * 3, (0.5,) * 3, "resize")

    images = _images(2)
    source = MemorySource({"new": current.to_bytes(), "old": older.to_bytes()})

    async def serve() -> dict[str, torch.Tensor]:
        pred = EnginePredictor(EngineCore(source))  # the front's path: each key's pipeline
        try:
            answers = await pred.predict_images(timm_spec, ["new", "old"], images)
            return {a.key: a.probabilities for a in answers}
        finally:
            await pred.aclose()

    served = asyncio.run(serve())
    with torch.inference_mode():
        for key, art in (("new", current), ("old", older)):
            expected = torch.softmax(
                predict_single(timm_backbone, art, art.preprocessing(timm_backbone)(images)), 1
            )
            torch.testing.assert_close(served[key], expected, atol=1e-5, rtol=0)
    assert (served["new"] - served["old"]).abs().amax() > 1e-4  # the two pipelines really differ here
