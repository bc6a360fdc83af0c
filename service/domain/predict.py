"""The predict seam: a `Predictor` protocol and the simple per-request implementation.

The serving layer replaces `SimplePredictor` with a cross-request micro-batcher behind the same protocol;
the route only ever calls `app.state.predictor.predict(handle, images, top_k)`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio.to_thread

from service.domain.backbones import BackboneCache
from service.domain.errors import InvalidInput, from_engine_error
from service.domain.prompts import PromptHandle


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float


class Predictor(Protocol):
    async def predict(
        self, prompt: PromptHandle, images: Sequence[bytes], top_k: int
    ) -> list[list[Prediction]]: ...

    async def aclose(self) -> None: ...


class SimplePredictor:
    """One forward pass per request with `predict_single`; decoded artifacts kept in a small LRU by key."""

    def __init__(
        self,
        load_artifact: Callable[[int], bytes],
        *,
        device: str,
        backbones: BackboneCache | None = None,
        max_artifacts: int = 256,
    ) -> None:
        self._load_artifact = load_artifact
        self._device = device
        self._backbones = backbones or BackboneCache()
        self._artifacts: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self._max_artifacts = max_artifacts
        self._lock = threading.Lock()  # one forward at a time per process keeps Backbone.run single-caller
        self._cache_lock = threading.Lock()

    async def predict(
        self, prompt: PromptHandle, images: Sequence[bytes], top_k: int
    ) -> list[list[Prediction]]:
        return await anyio.to_thread.run_sync(self._predict_sync, prompt, list(images), top_k)

    async def aclose(self) -> None:
        self._backbones.clear()

    def _artifact(self, prompt: PromptHandle) -> Any:
        from service.engine.artifacts import PromptArtifact

        key = (prompt.key, prompt.sha256)
        with self._cache_lock:
            if key in self._artifacts:
                self._artifacts.move_to_end(key)
                return self._artifacts[key]
        artifact = PromptArtifact.from_bytes(self._load_artifact(prompt.key))
        with self._cache_lock:
            self._artifacts[key] = artifact
            while len(self._artifacts) > self._max_artifacts:
                self._artifacts.popitem(last=False)
        return artifact

    def _predict_sync(self, prompt: PromptHandle, images: list[bytes], top_k: int) -> list[list[Prediction]]:
        import torch

        from service.engine import EngineError
        from service.engine.data import decode_image, preprocess
        from service.engine.mixed_batch import predict_single

        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(decode_image(data))
            except EngineError as exc:
                raise InvalidInput(f"image {i}: {exc}", code="invalid_image", param=f"images[{i}]") from exc
        try:
            backbone = self._backbones.get(prompt.backbone_spec, prompt.backbone_spec_hash, self._device)
            artifact = self._artifact(prompt)
            spec = backbone.spec
            x = preprocess(decoded, spec.input_size, spec.mean, spec.std)  # [N, 3, H, W]
            with self._lock, torch.inference_mode():
                logits = predict_single(backbone, artifact, x.to(backbone.device))  # [N, K]
                probs = torch.softmax(logits.float(), dim=-1).cpu()
        except EngineError as exc:
            raise from_engine_error(exc, default_param="prompt") from exc
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=-1)
        classes = list(artifact.classes)
        return [
            [
                Prediction(label=str(classes[j]), index=int(j), probability=float(p))
                for p, j in zip(row_p, row_i, strict=True)
            ]
            for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
        ]
