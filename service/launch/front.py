"""The domain's `Predictor` in a front process: handles become keys, images become tensors, then the engine.

The route resolves and authorises `prm_x@3` into a `PromptHandle`; here a handle becomes an internal
serving key `"<row key>:<sha256>"` (the content hash keeps a reused row id from ever naming a cached
artifact of another prompt), images are decoded and preprocessed in a thread of this process with the
pipeline each prompt was trained with (asked of the engine once per key; the engine only ever sees ready
tensors), and serving errors become domain ones. The engine is the engine process
(:class:`service.serving.client.EngineClient`, the split `actprompt serve` runs) or an
:class:`service.serving.core.EngineCore` inside this process (the single-process mode and in-process tests):
both are an :class:`Engine`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from cachetools import LRUCache
from torch import Tensor

from service.domain.errors import (
    Conflict,
    DomainError,
    InvalidInput,
    NotFound,
    Unavailable,
    from_engine_error,
)
from service.domain.predict import Prediction
from service.domain.prompts import PromptHandle
from service.engine import BackboneSpec, EngineError, ImageDecodeError, decode_image
from service.engine.preprocessing import Preprocessing
from service.serving.client import EngineClient
from service.serving.core import EngineCore, PromptPrediction, ServingConfig
from service.serving.errors import (
    OverloadedError,
    PinLimitError,
    PromptNotFoundError,
    ServingError,
)
from service.settings import Settings

__all__ = ["Engine", "EnginePredictor", "serving_config", "serving_key"]


#: encoded bytes up to which a request's images are decoded on the event loop: one 32-px PNG takes ~0.1 ms,
#: less than handing it to a thread and back; a few large photos would stall every other request
_INLINE_IMAGE_BYTES = 16 << 10


def serving_key(key: int, sha256: str) -> str:
    return f"{key}:{sha256}"


def serving_config(settings: Settings, *, cores: int = 1) -> ServingConfig:
    """``cores``: what the process serving from it may use; on a CPU, by default, a pass lane on each."""
    device = settings.resolved_device()
    lanes = settings.serving_model_lanes or (cores if device.split(":")[0] == "cpu" else 1)
    return ServingConfig(
        device=device,
        model_lanes=max(1, lanes),
        max_wait_ms=settings.serving_max_wait_ms,
        max_batch_rows=settings.serving_max_batch_rows,
        host_cache_bytes=settings.prompt_cache_host_bytes,
        device_cache_bytes=settings.prompt_cache_device_bytes,
        max_slots=settings.prompt_cache_max_slots,
        min_slots=min(settings.serving_max_batch_rows, settings.prompt_cache_max_slots),
        max_classes=settings.serving_max_classes,
        pin_fraction=settings.prompt_cache_pin_fraction,
        queue_budget_ms=settings.serving_queue_budget_ms,
        fair_quantum_rows=settings.serving_fair_quantum_rows,
        traced_segments=settings.serving_traced_segments,
        optimised_segments=settings.serving_optimised_segments,
        model_nice=settings.serving_model_nice,
    )


#: What a front sends its work to: the engine process, or the engine inside this process. The two share
#: one interface (``alive``, ``predict``, ``pipelines``, ``pin``, ``unpin``, ``invalidate``, ``stats``,
#: ``aclose``); a union rather than a Protocol that would spell every signature a third time.
Engine = EngineClient | EngineCore


def _domain_error(exc: Exception) -> DomainError | ServingError:
    """Serving errors keep their own status (503 overloaded / engine_unavailable with Retry-After, 504);
    the ones the domain has a name for become it."""
    if isinstance(exc, PromptNotFoundError):
        return NotFound(str(exc), code="prompt_not_found", param="prompt")
    if isinstance(exc, PinLimitError):
        return Conflict(str(exc), code=exc.code, param="prompt_id")
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, EngineError):
        return from_engine_error(exc, default_param="prompt")
    return Unavailable(str(exc), code=getattr(exc, "code", "unavailable"))


class EnginePredictor:
    """`service.domain.predict.Predictor` for a front process, on an :class:`Engine`.

    Built in the app's lifespan and called from the event loop only.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_pipelines: int = 100_000,
        on_overloaded: Callable[[str, float], None] | None = None,
    ) -> None:
        self.engine = engine
        # (tenant, seconds over the queue budget) when the engine refuses: the front's gate sheds the tenant
        self._on_overloaded = on_overloaded
        self._specs: dict[str, BackboneSpec] = {}  # backbone spec hash -> parsed spec (parsed once)
        # serving key -> its training pipeline; a key names immutable bytes (sha256), so it never goes stale
        self._pipelines: LRUCache[str, Preprocessing] = LRUCache(max_pipelines)

    @property
    def ready(self) -> bool:
        return self.engine.alive

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
        deadline: float | None = None,
    ) -> list[list[list[Prediction]]]:
        """Every image (an encoded file, or decoded uint8 HWC) under every prompt (one backbone): the shared
        prefix runs once per image."""
        specs = {p.backbone_spec_hash for p in prompts}
        if len(specs) > 1:
            raise InvalidInput("prompts: all prompts of one request must share a backbone", param="prompts")
        spec = self._spec(prompts[0])
        keys = [serving_key(p.key, p.sha256) for p in prompts]
        try:
            outs = await self.predict_images(spec, keys, images, tenant_id=tenant_id, deadline=deadline)
        except (ServingError, EngineError) as exc:
            if isinstance(exc, OverloadedError) and self._on_overloaded is not None:
                self._on_overloaded(tenant_id, exc.excess_s)
            raise _domain_error(exc) from exc
        return [_rows(out, top_k) for out in outs]

    async def predict_images(
        self,
        spec: BackboneSpec,
        keys: Sequence[str],
        images: Sequence[bytes | np.ndarray],
        *,
        tenant_id: str = "",
        deadline: float | None = None,
    ) -> list[PromptPrediction]:
        """Every image under every key, each prompt's images through the pipeline its artifact records
        (one decode; one tensor and one engine call per distinct pipeline, usually one).

        Raises ImageDecodeError naming ``images[i]`` for a file that does not decode.
        """
        unique = list(dict.fromkeys(keys))
        missing = [k for k in unique if k not in self._pipelines]
        if missing:
            for key, pipeline in zip(missing, await self.engine.pipelines(spec, missing), strict=True):
                self._pipelines[key] = pipeline
        by_pipeline: dict[Preprocessing, list[str]] = {}
        for key in unique:
            by_pipeline.setdefault(self._pipelines[key], []).append(key)
        work = (list(by_pipeline.items()), list(images))
        if sum(len(im) if isinstance(im, bytes) else im.nbytes for im in images) <= _INLINE_IMAGE_BYTES:
            groups = _prepare(*work)  # a thumbnail or two decodes faster than a hop to a thread
        else:
            groups = await asyncio.to_thread(_prepare, *work)
        outs = await asyncio.gather(
            *(
                self.engine.predict(spec, group, x, tenant_id=tenant_id, deadline=deadline)
                for group, x in groups
            )
        )
        answers = {a.key: a for out in outs for a in out}
        return [answers[k] for k in keys]

    async def pin(self, prompt: PromptHandle) -> int:
        try:
            return await self.engine.pin(self._spec(prompt), serving_key(prompt.key, prompt.sha256))
        except (ServingError, EngineError) as exc:
            raise _domain_error(exc) from exc

    async def unpin(self, prompt: PromptHandle) -> bool:
        try:
            return await self.engine.unpin(serving_key(prompt.key, prompt.sha256))
        except ServingError as exc:
            raise _domain_error(exc) from exc

    async def invalidate(self, key: int, sha256: str) -> None:
        """After a deletion committed: the engine never serves the artifact again (every front's traffic)."""
        try:
            await self.engine.invalidate(serving_key(key, sha256))
        except ServingError as exc:
            raise _domain_error(exc) from exc

    async def stats(self) -> dict[str, Any]:
        return await self.engine.stats()

    async def aclose(self) -> None:
        await self.engine.aclose()


def _prepare(
    groups: list[tuple[Preprocessing, list[str]]], images: list[bytes | np.ndarray]
) -> list[tuple[list[str], Tensor]]:
    """Decode once, then each group's pipeline, in one hop off the event loop; a file that does not decode
    names images[i]."""
    decoded = []
    for i, im in enumerate(images):
        if isinstance(im, np.ndarray):
            decoded.append(im)
            continue
        try:
            decoded.append(decode_image(im))
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"image {i}: {exc}", param=f"images[{i}]") from exc
    return [(keys, pipeline(decoded)) for pipeline, keys in groups]  # x [N, 3, H, W] per group


def _rows(out: PromptPrediction, top_k: int) -> list[list[Prediction]]:
    return [
        [Prediction(label=d["label"], index=d["index"], probability=d["probability"]) for d in row]
        for row in out.top_k(top_k)
    ]
