"""The asynchronous client: `AsyncClient` has the methods of `Client`, awaitable; listings and `watch`
are async iterators.

Each method only runs the description of its call from `actprompt._calls` (awaiting); the sync client
runs the same descriptions blocking.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
from httpx_sse import EventSource
from pydantic import BaseModel

from actprompt import _calls
from actprompt._base import (
    DEFAULT_TIMEOUT,
    ImageInput,
    RetryPolicy,
    headers_for,
    raise_for,
    resolve_api_key,
    resolve_base_url,
)
from actprompt._calls import Call, Listing
from actprompt.types import (
    ApiKey,
    ApiKeyCreated,
    Backbone,
    Evaluation,
    File,
    Job,
    JobEvent,
    Prediction,
    Prompt,
    Tenant,
    TenantCreated,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class _AsyncTransport:
    def __init__(self, http: httpx.AsyncClient, retry: RetryPolicy) -> None:
        self.http = http
        self.retry = retry

    async def call(self, call: Call[T]) -> T:
        response = await self.request(call.method, call.path, idempotent=call.idempotent, **call.options)
        return call.parse(response)

    async def request(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> httpx.Response:
        attempts = _calls.Attempts(method, path, idempotent, self.retry)
        while True:
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                await asyncio.sleep(attempts.after_transport_error(exc))
                continue
            delay = attempts.after_response(response)
            if delay is None:
                return response
            await asyncio.sleep(delay)

    async def pages(self, listing: Listing[M]) -> AsyncIterator[M]:
        params: dict[str, Any] | None = listing.first()
        while params is not None:
            response = await self.request("GET", listing.path, idempotent=True, params=params)
            items, params = listing.page(response, params)
            for item in items:
                yield item

    async def poll(self, call: Call[T], done: Callable[[T], bool], every: float) -> T:
        while True:
            result = await self.call(call)
            if done(result):
                return result
            await asyncio.sleep(every)


class AsyncFiles:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    async def upload(self, file: str | Path | IO[bytes], *, filename: str | None = None) -> File:
        with _calls.upload_file(file, filename) as call:
            return await self._t.call(call)

    def list(self, *, page_size: int = 100) -> AsyncIterator[File]:
        return self._t.pages(_calls.list_files(page_size))

    async def get(self, file_id: str) -> File:
        return await self._t.call(_calls.get_file(file_id))

    async def delete(self, file_id: str) -> None:
        await self._t.call(_calls.delete_file(file_id))


class AsyncJobs:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    async def create(
        self,
        *,
        backbone: str,
        dataset: str,
        prompt_layer: Any = None,
        method: str | None = None,
        prompt_shape: str | None = None,
        method_options: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        prompt_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        return await self._t.call(
            _calls.create_job(
                backbone=backbone,
                dataset=dataset,
                prompt_layer=prompt_layer,
                method=method,
                prompt_shape=prompt_shape,
                method_options=method_options,
                hyperparameters=hyperparameters,
                name=name,
                metadata=metadata,
                prompt_id=prompt_id,
                idempotency_key=idempotency_key,
            )
        )

    async def get(self, job_id: str) -> Job:
        return await self._t.call(_calls.get_job(job_id))

    def list(self, *, status: str | None = None, page_size: int = 100) -> AsyncIterator[Job]:
        return self._t.pages(_calls.list_jobs(status, page_size))

    async def cancel(self, job_id: str) -> Job:
        return await self._t.call(_calls.cancel_job(job_id))

    def events(self, job_id: str, *, after: int | None = None) -> AsyncIterator[JobEvent]:
        return self._t.pages(_calls.job_events(job_id, after))

    async def watch(
        self, job_id: str, *, after: int | None = None, max_reconnects: int = 20
    ) -> AsyncIterator[JobEvent]:
        watch = _calls.Watch(job_id, after, max_reconnects, self._t.retry)
        while True:
            try:
                async with self._t.http.stream(**watch.request()) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise_for(response)
                    async for sse in EventSource(response).aiter_sse():
                        yield watch.receive(sse)
                        if watch.ended:
                            return
            except httpx.TransportError as exc:
                await asyncio.sleep(watch.dropped(exc))
                continue
            await asyncio.sleep(watch.closed_early())

    async def wait(self, job_id: str, *, poll: float = 1.0) -> Job:
        return await self._t.poll(_calls.get_job(job_id), _calls.job_final, poll)


class AsyncPrompts:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    def list(self, *, page_size: int = 100) -> AsyncIterator[Prompt]:
        return self._t.pages(_calls.list_prompts(page_size))

    async def get(self, prompt: str) -> Prompt:
        return await self._t.call(_calls.get_prompt(prompt))

    async def download(self, prompt: str, path: str | Path, *, format: str = "artifact") -> Path:
        return await self._t.call(_calls.download_prompt(prompt, path, format))

    async def import_adapter(
        self,
        path: str | Path,
        *,
        backbone: str,
        classes: Sequence[str] | None = None,
        name: str | None = None,
        prompt_id: str | None = None,
    ) -> Prompt:
        with _calls.import_adapter(
            path, backbone=backbone, classes=classes, name=name, prompt_id=prompt_id
        ) as call:
            return await self._t.call(call)

    async def delete(self, prompt: str) -> None:
        await self._t.call(_calls.delete_prompt(prompt))


class AsyncEvaluations:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    async def create(self, *, prompt: str, dataset: str) -> Evaluation:
        return await self._t.call(_calls.create_evaluation(prompt, dataset))

    async def get(self, evaluation_id: str) -> Evaluation:
        return await self._t.call(_calls.get_evaluation(evaluation_id))

    def list(self, *, status: str | None = None, page_size: int = 100) -> AsyncIterator[Evaluation]:
        return self._t.pages(_calls.list_evaluations(status, page_size))

    async def wait(self, evaluation_id: str, *, poll: float = 1.0) -> Evaluation:
        return await self._t.poll(_calls.get_evaluation(evaluation_id), _calls.evaluation_final, poll)


class AsyncBackbones:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    async def list(self) -> list[Backbone]:
        return [b async for b in self._t.pages(_calls.list_backbones())]

    async def get(self, backbone_id: str) -> Backbone:
        return await self._t.call(_calls.get_backbone(backbone_id))

    async def create(
        self,
        backbone_id: str,
        *,
        model: str,
        weights: str = "hub",
        input_size: tuple[int, int] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> Backbone:
        options = {"input_size": input_size, "mean": mean, "std": std, "model_kwargs": model_kwargs}
        return await self._t.call(_calls.create_backbone(backbone_id, model, weights, options))

    async def delete(self, backbone_id: str) -> None:
        await self._t.call(_calls.delete_backbone(backbone_id))


class AsyncTenants:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    async def create(self, name: str) -> TenantCreated:
        return await self._t.call(_calls.create_tenant(name))

    def list(self, *, page_size: int = 100) -> AsyncIterator[Tenant]:
        return self._t.pages(_calls.list_tenants(page_size))

    async def get(self, tenant_id: str) -> Tenant:
        return await self._t.call(_calls.get_tenant(tenant_id))


class AsyncKeys:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    async def create(
        self, tenant_id: str, *, name: str | None = None, scopes: Sequence[str] | None = None
    ) -> ApiKeyCreated:
        return await self._t.call(_calls.create_key(tenant_id, name, scopes))

    async def list(self, tenant_id: str) -> list[ApiKey]:
        return [k async for k in self._t.pages(_calls.list_keys(tenant_id))]

    async def revoke(self, key_id: str) -> None:
        await self._t.call(_calls.revoke_key(key_id))


class AsyncClient:
    """`AsyncClient(base_url=..., api_key=...)`; use `async with` or `await client.aclose()`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self._http = http_client or httpx.AsyncClient(
            base_url=self.base_url, headers=headers_for(resolve_api_key(api_key)), timeout=timeout
        )
        t = _AsyncTransport(self._http, RetryPolicy(max_retries=max_retries))
        self._t = t
        self.files = AsyncFiles(t)
        self.jobs = AsyncJobs(t)
        self.prompts = AsyncPrompts(t)
        self.evaluations = AsyncEvaluations(t)
        self.backbones = AsyncBackbones(t)
        self.tenants = AsyncTenants(t)
        self.keys = AsyncKeys(t)

    async def predict(
        self, *, prompt: str, images: Sequence[ImageInput], top_k: int = 5
    ) -> list[list[Prediction]]:
        return await self._t.call(_calls.predict(prompt, images, top_k))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
