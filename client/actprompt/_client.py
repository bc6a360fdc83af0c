"""The synchronous client: `Client(base_url, api_key)` with resources files, jobs, prompts, evaluations,
backbones and `predict`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
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


class _Transport:
    def __init__(self, http: httpx.Client, retry: RetryPolicy) -> None:
        self.http = http
        self.retry = retry

    def request(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> httpx.Response:
        """One call; retried with backoff on 429/502/503/504 and connection errors when `idempotent`."""
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if not idempotent or attempt >= self.retry.max_retries:
                    raise APIConnectionError(f"{method} {path}: {exc}") from exc
                time.sleep(self.retry.delay(attempt, None))
                attempt += 1
                continue
            try:
                raise_for(response)
            except APIError as err:
                if idempotent and is_retryable_error(err) and attempt < self.retry.max_retries:
                    time.sleep(self.retry.delay(attempt, retry_after(response)))
                    attempt += 1
                    continue
                raise
            return response

    def get(self, path: str, model: type[M], **kwargs: Any) -> M:
        return model.model_validate(self.request("GET", path, idempotent=True, **kwargs).json())

    def pages(self, path: str, model: type[M], params: dict[str, Any]) -> Iterator[M]:
        """Every item of a cursor-paginated listing, fetching the next page when this one runs out."""
        params = {k: v for k, v in params.items() if v is not None}
        while True:
            page = Page[model].model_validate(  # type: ignore[valid-type]
                self.request("GET", path, idempotent=True, params=params).json()
            )
            yield from page.data
            if not page.has_more or not page.next_cursor:
                return
            params["after"] = page.next_cursor


class Files:
    def __init__(self, t: _Transport) -> None:
        self._t = t

    def upload(self, file: str | Path | IO[bytes], *, filename: str | None = None) -> File:
        """Upload a dataset archive (.zip, .tar, .tar.gz, .npz); streamed from disk, not read whole."""
        if isinstance(file, str | Path):
            path = Path(file)
            with path.open("rb") as fh:
                return self._send(fh, filename or path.name)
        return self._send(file, filename or Path(getattr(file, "name", "upload.zip")).name)

    def _send(self, fh: IO[bytes], filename: str) -> File:
        r = self._t.request("POST", "/v1/files", idempotent=False, files={"file": (filename, fh)})
        return File.model_validate(r.json())

    def list(self, *, page_size: int = 100) -> Iterator[File]:
        return self._t.pages("/v1/files", File, {"limit": page_size})

    def get(self, file_id: str) -> File:
        return self._t.get(f"/v1/files/{file_id}", File)

    def delete(self, file_id: str) -> None:
        self._t.request("DELETE", f"/v1/files/{file_id}", idempotent=True)


class Jobs:
    def __init__(self, t: _Transport) -> None:
        self._t = t

    def create(
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
        """Submit a training job; `dataset` is a file id (`file_...`) or a URI.

        Always sent with an Idempotency-Key (generated when none is given), so a retry after a lost answer
        returns the same job instead of starting a second one.
        """
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
        r = self._t.request("POST", "/v1/jobs", idempotent=True, json=body, headers={"Idempotency-Key": key})
        return Job.model_validate(r.json())

    def get(self, job_id: str) -> Job:
        return self._t.get(f"/v1/jobs/{job_id}", Job)

    def list(self, *, status: str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job (newest first), across all pages."""
        return self._t.pages("/v1/jobs", Job, {"status": status, "limit": page_size})

    def cancel(self, job_id: str) -> Job:
        r = self._t.request("POST", f"/v1/jobs/{job_id}/cancel", idempotent=True)
        return Job.model_validate(r.json())

    def events(self, job_id: str, *, after: int | None = None) -> Iterator[JobEvent]:
        """The events written so far (paginated JSON), without waiting for more."""
        return self._t.pages(f"/v1/jobs/{job_id}/events", JobEvent, {"after": after, "limit": 500})

    def watch(self, job_id: str, *, after: int | None = None, max_reconnects: int = 20) -> Iterator[JobEvent]:
        """Live events over SSE until the job ends; the last one has type `end` and the final status.

        A dropped connection is resumed with `Last-Event-ID`, so no event is lost or repeated.
        """
        last = after
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                with self._t.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(60, read=90)
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise_for(response)
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
                        msg = decoder.feed(line)
                        if msg is None:
                            continue
                        event = event_from_sse(msg.event, msg.data)
                        if event.type == "end":
                            yield event
                            return
                        last, failures = event.id, 0
                        yield event
            except httpx.TransportError as exc:
                failures += 1
                if failures > max_reconnects:
                    raise APIConnectionError(f"watch {job_id}: {exc}") from exc
                time.sleep(self._t.retry.delay(min(failures, 4), None))
                continue
            # the server closed the stream without `end` (a proxy timeout, a restart): resume
            failures += 1
            if failures > max_reconnects:
                raise APIConnectionError(f"watch {job_id}: the stream kept closing early")
            time.sleep(self._t.retry.delay(0, None))

    def wait(self, job_id: str, *, poll: float = 1.0) -> Job:
        """Poll until the job is final (for scripts that do not want events)."""
        while True:
            job = self.get(job_id)
            if job.status in TERMINAL_JOB_STATES:
                return job
            time.sleep(poll)


class Prompts:
    def __init__(self, t: _Transport) -> None:
        self._t = t

    def list(self, *, page_size: int = 100) -> Iterator[Prompt]:
        return self._t.pages("/v1/prompts", Prompt, {"limit": page_size})

    def get(self, prompt: str) -> Prompt:
        return self._t.get(f"/v1/prompts/{prompt}", Prompt)

    def download(self, prompt: str, path: str | Path) -> Path:
        """Write the artifact (safetensors) to `path`; returns the path."""
        r = self._t.request("GET", f"/v1/prompts/{prompt}/artifact", idempotent=True)
        target = Path(path)
        target.write_bytes(r.content)
        return target

    def delete(self, prompt: str) -> None:
        self._t.request("DELETE", f"/v1/prompts/{prompt}", idempotent=True)


class Evaluations:
    def __init__(self, t: _Transport) -> None:
        self._t = t

    def create(self, *, prompt: str, dataset: str) -> Evaluation:
        r = self._t.request(
            "POST", "/v1/evaluations", idempotent=False, json={"prompt": prompt, "dataset_uri": dataset}
        )
        return Evaluation.model_validate(r.json())

    def get(self, evaluation_id: str) -> Evaluation:
        return self._t.get(f"/v1/evaluations/{evaluation_id}", Evaluation)

    def list(self, *, status: str | None = None, page_size: int = 100) -> Iterator[Evaluation]:
        return self._t.pages("/v1/evaluations", Evaluation, {"status": status, "limit": page_size})

    def wait(self, evaluation_id: str, *, poll: float = 1.0) -> Evaluation:
        while True:
            ev = self.get(evaluation_id)
            if ev.done:
                return ev
            time.sleep(poll)


class Backbones:
    def __init__(self, t: _Transport) -> None:
        self._t = t

    def list(self) -> list[Backbone]:
        return list(self._t.pages("/v1/backbones", Backbone, {"limit": 100}))

    def get(self, backbone_id: str) -> Backbone:
        return self._t.get(f"/v1/backbones/{backbone_id}", Backbone)


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

    def predict(
        self,
        *,
        prompt: str,
        images: Sequence[ImageInput],
        top_k: int = 5,
    ) -> list[list[Prediction]]:
        """Per image, the top-k classes. Images: paths, bytes, PIL images or http(s) URLs (the server
        fetches those). Retried like any read: predicting has no side effect."""
        r = self._t.request("POST", "/v1/predict", idempotent=True, **predict_request(prompt, images, top_k))
        return predictions(r.json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
