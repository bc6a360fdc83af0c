"""The predict use case: the `Predictor` seam, prompt resolution behind a short-lived cache, image URLs.

The route parses the request and calls :func:`predict`; that resolves and authorises every tenant-facing
reference (``prm_x``, ``prm_x@3``) into a :class:`PromptHandle`, fetches images given by URL, and hands
handles and image bytes to the process's one :class:`Predictor` (implemented on the engine by
``service.launch.front``). Nothing here knows about HTTP or tensors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from service.db.session import retry_read
from service.domain.errors import DomainError, InvalidInput
from service.domain.prompts import (
    PromptHandle,
    current_keys,
    list_versions,
    parse_ref,
    resolve_for_predict,
)
from service.domain.prompts import delete_prompt as delete_stored
from service.revalidating_cache import RevalidatingCache

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float


class Predictor(Protocol):
    """What the gateway needs from the serving side; one implementation per process, built in the lifespan."""

    async def predict_many(
        self,
        prompts: Sequence[PromptHandle],
        images: Sequence[bytes | np.ndarray],
        top_k: int,
        *,
        tenant_id: str = "",
        deadline: float | None = None,
    ) -> list[list[list[Prediction]]]:
        """Every image (encoded file, or decoded uint8 HWC) under every prompt (one backbone): per prompt,
        per image, the top-k classes. Past ``deadline`` (``time.time()`` seconds) rows are not computed."""
        ...

    @property
    def ready(self) -> bool:
        """Whether the engine answers now (readiness; a restarting engine process does not)."""
        ...

    async def pin(self, prompt: PromptHandle) -> int:
        """Keep the prompt resident until unpinned; returns its device slot."""
        ...

    async def unpin(self, prompt: PromptHandle) -> bool: ...

    async def invalidate(self, key: int, sha256: str) -> None:
        """Never serve this artifact again, whichever front asks next (after its deletion committed)."""
        ...

    async def stats(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class ImageURL:
    """An image given by http(s) URL: fetched by the gateway under the dataset download rules."""

    url: str


ImageInput = bytes | ImageURL


@dataclass(frozen=True)
class URLFetchPolicy:
    """How image URLs are fetched: public addresses only unless ``allow_private`` (tests, on-prem)."""

    max_bytes: int
    timeout_s: float
    allow_private: bool = False


@dataclass(frozen=True)
class PromptResult:
    ref: str  # the exact version that answered (`id@version`)
    rows: list[list[Prediction]]  # per image, top-k


class PromptResolver:
    """(tenant, reference) -> PromptHandle, read from the database and kept for ``ttl_s`` seconds.

    A deletion or a new version made through this process is seen at once (:meth:`forget`); one made by
    another process (a worker that finished training, another API process) within ``ttl_s``. A foreign or
    unknown reference is never cached: it costs a query each time, as before.

    References in use are revalidated ahead of expiry (:class:`RevalidatingCache`, one light query for all:
    a version is an immutable row, so a handle is still right while its reference names the same key).
    Without that, in a mix of a thousand prompts most uses of the tail came after an expiry, each through a
    thread and two queries.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        ttl_s: float,
        max_entries: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = session_factory
        self.cache: RevalidatingCache[tuple[str, str], PromptHandle] = RevalidatingCache(
            ttl_s, self._still_named, name="prompt references", max_entries=max_entries, clock=clock
        )

    def cached(self, tenant_id: str, refs: Sequence[str]) -> list[PromptHandle] | None:
        """Every handle from memory, or None when any one needs the database (no thread hop on a hit)."""
        out = []
        for ref in refs:
            handle = self.cache.get((tenant_id, ref))
            if handle is None:
                return None
            out.append(handle)
        return out

    def resolve(self, tenant_id: str, refs: Sequence[str], *, several: bool = False) -> list[PromptHandle]:
        """Blocking (in a thread): each reference's handle; NotFound names ``prompts[i]`` with several."""
        hit = self.cached(tenant_id, refs)
        if hit is not None:
            return hit

        def read(session: Session) -> list[PromptHandle]:
            out = []
            for i, ref in enumerate(refs):
                handle = self.cache.get((tenant_id, ref))
                if handle is None:
                    read_at = self.cache.clock()
                    try:
                        handle = resolve_for_predict(session, tenant_id, ref)
                    except DomainError as exc:
                        if several:
                            exc.param = f"prompts[{i}]"
                        raise
                    self.cache.put((tenant_id, ref), handle, read_at)
                out.append(handle)
            return out

        # one retry on a connection that died mid-flight (a read has no side effect)
        out = retry_read(self._factory, read)
        return out

    async def aresolve(
        self, tenant_id: str, refs: Sequence[str], *, several: bool = False
    ) -> list[PromptHandle]:
        hit = self.cached(tenant_id, refs)
        if hit is not None:
            return hit
        return await asyncio.to_thread(self.resolve, tenant_id, refs, several=several)

    def _still_named(self, held: Mapping[tuple[str, str], PromptHandle]) -> dict[tuple[str, str], bool]:
        keys = retry_read(self._factory, lambda s: current_keys(s, held))
        return {item: keys.get(item) == handle.key for item, handle in held.items()}

    def start(self) -> None:
        """Revalidate the references in use from now on (on the event loop that serves the requests)."""
        self.cache.start()

    async def aclose(self) -> None:
        await self.cache.aclose()

    async def revalidate(self) -> int:
        """Revalidate now (the background task does it every half TTL): how many were renewed."""
        return await self.cache.revalidate()

    def forget(self, tenant_id: str, prompt_ref: str) -> None:
        """Drop every cached reference to this prompt (any version) of this tenant."""
        prompt_id, _ = parse_ref(prompt_ref, param="prompt_id")
        self.cache.discard_where(lambda k, h: k[0] == tenant_id and h.prompt_id == prompt_id)


async def fetch_images(images: Sequence[ImageInput], policy: URLFetchPolicy) -> list[bytes]:
    """Bytes for every image: URLs fetched concurrently in threads; a failed fetch is a 422 naming it."""
    from service.engine import EngineError
    from service.engine.datasets.remote import fetch_http_bytes

    def fetch(i: int, url: str) -> bytes:
        try:
            return fetch_http_bytes(
                url, max_bytes=policy.max_bytes, allow_private=policy.allow_private, timeout=policy.timeout_s
            )
        except EngineError as exc:
            raise InvalidInput(f"images[{i}]: {exc}", code="invalid_image", param=f"images[{i}]") from exc

    out: list[Any] = list(images)
    pending = [(i, im.url) for i, im in enumerate(images) if isinstance(im, ImageURL)]
    if pending:
        fetched = await asyncio.gather(*(asyncio.to_thread(fetch, i, url) for i, url in pending))
        for (i, _), data in zip(pending, fetched, strict=True):
            out[i] = data
    return out


async def predict(
    resolver: PromptResolver,
    predictor: Predictor,
    tenant_id: str,
    refs: Sequence[str],
    images: Sequence[ImageInput],
    top_k: int,
    *,
    several: bool,
    url_policy: URLFetchPolicy,
    deadline: float | None = None,
) -> list[PromptResult]:
    """Resolve (authorising: a foreign prompt is a 404), fetch, predict: per prompt, its rows."""
    handles = await resolver.aresolve(tenant_id, refs, several=several)
    data = await fetch_images(images, url_policy)
    per_prompt = await predictor.predict_many(handles, data, top_k, tenant_id=tenant_id, deadline=deadline)
    return [PromptResult(h.ref, rows) for h, rows in zip(handles, per_prompt, strict=True)]


async def pin(resolver: PromptResolver, predictor: Predictor, tenant_id: str, ref: str) -> str:
    """Keep the version ``ref`` names now resident (a foreign prompt is a 404 before anything loads)."""
    (handle,) = await resolver.aresolve(tenant_id, [ref])
    await predictor.pin(handle)
    return handle.ref


async def unpin(resolver: PromptResolver, predictor: Predictor, tenant_id: str, ref: str) -> str:
    (handle,) = await resolver.aresolve(tenant_id, [ref])
    await predictor.unpin(handle)
    return handle.ref


async def delete_prompt(
    session_factory: sessionmaker[Session],
    resolver: PromptResolver,
    predictor: Predictor,
    tenant_id: str,
    ref: str,
) -> None:
    """Delete ``prm_x`` (every version) or ``prm_x@3``; afterwards the engine's caches no longer serve
    them, whichever front the next request reaches (this front's resolver forgets them too)."""
    prompt_id, version = parse_ref(ref, param="prompt_id")

    def delete() -> list[tuple[int, str]]:
        with session_factory() as session:
            doomed = [
                (p.key, p.sha256)
                for p in list_versions(session, tenant_id, prompt_id)
                if version is None or p.version == version
            ]
            delete_stored(session, tenant_id, ref)
            session.commit()
            return doomed

    doomed = await asyncio.to_thread(delete)
    resolver.forget(tenant_id, prompt_id)
    for key, sha256 in doomed:
        await predictor.invalidate(key, sha256)
