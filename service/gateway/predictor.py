"""The domain's `Predictor` on top of the micro-batcher, with the prompts table as the cache's source.

The route resolves and authorises `prm_x@3` into a `PromptHandle`; here a handle becomes an internal
serving key `"<row key>:<sha256>"` (the content hash keeps a reused row id from ever naming a cached
artifact of another prompt), images are decoded off the event loop, and serving errors become domain ones.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from service.domain.errors import (
    Conflict,
    DomainError,
    InvalidInput,
    NotFound,
    Unavailable,
    from_engine_error,
)
from service.domain.predict import Prediction
from service.domain.prompts import PromptHandle, load_artifact_bytes
from service.engine import BackboneSpec, EngineError
from service.serving.errors import PinLimitError, PromptNotFoundError, ServingClosedError, ServingError
from service.serving.predictor import PromptPrediction, ServingConfig, ServingPredictor
from service.settings import Settings


def serving_key(key: int, sha256: str) -> str:
    return f"{key}:{sha256}"


class DatabasePromptSource:
    """Loads an artifact by internal key from the prompts table; checks the bytes are the ones named."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    def _read(self, key: str) -> bytes:
        row_key, _, sha = key.partition(":")
        try:
            with self._factory() as session:
                data = load_artifact_bytes(session, int(row_key))
        except NotFound:
            raise PromptNotFoundError(f"prompt {key!r} was deleted") from None
        if sha and hashlib.sha256(data).hexdigest() != sha:  # the row now holds another artifact
            raise PromptNotFoundError(f"prompt {key!r} was replaced")
        return data

    async def load(self, key: str) -> bytes:
        return await asyncio.to_thread(self._read, key)


def serving_config(settings: Settings) -> ServingConfig:
    return ServingConfig(
        device=settings.resolved_device(),
        max_wait_ms=settings.serving_max_wait_ms,
        max_batch_rows=settings.serving_max_batch_rows,
        host_cache_bytes=settings.prompt_cache_host_bytes,
        device_cache_bytes=settings.prompt_cache_device_bytes,
        max_slots=settings.prompt_cache_max_slots,
        min_slots=min(settings.serving_max_batch_rows, settings.prompt_cache_max_slots),
        max_classes=settings.serving_max_classes,
        pin_fraction=settings.prompt_cache_pin_fraction,
    )


def _domain_error(exc: Exception) -> DomainError:
    if isinstance(exc, PromptNotFoundError):
        return NotFound(str(exc), code="prompt_not_found", param="prompt")
    if isinstance(exc, PinLimitError):
        return Conflict(str(exc), code=exc.code, param="prompt_id")
    if isinstance(exc, ServingClosedError):
        return Unavailable(str(exc), code=exc.code)
    if isinstance(exc, EngineError):
        return from_engine_error(exc, default_param="prompt")
    return Unavailable(str(exc), code=getattr(exc, "code", "unavailable"))


class BatchingPredictor:
    """`service.domain.predict.Predictor` served by the cross-request micro-batcher and the prompt cache.

    Built in the app's lifespan and called from the event loop only: the prompt cache, the slot policy and
    the batcher's queues belong to that loop (no method here is safe from another thread).
    """

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings) -> None:
        if settings.torch_threads > 0:  # N API processes on C cores: C / N each, not C each (oversubscribed)
            import torch

            torch.set_num_threads(settings.torch_threads)
        self.serving = ServingPredictor(DatabasePromptSource(session_factory), serving_config(settings))
        self._specs: dict[str, BackboneSpec] = {}  # backbone spec hash -> parsed spec (parsed once)

    def _spec(self, handle: PromptHandle) -> BackboneSpec:
        spec = self._specs.get(handle.backbone_spec_hash)
        if spec is None:
            spec = self._specs[handle.backbone_spec_hash] = BackboneSpec.from_dict(handle.backbone_spec)
        return spec

    async def predict_many(
        self,
        prompts: Sequence[PromptHandle],
        images: Sequence[bytes | np.ndarray],
        top_k: int,
        *,
        tenant_id: str = "",
    ) -> list[list[list[Prediction]]]:
        """Every image (an encoded file, or decoded uint8 HWC) under every prompt (one backbone): the shared
        prefix runs once per image."""
        specs = {p.backbone_spec_hash for p in prompts}
        if len(specs) > 1:
            raise InvalidInput("prompts: all prompts of one request must share a backbone", param="prompts")
        spec = self._spec(prompts[0])
        keys = [serving_key(p.key, p.sha256) for p in prompts]
        try:
            outs = await self.serving.predict_images(spec, keys, list(images), tenant_id=tenant_id)
        except (ServingError, EngineError) as exc:
            raise _domain_error(exc) from exc
        return [_rows(out, top_k) for out in outs]

    async def pin(self, prompt: PromptHandle) -> int:
        try:
            spec = self._spec(prompt)
            return await self.serving.pin(spec, serving_key(prompt.key, prompt.sha256))
        except (ServingError, EngineError) as exc:
            raise _domain_error(exc) from exc

    async def unpin(self, prompt: PromptHandle) -> bool:
        return self.serving.unpin(serving_key(prompt.key, prompt.sha256))

    async def invalidate(self, key: int, sha256: str) -> None:
        """After a deletion committed: no tier of this process serves the artifact again."""
        self.serving.invalidate(serving_key(key, sha256))

    def stats(self) -> dict[str, Any]:
        return self.serving.stats()

    async def aclose(self) -> None:
        await self.serving.aclose()


def _rows(out: PromptPrediction, top_k: int) -> list[list[Prediction]]:
    return [
        [Prediction(label=d["label"], index=d["index"], probability=d["probability"]) for d in row]
        for row in out.top_k(top_k)
    ]
