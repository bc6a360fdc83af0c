"""The asynchronous client: `AsyncClient` has the methods of `Client`, awaitable; listings and `watch`
are async iterators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
from pydantic import BaseModel

from actprompt._base import (
    DEFAULT_TIMEOUT,
    TERMINAL_JOB_STATES,
    ImageInput,
    RetryPolicy,
    SSEDecoder,
    event_from_sse,
    headers_for,
    is_retryable_error,
    job_body,
    new_idempotency_key,
    predict_request,
    predictions,
    raise_for,
    resolve_api_key,
    resolve_base_url,
    retry_after,
)
from actprompt._errors import APIConnectionError, APIError
from actprompt.types import Backbone, Evaluation, File, Job, JobEvent, Page, Prediction, Prompt

M = TypeVar("M", bound=BaseModel)


class _AsyncTransport:
    def __init__(self, http: httpx.AsyncClient, retry: RetryPolicy) -> None:
        self.http = http
        self.retry = retry

    async def request(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if not idempotent or attempt >= self.retry.max_retries:
                    raise APIConnectionError(f"{method} {path}: {exc}") from exc
                await asyncio.sleep(self.retry.delay(attempt, None))
                attempt += 1
                continue
            try:
                raise_for(response)
            except APIError as err:
                if idempotent and is_retryable_error(err) and attempt < self.retry.max_retries:
                    await asyncio.sleep(self.retry.delay(attempt, retry_after(response)))
                    attempt += 1
                    continue
                raise
            return response

    async def get(self, path: str, model: type[M], **kwargs: Any) -> M:
        return model.model_validate((await self.request("GET", path, idempotent=True, **kwargs)).json())

    async def pages(self, path: str, model: type[M], params: dict[str, Any]) -> AsyncIterator[M]:
        params = {k: v for k, v in params.items() if v is not None}
        while True:
            r = await self.request("GET", path, idempotent=True, params=params)
            page = Page[model].model_validate(r.json())  # type: ignore[valid-type]
            for item in page.data:
                yield item
            if not page.has_more or not page.next_cursor:
                return
            params["after"] = page.next_cursor


class AsyncFiles:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    async def upload(self, file: str | Path | IO[bytes], *, filename: str | None = None) -> File:
        if isinstance(file, str | Path):
            path = Path(file)
            with path.open("rb") as fh:
                return await self._send(fh, filename or path.name)
        return await self._send(file, filename or Path(getattr(file, "name", "upload.zip")).name)

    async def _send(self, fh: IO[bytes], filename: str) -> File:
        r = await self._t.request("POST", "/v1/files", idempotent=False, files={"file": (filename, fh)})
        return File.model_validate(r.json())

    def list(self, *, page_size: int = 100) -> AsyncIterator[File]:
        return self._t.pages("/v1/files", File, {"limit": page_size})

    async def get(self, file_id: str) -> File:
        return await self._t.get(f"/v1/files/{file_id}", File)

    async def delete(self, file_id: str) -> None:
        await self._t.request("DELETE", f"/v1/files/{file_id}", idempotent=True)


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
        hyperparameters: Mapping[str, Any] | None = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        prompt_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        body = job_body(
            backbone=backbone,
            dataset=dataset,
            prompt_layer=prompt_layer,
            method=method,
            prompt_shape=prompt_shape,
            hyperparameters=hyperparameters,
            name=name,
            metadata=metadata,
            prompt_id=prompt_id,
        )
        key = idempotency_key or new_idempotency_key()
        r = await self._t.request(
            "POST", "/v1/jobs", idempotent=True, json=body, headers={"Idempotency-Key": key}
        )
        return Job.model_validate(r.json())

    async def get(self, job_id: str) -> Job:
        return await self._t.get(f"/v1/jobs/{job_id}", Job)

    def list(self, *, status: str | None = None, page_size: int = 100) -> AsyncIterator[Job]:
        return self._t.pages("/v1/jobs", Job, {"status": status, "limit": page_size})

    async def cancel(self, job_id: str) -> Job:
        r = await self._t.request("POST", f"/v1/jobs/{job_id}/cancel", idempotent=True)
        return Job.model_validate(r.json())

    def events(self, job_id: str, *, after: int | None = None) -> AsyncIterator[JobEvent]:
        return self._t.pages(f"/v1/jobs/{job_id}/events", JobEvent, {"after": after, "limit": 500})

    async def watch(
        self, job_id: str, *, after: int | None = None, max_reconnects: int = 20
    ) -> AsyncIterator[JobEvent]:
        last = after
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                async with self._t.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(60, read=90)
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise_for(response)
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        msg = decoder.feed(line)
                        if msg is None:
                            continue
                        event = event_from_sse(msg.event, msg.data)
                        yield event
                        if event.type == "end":
                            return
                        last, failures = event.id, 0
            except httpx.TransportError as exc:
                failures += 1
                if failures > max_reconnects:
                    raise APIConnectionError(f"watch {job_id}: {exc}") from exc
                await asyncio.sleep(self._t.retry.delay(min(failures, 4), None))
                continue
            failures += 1
            if failures > max_reconnects:
                raise APIConnectionError(f"watch {job_id}: the stream kept closing early")
            await asyncio.sleep(self._t.retry.delay(0, None))

    async def wait(self, job_id: str, *, poll: float = 1.0) -> Job:
        while True:
            job = await self.get(job_id)
            if job.status in TERMINAL_JOB_STATES:
                return job
            await asyncio.sleep(poll)


class AsyncPrompts:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    def list(self, *, page_size: int = 100) -> AsyncIterator[Prompt]:
        return self._t.pages("/v1/prompts", Prompt, {"limit": page_size})

    async def get(self, prompt: str) -> Prompt:
        return await self._t.get(f"/v1/prompts/{prompt}", Prompt)

    async def download(self, prompt: str, path: str | Path) -> Path:
        r = await self._t.request("GET", f"/v1/prompts/{prompt}/artifact", idempotent=True)
        target = Path(path)
        target.write_bytes(r.content)
        return target

    async def delete(self, prompt: str) -> None:
        await self._t.request("DELETE", f"/v1/prompts/{prompt}", idempotent=True)


class AsyncEvaluations:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    async def create(self, *, prompt: str, dataset: str) -> Evaluation:
        r = await self._t.request(
            "POST", "/v1/evaluations", idempotent=False, json={"prompt": prompt, "dataset_uri": dataset}
        )
        return Evaluation.model_validate(r.json())

    async def get(self, evaluation_id: str) -> Evaluation:
        return await self._t.get(f"/v1/evaluations/{evaluation_id}", Evaluation)

    def list(self, *, status: str | None = None, page_size: int = 100) -> AsyncIterator[Evaluation]:
        return self._t.pages("/v1/evaluations", Evaluation, {"status": status, "limit": page_size})

    async def wait(self, evaluation_id: str, *, poll: float = 1.0) -> Evaluation:
        while True:
            ev = await self.get(evaluation_id)
            if ev.done:
                return ev
            await asyncio.sleep(poll)


class AsyncBackbones:
    def __init__(self, t: _AsyncTransport) -> None:
        self._t = t

    async def list(self) -> list[Backbone]:
        return [b async for b in self._t.pages("/v1/backbones", Backbone, {"limit": 100})]

    async def get(self, backbone_id: str) -> Backbone:
        return await self._t.get(f"/v1/backbones/{backbone_id}", Backbone)


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

    async def predict(
        self, *, prompt: str, images: Sequence[ImageInput], top_k: int = 5
    ) -> list[list[Prediction]]:
        r = await self._t.request(
            "POST", "/v1/predict", idempotent=True, **predict_request(prompt, images, top_k)
        )
        return predictions(r.json())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
