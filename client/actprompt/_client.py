"""The clients: `Client` (blocking) and `AsyncClient` (awaiting, async iterators for listings and `watch`),
with resources files, jobs, prompts, evaluations, backbones, tenants, keys and `predict`.

Each method only runs the description of its call from `actprompt._calls`; a resource's sync and async
classes stand side by side, differing only in how they wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

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


class _Transport:
    def __init__(self, http: httpx.Client, retry: RetryPolicy) -> None:
        self.http = http
        self.retry = retry

    def call(self, call: Call[T]) -> T:
        return call.parse(self.request(call.method, call.path, idempotent=call.idempotent, **call.options))

    def request(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> httpx.Response:
        """One call; retried with backoff on 429/502/503/504 and connection errors when `idempotent`."""
        attempts = _calls.Attempts(method, path, idempotent, self.retry)
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                time.sleep(attempts.after_transport_error(exc))
                continue
            delay = attempts.after_response(response)
            if delay is None:
                return response
            time.sleep(delay)

    def pages(self, listing: Listing[M]) -> Iterator[M]:
        """Every item of a cursor-paginated listing, fetching the next page when this one runs out."""
        params: dict[str, Any] | None = listing.first()
        while params is not None:
            response = self.request("GET", listing.path, idempotent=True, params=params)
            items, params = listing.page(response, params)
            yield from items

    def poll(self, call: Call[T], done: Callable[[T], bool], every: float) -> T:
        while True:
            result = self.call(call)
            if done(result):
                return result
            time.sleep(every)


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


TransportT = TypeVar("TransportT", _Transport, _AsyncTransport)


class _Resource(Generic[TransportT]):
    """One resource of a client, over the client's transport."""

    def __init__(self, t: TransportT) -> None:
        self._t: TransportT = t


class Files(_Resource[_Transport]):
    def upload(self, file: str | Path | IO[bytes], *, filename: str | None = None) -> File:
        """Upload a dataset archive (.zip, .tar, .tar.gz, .npz); streamed from disk, not read whole."""
        with _calls.upload_file(file, filename) as call:
            return self._t.call(call)

    def list(self, *, page_size: int = 100) -> Iterator[File]:
        return self._t.pages(_calls.list_files(page_size))

    def get(self, file_id: str) -> File:
        return self._t.call(_calls.get_file(file_id))

    def delete(self, file_id: str) -> None:
        self._t.call(_calls.delete_file(file_id))


class AsyncFiles(_Resource[_AsyncTransport]):
    async def upload(self, file: str | Path | IO[bytes], *, filename: str | None = None) -> File:
        with _calls.upload_file(file, filename) as call:
            return await self._t.call(call)

    def list(self, *, page_size: int = 100) -> AsyncIterator[File]:
        return self._t.pages(_calls.list_files(page_size))

    async def get(self, file_id: str) -> File:
        return await self._t.call(_calls.get_file(file_id))

    async def delete(self, file_id: str) -> None:
        await self._t.call(_calls.delete_file(file_id))


class Jobs(_Resource[_Transport]):
    def create(
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
        """Submit a training job; `dataset` is a file id (`file_...`) or a URI.

        Always sent with an Idempotency-Key (generated when none is given), so a retry after a lost answer
        returns the same job instead of starting a second one.
        """
        return self._t.call(
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

    def get(self, job_id: str) -> Job:
        return self._t.call(_calls.get_job(job_id))

    def list(self, *, status: str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job (newest first), across all pages."""
        return self._t.pages(_calls.list_jobs(status, page_size))

    def cancel(self, job_id: str) -> Job:
        return self._t.call(_calls.cancel_job(job_id))

    def events(self, job_id: str, *, after: int | None = None) -> Iterator[JobEvent]:
        """The events written so far (paginated JSON), without waiting for more."""
        return self._t.pages(_calls.job_events(job_id, after))

    def watch(self, job_id: str, *, after: int | None = None, max_reconnects: int = 20) -> Iterator[JobEvent]:
        """Live events over SSE until the job ends; the last one has type `end` and the final status.

        A dropped connection is resumed with `Last-Event-ID`, so no event is lost or repeated.
        """
        watch = _calls.Watch(job_id, after, max_reconnects, self._t.retry)
        while True:
            try:
                with self._t.http.stream(**watch.request()) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise_for(response)
                    for sse in EventSource(response).iter_sse():
                        yield watch.receive(sse)
                        if watch.ended:
                            return
            except httpx.TransportError as exc:
                time.sleep(watch.dropped(exc))
                continue
            time.sleep(watch.closed_early())

    def wait(self, job_id: str, *, poll: float = 1.0) -> Job:
        """Poll until the job is final (for scripts that do not want events)."""
        return self._t.poll(_calls.get_job(job_id), _calls.job_final, poll)


class AsyncJobs(_Resource[_AsyncTransport]):
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


class Prompts(_Resource[_Transport]):
    def list(self, *, page_size: int = 100) -> Iterator[Prompt]:
        return self._t.pages(_calls.list_prompts(page_size))

    def get(self, prompt: str) -> Prompt:
        return self._t.call(_calls.get_prompt(prompt))

    def download(self, prompt: str, path: str | Path, *, format: str = "artifact") -> Path:
        """Write the artifact (safetensors) to `path`, or with `format="peft"` a LoRA prompt as a zipped
        PEFT adapter folder (adapter_config.json + adapter_model.safetensors); returns the path."""
        return self._t.call(_calls.download_prompt(prompt, path, format))

    def import_adapter(
        self,
        path: str | Path,
        *,
        backbone: str,
        classes: Sequence[str] | None = None,
        name: str | None = None,
        prompt_id: str | None = None,
    ) -> Prompt:
        """Import a PEFT LoRA adapter trained elsewhere on `backbone`'s timm model, with its head (a zip
        of the `save_pretrained` folder, or the folder) as a prompt version."""
        with _calls.import_adapter(
            path, backbone=backbone, classes=classes, name=name, prompt_id=prompt_id
        ) as call:
            return self._t.call(call)

    def delete(self, prompt: str) -> None:
        self._t.call(_calls.delete_prompt(prompt))


class AsyncPrompts(_Resource[_AsyncTransport]):
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


class Evaluations(_Resource[_Transport]):
    def create(self, *, prompt: str, dataset: str) -> Evaluation:
        return self._t.call(_calls.create_evaluation(prompt, dataset))

    def get(self, evaluation_id: str) -> Evaluation:
        return self._t.call(_calls.get_evaluation(evaluation_id))

    def list(self, *, status: str | None = None, page_size: int = 100) -> Iterator[Evaluation]:
        return self._t.pages(_calls.list_evaluations(status, page_size))

    def wait(self, evaluation_id: str, *, poll: float = 1.0) -> Evaluation:
        return self._t.poll(_calls.get_evaluation(evaluation_id), _calls.evaluation_final, poll)


class AsyncEvaluations(_Resource[_AsyncTransport]):
    async def create(self, *, prompt: str, dataset: str) -> Evaluation:
        return await self._t.call(_calls.create_evaluation(prompt, dataset))

    async def get(self, evaluation_id: str) -> Evaluation:
        return await self._t.call(_calls.get_evaluation(evaluation_id))

    def list(self, *, status: str | None = None, page_size: int = 100) -> AsyncIterator[Evaluation]:
        return self._t.pages(_calls.list_evaluations(status, page_size))

    async def wait(self, evaluation_id: str, *, poll: float = 1.0) -> Evaluation:
        return await self._t.poll(_calls.get_evaluation(evaluation_id), _calls.evaluation_final, poll)


class Backbones(_Resource[_Transport]):
    def list(self) -> list[Backbone]:
        return list(self._t.pages(_calls.list_backbones()))

    def get(self, backbone_id: str) -> Backbone:
        return self._t.call(_calls.get_backbone(backbone_id))

    def create(
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
        """Register a backbone (the admin key): `weights` is "hub", "random" or a file:// checkpoint."""
        options = {"input_size": input_size, "mean": mean, "std": std, "model_kwargs": model_kwargs}
        return self._t.call(_calls.create_backbone(backbone_id, model, weights, options))

    def delete(self, backbone_id: str) -> None:
        self._t.call(_calls.delete_backbone(backbone_id))


class AsyncBackbones(_Resource[_AsyncTransport]):
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


class Tenants(_Resource[_Transport]):
    """The admin key's calls: tenants, each created with a first key that holds every scope."""

    def create(self, name: str) -> TenantCreated:
        return self._t.call(_calls.create_tenant(name))

    def list(self, *, page_size: int = 100) -> Iterator[Tenant]:
        return self._t.pages(_calls.list_tenants(page_size))

    def get(self, tenant_id: str) -> Tenant:
        return self._t.call(_calls.get_tenant(tenant_id))


class AsyncTenants(_Resource[_AsyncTransport]):
    async def create(self, name: str) -> TenantCreated:
        return await self._t.call(_calls.create_tenant(name))

    def list(self, *, page_size: int = 100) -> AsyncIterator[Tenant]:
        return self._t.pages(_calls.list_tenants(page_size))

    async def get(self, tenant_id: str) -> Tenant:
        return await self._t.call(_calls.get_tenant(tenant_id))


class Keys(_Resource[_Transport]):
    """API keys: the admin key for any tenant, a tenant key with the `admin` scope for its own."""

    def create(
        self, tenant_id: str, *, name: str | None = None, scopes: Sequence[str] | None = None
    ) -> ApiKeyCreated:
        """A new key (its secret only in this answer); `scopes` among predict, read, train, admin."""
        return self._t.call(_calls.create_key(tenant_id, name, scopes))

    def list(self, tenant_id: str) -> list[ApiKey]:
        return list(self._t.pages(_calls.list_keys(tenant_id)))

    def revoke(self, key_id: str) -> None:
        self._t.call(_calls.revoke_key(key_id))


class AsyncKeys(_Resource[_AsyncTransport]):
    async def create(
        self, tenant_id: str, *, name: str | None = None, scopes: Sequence[str] | None = None
    ) -> ApiKeyCreated:
        return await self._t.call(_calls.create_key(tenant_id, name, scopes))

    async def list(self, tenant_id: str) -> list[ApiKey]:
        return [k async for k in self._t.pages(_calls.list_keys(tenant_id))]

    async def revoke(self, key_id: str) -> None:
        await self._t.call(_calls.revoke_key(key_id))


class Client:
    """`Client(base_url=..., api_key=...)`; both default to ACTPROMPT_BASE_URL / ACTPROMPT_API_KEY."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self._http = http_client or httpx.Client(
            base_url=self.base_url, headers=headers_for(resolve_api_key(api_key)), timeout=timeout
        )
        t = _Transport(self._http, RetryPolicy(max_retries=max_retries))
        self._t = t
        self.files = Files(t)
        self.jobs = Jobs(t)
        self.prompts = Prompts(t)
        self.evaluations = Evaluations(t)
        self.backbones = Backbones(t)
        self.tenants = Tenants(t)
        self.keys = Keys(t)

    def predict(
        self,
        *,
        prompt: str,
        images: Sequence[ImageInput],
        top_k: int = 5,
    ) -> list[list[Prediction]]:
        """Per image, the top-k classes. Images: paths, bytes, PIL images or http(s) URLs (the server
        fetches those). Retried like any read: predicting has no side effect."""
        return self._t.call(_calls.predict(prompt, images, top_k))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
