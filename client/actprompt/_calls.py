"""What each public method of the clients sends and how its answer is read, written once.

`Client` and `AsyncClient` only execute these descriptions (one blocking, one awaiting), so a route, a
parameter or a parsing rule cannot drift between the two. Nothing here does I/O or sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import httpx
from httpx_sse import ServerSentEvent
from pydantic import BaseModel

from actprompt._base import (
    ImageInput,
    RetryPolicy,
    event_from_sse,
    is_retryable_error,
    new_idempotency_key,
    predict_request,
    predictions,
    raise_for,
    retry_after,
)
from actprompt._errors import APIConnectionError, APIError
from actprompt.states import TERMINAL_JOB_STATES
from actprompt.types import (
    ApiKey,
    ApiKeyCreated,
    Backbone,
    Evaluation,
    File,
    Job,
    JobEvent,
    Page,
    Prediction,
    Prompt,
    Tenant,
    TenantCreated,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


# --- how a call is described ------------------------------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request (retried when `idempotent`) and how its answer becomes the method's result."""

    method: str
    path: str
    idempotent: bool
    parse: Callable[[httpx.Response], T]
    #: httpx request arguments: params, json, data, files, headers
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Listing(Generic[M]):
    """A cursor-paginated listing: every item, fetching the next page when this one runs out."""

    path: str
    model: type[M]
    params: Mapping[str, Any]

    def first(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if v is not None}

    def page(self, response: httpx.Response, params: dict[str, Any]) -> tuple[list[M], dict[str, Any] | None]:
        """The items of one page and the parameters of the next (None: this was the last)."""
        page = Page[self.model].model_validate(response.json())  # type: ignore[name-defined]
        if not page.has_more or not page.next_cursor:
            return list(page.data), None
        return list(page.data), {**params, "after": page.next_cursor}


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate(response.json())


def _nothing(_response: httpx.Response) -> None:
    return None


def _read(model: type[M], path: str) -> Call[M]:
    return Call("GET", path, True, _model(model))


# --- retries ------------------------------------------------------------------------------------------


class Attempts:
    """The retry decisions of one call; the clients only send and sleep the delays this returns."""

    def __init__(self, method: str, path: str, idempotent: bool, retry: RetryPolicy) -> None:
        self.method, self.path, self.idempotent, self.retry = method, path, idempotent, retry
        self.attempt = 0

    def after_transport_error(self, exc: httpx.TransportError) -> float:
        """Seconds to wait before trying again; raises when the call may not or need not be retried."""
        if not self.idempotent or self.attempt >= self.retry.max_retries:
            raise APIConnectionError(f"{self.method} {self.path}: {exc}") from exc
        return self._next(None)

    def after_response(self, response: httpx.Response) -> float | None:
        """None: the response is the answer. Else seconds to wait before trying again; raises on an error."""
        try:
            raise_for(response)
        except APIError as err:
            if self.idempotent and is_retryable_error(err) and self.attempt < self.retry.max_retries:
                return self._next(retry_after(response))
            raise
        return None

    def _next(self, retry_after: float | None) -> float:
        delay = self.retry.delay(self.attempt, retry_after)
        self.attempt += 1
        return delay


# --- live events --------------------------------------------------------------------------------------


class Watch:
    """The state of `jobs.watch`: resumes with Last-Event-ID, reconnects a bounded number of times."""

    def __init__(self, job_id: str, after: int | None, max_reconnects: int, retry: RetryPolicy) -> None:
        self.job_id, self.last, self.max_reconnects, self.retry = job_id, after, max_reconnects, retry
        self.failures = 0
        self.ended = False

    def request(self) -> dict[str, Any]:
        """Arguments of `http.stream(...)` for the next connection."""
        headers = {"Accept": "text/event-stream"}
        if self.last is not None:
            headers["Last-Event-ID"] = str(self.last)
        return {
            "method": "GET",
            "url": f"/v1/jobs/{self.job_id}/events",
            "headers": headers,
            # (connect, read, write, pool) as a plain tuple: any httpx-compatible client takes it (Starlette's
            # TestClient is built on httpx2, whose Timeout refuses httpx's), and read waits past the heartbeat
            "timeout": (60.0, 90.0, 60.0, 60.0),
        }

    def receive(self, sse: ServerSentEvent) -> JobEvent:
        """The event one SSE message carries (httpx-sse frames them); the `end` event sets `ended`."""
        event = event_from_sse(sse.event, sse.data)
        if event.type == "end":
            self.ended = True
        else:
            self.last, self.failures = event.id, 0
        return event

    def dropped(self, exc: httpx.TransportError) -> float:
        """Seconds to wait before reconnecting after a connection error; raises past `max_reconnects`."""
        self.failures += 1
        if self.failures > self.max_reconnects:
            raise APIConnectionError(f"watch {self.job_id}: {exc}") from exc
        return self.retry.delay(min(self.failures, 4), None)

    def closed_early(self) -> float:
        """The server closed the stream without `end` (a proxy timeout, a restart): wait, then resume."""
        self.failures += 1
        if self.failures > self.max_reconnects:
            raise APIConnectionError(f"watch {self.job_id}: the stream kept closing early")
        return self.retry.delay(0, None)


# --- files --------------------------------------------------------------------------------------------


@contextmanager
def upload_file(file: str | Path | IO[bytes], filename: str | None) -> Iterator[Call[File]]:
    """The upload call; a path is opened (and closed after the call) so it is streamed, not read whole."""
    if isinstance(file, str | Path):
        path = Path(file)
        with path.open("rb") as fh:
            yield _upload(fh, filename or path.name)
    else:
        yield _upload(file, filename or Path(getattr(file, "name", "upload.zip")).name)


def _upload(fh: IO[bytes], filename: str) -> Call[File]:
    return Call("POST", "/v1/files", False, _model(File), {"files": {"file": (filename, fh)}})


def list_files(page_size: int) -> Listing[File]:
    return Listing("/v1/files", File, {"limit": page_size})


def get_file(file_id: str) -> Call[File]:
    return _read(File, f"/v1/files/{file_id}")


def delete_file(file_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/files/{file_id}", True, _nothing)


# --- jobs ---------------------------------------------------------------------------------------------


def create_job(
    *,
    backbone: str,
    dataset: str,
    prompt_layer: Any,
    method: str | None,
    prompt_shape: str | None,
    method_options: Mapping[str, Any] | None,
    hyperparameters: Mapping[str, Any] | None,
    name: str | None,
    metadata: Mapping[str, Any] | None,
    prompt_id: str | None,
    idempotency_key: str | None,
) -> Call[Job]:
    """Always with an Idempotency-Key (generated when none is given): a retried create is one job."""
    body: dict[str, Any] = {"backbone": backbone, "dataset_uri": dataset}
    optional = {
        "prompt_layer": prompt_layer,
        "method": method,
        "prompt_shape": prompt_shape,
        "method_options": dict(method_options) if method_options is not None else None,
        "hyperparameters": dict(hyperparameters) if hyperparameters is not None else None,
        "name": name,
        "metadata": dict(metadata) if metadata is not None else None,
        "prompt_id": prompt_id,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    key = idempotency_key or new_idempotency_key()
    options = {"json": body, "headers": {"Idempotency-Key": key}}
    return Call("POST", "/v1/jobs", True, _model(Job), options)


def get_job(job_id: str) -> Call[Job]:
    return _read(Job, f"/v1/jobs/{job_id}")


def list_jobs(status: str | None, page_size: int) -> Listing[Job]:
    return Listing("/v1/jobs", Job, {"status": status, "limit": page_size})


def cancel_job(job_id: str) -> Call[Job]:
    return Call("POST", f"/v1/jobs/{job_id}/cancel", True, _model(Job))


def job_events(job_id: str, after: int | None) -> Listing[JobEvent]:
    return Listing(f"/v1/jobs/{job_id}/events", JobEvent, {"after": after, "limit": 500})


def job_final(job: Job) -> bool:
    return job.status in TERMINAL_JOB_STATES


# --- prompts ------------------------------------------------------------------------------------------


def list_prompts(page_size: int) -> Listing[Prompt]:
    return Listing("/v1/prompts", Prompt, {"limit": page_size})


def get_prompt(prompt: str) -> Call[Prompt]:
    return _read(Prompt, f"/v1/prompts/{prompt}")


#: Download formats: the product's artifact (safetensors), or a LoRA prompt as a zipped PEFT adapter folder.
DOWNLOAD_FORMATS = {"artifact": "artifact", "peft": "peft"}


def download_prompt(prompt: str, path: str | Path, fmt: str = "artifact") -> Call[Path]:
    if fmt not in DOWNLOAD_FORMATS:
        raise ValueError(f"format must be one of {', '.join(DOWNLOAD_FORMATS)}, got {fmt!r}")

    def write(response: httpx.Response) -> Path:
        target = Path(path)
        target.write_bytes(response.content)
        return target

    return Call("GET", f"/v1/prompts/{prompt}/{DOWNLOAD_FORMATS[fmt]}", True, write)


@contextmanager
def import_adapter(
    path: str | Path,
    *,
    backbone: str,
    classes: Sequence[str] | None,
    name: str | None,
    prompt_id: str | None,
) -> Iterator[Call[Prompt]]:
    """A PEFT LoRA adapter (a zip of its folder, or the folder itself) imported as a prompt version."""
    import io
    import zipfile

    source = Path(path)
    if source.is_dir():
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for member in ("adapter_config.json", "adapter_model.safetensors"):
                zf.write(source / member, member)
        fh: IO[bytes] = io.BytesIO(buf.getvalue())
    else:
        fh = source.open("rb")
    form = {"backbone": backbone, "classes": ",".join(classes) if classes else None, "name": name}
    form["prompt_id"] = prompt_id
    data = {k: v for k, v in form.items() if v is not None}
    try:
        files = {"artifact": (f"{source.name}.zip" if source.is_dir() else source.name, fh)}
        yield Call("POST", "/v1/prompts", False, _model(Prompt), {"files": files, "data": data})
    finally:
        fh.close()


def delete_prompt(prompt: str) -> Call[None]:
    return Call("DELETE", f"/v1/prompts/{prompt}", True, _nothing)


# --- evaluations --------------------------------------------------------------------------------------


def create_evaluation(prompt: str, dataset: str) -> Call[Evaluation]:
    options = {"json": {"prompt": prompt, "dataset_uri": dataset}}
    return Call("POST", "/v1/evaluations", False, _model(Evaluation), options)


def get_evaluation(evaluation_id: str) -> Call[Evaluation]:
    return _read(Evaluation, f"/v1/evaluations/{evaluation_id}")


def list_evaluations(status: str | None, page_size: int) -> Listing[Evaluation]:
    return Listing("/v1/evaluations", Evaluation, {"status": status, "limit": page_size})


def evaluation_final(evaluation: Evaluation) -> bool:
    return evaluation.done


# --- backbones and predict ----------------------------------------------------------------------------


def list_backbones() -> Listing[Backbone]:
    return Listing("/v1/backbones", Backbone, {"limit": 100})


def get_backbone(backbone_id: str) -> Call[Backbone]:
    return _read(Backbone, f"/v1/backbones/{backbone_id}")


def create_backbone(backbone_id: str, model: str, weights: str, options: Mapping[str, Any]) -> Call[Backbone]:
    """Not retried (a lost answer would make the retry a 409 `backbone_exists`)."""
    body = {"id": backbone_id, "model": model, "weights": weights}
    body.update({k: v for k, v in options.items() if v is not None})
    return Call("POST", "/v1/backbones", False, _model(Backbone), {"json": body})


def delete_backbone(backbone_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/backbones/{backbone_id}", True, _nothing)


# --- tenants and keys (the admin key; a tenant key with the `admin` scope for its own keys) --------------


def create_tenant(name: str) -> Call[TenantCreated]:
    """Not retried: a second try would create a second tenant."""
    return Call("POST", "/v1/tenants", False, _model(TenantCreated), {"json": {"name": name}})


def list_tenants(page_size: int) -> Listing[Tenant]:
    return Listing("/v1/tenants", Tenant, {"limit": page_size})


def get_tenant(tenant_id: str) -> Call[Tenant]:
    return _read(Tenant, f"/v1/tenants/{tenant_id}")


def create_key(tenant_id: str, name: str | None, scopes: Sequence[str] | None) -> Call[ApiKeyCreated]:
    """Not retried: a second try would issue a second key. Without `scopes`, the key holds all four."""
    body: dict[str, Any] = {"name": name}
    if scopes is not None:
        body["scopes"] = list(scopes)
    return Call("POST", f"/v1/tenants/{tenant_id}/keys", False, _model(ApiKeyCreated), {"json": body})


def list_keys(tenant_id: str) -> Listing[ApiKey]:
    return Listing(f"/v1/tenants/{tenant_id}/keys", ApiKey, {})


def revoke_key(key_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/keys/{key_id}", True, _nothing)


def predict(prompt: str, images: Sequence[ImageInput], top_k: int) -> Call[list[list[Prediction]]]:
    """Retried like any read: predicting has no side effect."""
    return Call(
        "POST",
        "/v1/predict",
        True,
        lambda response: predictions(response.json()),
        predict_request(prompt, images, top_k),
    )
