"""The predict use case: the `Predictor` seam, prompt resolution behind a short-lived cache, image URLs.

The route parses the request and calls :func:`predict`; that resolves and authorises every tenant-facing
reference (``prm_x``, ``prm_x@3``) into a :class:`PromptHandle`, fetches images given by URL, and hands
handles and image bytes to the process's one :class:`Predictor` (implemented on the engine by
``service.launch.front``). Nothing here knows about HTTP or tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
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
from service.ttl_cache import TTLCache

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("actprompt.predict")


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

    Revalidation ahead of expiry: every ``ttl_s / 2`` (:meth:`start`), the references used in the last
    ``idle_s`` are checked in one light query and renewed while they name the same version, dropped when
    not. So a prompt in use does not expire on a request's path, however rarely it is asked for: with a
    thousand prompts over a Zipf mix, expiry alone sent hundreds of requests a second through a thread and
    two queries each. References idle longer simply expire.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        ttl_s: float,
        idle_s: float = 300.0,
        max_entries: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = session_factory
        # value: the handle and the clock time it was read (a renewal keeps the handle, not its age)
        self.cache: TTLCache[tuple[str, str], tuple[PromptHandle, float]] = TTLCache(
            ttl_s, max_entries=max_entries, clock=clock
        )
        self.idle_s = idle_s
        self._used: dict[tuple[str, str], float] = {}  # reference -> when a request last used it
        self._sweeper: asyncio.Task[None] | None = None

    def cached(self, tenant_id: str, refs: Sequence[str]) -> list[PromptHandle] | None:
        """Every handle from memory, or None when any one needs the database (no thread hop on a hit)."""
        out = []
        now = self.cache.clock()
        for ref in refs:
            item = (tenant_id, ref)
            hit = self.cache.get(item)
            if hit is None or now - hit[1] >= self.cache.ttl_s:  # the bound counts from the read
                return None
            self._used[item] = now
            out.append(hit[0])
        return out

    def resolve(self, tenant_id: str, refs: Sequence[str], *, several: bool = False) -> list[PromptHandle]:
        """Blocking (in a thread): each reference's handle; NotFound names ``prompts[i]`` with several."""
        hit = self.cached(tenant_id, refs)
        if hit is not None:
            return hit

        def read(session: Session) -> list[PromptHandle]:
            out = []
            for i, ref in enumerate(refs):
                known = self.cached(tenant_id, [ref])
                if known is not None:
                    out.append(known[0])
                    continue
                read_at = self.cache.clock()
                try:
                    handle = resolve_for_predict(session, tenant_id, ref)
                except DomainError as exc:
                    if several:
                        exc.param = f"prompts[{i}]"
                    raise
                self.cache.put((tenant_id, ref), (handle, read_at))
                self._used[(tenant_id, ref)] = read_at
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

    def start(self) -> None:
        """Revalidate in the background from now on (call on the event loop that serves the requests)."""
        if self._sweeper is None and self.cache.ttl_s > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.cache.ttl_s / 2)
            try:
                await self.revalidate()
            except Exception:  # the database is down: the entries expire at their TTL, as without this
                log.warning("cached prompt references could not be revalidated", exc_info=True)

    async def revalidate(self) -> int:
        """Renew each recently used reference that still names the version its handle has; drop the others
        (their next request resolves them afresh). Returns how many were renewed. The cache is updated on
        the loop, after the query, so a :meth:`forget` meanwhile is not undone."""
        now = self.cache.clock()
        self._used = {item: t for item, t in self._used.items() if now - t < self.idle_s}
        held = {item: hit for item in self._used if (hit := self.cache.get(item)) is not None}
        if not held:
            return 0
        keys = await asyncio.to_thread(retry_read, self._factory, lambda s: current_keys(s, held))
        renewed = 0
        for item, key in keys.items():
            hit = self.cache.get(item)
            if hit is None or hit[0] is not held[item][0]:  # forgotten or replaced meanwhile
                continue
            if key == hit[0].key:
                self.cache.put(item, (hit[0], now))
                renewed += 1
            else:
                self.cache.discard(item)
        return renewed

    def forget(self, tenant_id: str, prompt_ref: str) -> None:
        """Drop every cached reference to this prompt (any version) of this tenant."""
        prompt_id, _ = parse_ref(prompt_ref, param="prompt_id")
        self.cache.discard_where(lambda k, v: k[0] == tenant_id and v[0].prompt_id == prompt_id)


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
