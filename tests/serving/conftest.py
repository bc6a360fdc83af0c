"""Fixtures of the serving tests: the real ResNet-20, random (untrained) artifacts, an in-memory source."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.synthetic import random_artifact
from service.engine import Backbone, BackboneSpec, create_backbone
from service.engine.artifacts import PromptArtifact
from tests.serving.gateway import make_gateway  # noqa: F401 (a fixture, shared by the HTTP tests)


@pytest.fixture(scope="session")
def resnet20_spec(resnet20_uri: str) -> BackboneSpec:
    return BackboneSpec("resnet20_cifar", weights=resnet20_uri).resolved()


@pytest.fixture(scope="session")
def resnet20(resnet20_spec: BackboneSpec) -> Backbone:
    return create_backbone(resnet20_spec, "cpu")


@pytest.fixture(scope="session")
def make_artifact(resnet20: Backbone) -> Callable[..., PromptArtifact]:
    """Seeded random artifacts on ResNet-20, memoised (building one costs a module + serialisation)."""
    memo: dict[tuple[object, ...], PromptArtifact] = {}

    def make(seed: int, layers: tuple[int, ...] = (8,), num_classes: int = 5) -> PromptArtifact:
        key = (seed, layers, num_classes)
        if key not in memo:
            memo[key] = random_artifact(resnet20, layers=layers, num_classes=num_classes, seed=seed)
        return memo[key]

    return make
