"""`Client` and `AsyncClient` against one scripted server: the same calls send the same requests and
give the same results, including what the real app rarely shows (a stream closed early or dropped and
resumed with Last-Event-ID, a 503 retried on a read but not on a create, a two-page listing, a download,
a prediction by URL). The server validates every request body with the real server's own schemas."""

from __future__ import annotations

import asyncio
import email
import email.policy
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from actprompt import AsyncClient, Client, ServiceUnavailableError
from actprompt._base import RetryPolicy
from pydantic import BaseModel

from service.api.schemas.evaluations import EvaluationCreate
from service.api.schemas.predict import LIST_FIELDS, PredictRequest

M = TypeVar("M", bound=BaseModel)
NOW = "2024-01-01T00:00:00Z"


def _job(status: str) -> dict[str, Any]:
    return {
        "id": "job_1", "status": status, "backbone": "b", "dataset_uri": "file_1", "method": "pad",
        "prompt_shape": "full", "hyperparameters": {}, "created_at": NOW, "updated_at": NOW,
    }  # fmt: skip


def _evaluation(status: str) -> dict[str, Any]:
    return {"id": "ev_1", "status": status, "prompt": "p", "dataset_uri": "file_1", "created_at": NOW}


def _prompt(i: int) -> dict[str, Any]:
    return {
        "id": f"prm_{i}", "version": 1, "ref": f"prm_{i}@1", "backbone": "b", "method": "pad",
        "prompt_layer": [0], "classes": ["a"], "size_bytes": 1, "sha256": "x", "created_at": NOW,
    }  # fmt: skip


SSE_HEADERS = {"Content-Type": "text/event-stream"}


def _sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return "".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in events).encode()


class ScriptedServer:
    """Answers by route; `log` keeps (method, path and query, Last-Event-ID) of every request."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str | None]] = []
        self.watch_connections = 0
        self.evaluation_reads = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        target = url.path + (f"?{url.query.decode()}" if url.query else "")
        self.log.append((request.method, target, request.headers.get("last-event-id")))
        route = (request.method, url.path)
        if route == ("GET", "/v1/jobs/job_1/events"):
            return self._watch()
        if route == ("POST", "/v1/jobs/job_1/cancel"):
            return httpx.Response(200, json=_job("cancelled"))
        if route == ("GET", "/v1/prompts"):
            if "after" not in url.params:
                return httpx.Response(200, json={"data": [_prompt(1)], "has_more": True, "next_cursor": "c1"})
            return httpx.Response(200, json={"data": [_prompt(2)], "has_more": False})
        if route == ("GET", "/v1/prompts/prm_1/artifact"):
            return httpx.Response(200, content=b"artifact-bytes")
        if route == ("DELETE", "/v1/prompts/prm_1"):
            return httpx.Response(204)
        if route == ("GET", "/v1/evaluations/ev_1"):
            self.evaluation_reads += 1
            if self.evaluation_reads == 1:
                return _unavailable()
            return httpx.Response(
                200, json=_evaluation("running" if self.evaluation_reads == 2 else "succeeded")
            )
        if route == ("POST", "/v1/evaluations"):
            _validate(request, EvaluationCreate)
            return _unavailable()
        if route == ("POST", "/v1/predict"):
            body = _validate(request, PredictRequest)
            assert body.images == ["https://x/a.png", b"png"]
            row = [{"label": "a", "index": 0, "probability": 1.0}]
            return httpx.Response(200, json={"predictions": [row] * len(body.images)})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": target}})

    def _watch(self) -> httpx.Response:
        """First connection: two events, then closed without `end`; second: dropped; third: the rest."""
        self.watch_connections += 1
        if self.watch_connections == 1:
            return httpx.Response(
                200,
                content=_sse(*(("progress", {"id": i, "type": "progress"}) for i in (1, 2))),
                headers=SSE_HEADERS,
            )
        if self.watch_connections == 2:
            raise httpx.ConnectError("dropped")
        return httpx.Response(
            200,
            content=_sse(("progress", {"id": 3, "type": "progress"}), ("end", {"status": "succeeded"})),
            headers=SSE_HEADERS,
        )


def _validate(request: httpx.Request, model: type[M]) -> M:
    """The body, validated as the server does: JSON directly, a multipart form field by field."""
    content_type = request.headers["content-type"]
    if not content_type.startswith("multipart/form-data"):
        return model.model_validate_json(request.content)
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + request.content, policy=email.policy.HTTP
    )
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        value = payload if part.get_filename() else payload.decode()
        fields[name] = [*fields.get(name, []), value] if name in LIST_FIELDS else value
    return model.model_validate(fields)


def _unavailable() -> httpx.Response:
    return httpx.Response(
        503, json={"error": {"code": "unavailable", "message": "busy"}}, headers={"Retry-After": "0"}
    )


def _runner(
    kind: str, server: ScriptedServer, loop: asyncio.AbstractEventLoop
) -> tuple[Any, Callable[[Any], Any]]:
    """A client of `kind` and a function that turns a call's result into a plain value (awaited, listed)."""
    transport = httpx.MockTransport(server)
    if kind == "sync":
        client: Any = Client(
            http_client=httpx.Client(transport=transport, base_url="http://t"), max_retries=2
        )
        client._t.retry = RetryPolicy(max_retries=2, initial_delay=0.0)  # no real waiting between tries
        return client, lambda result: list(result) if inspect.isgenerator(result) else result
    client = AsyncClient(
        http_client=httpx.AsyncClient(transport=transport, base_url="http://t"), max_retries=2
    )
    client._t.retry = RetryPolicy(max_retries=2, initial_delay=0.0)

    async def collect(result: Any) -> Any:
        if inspect.isasyncgen(result):
            return [item async for item in result]
        return await result

    return client, lambda result: loop.run_until_complete(collect(result))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_both_clients_send_and_read_the_same(kind: str, tmp_path: Path) -> None:
    server = ScriptedServer()
    loop = asyncio.new_event_loop()
    try:
        _scenario(server, *_runner(kind, server, loop), tmp_path)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _scenario(server: ScriptedServer, c: Any, run: Callable[[Any], Any], tmp_path: Path) -> None:

    events = run(c.jobs.watch("job_1"))
    assert [(e.type, e.id) for e in events] == [("progress", 1), ("progress", 2), ("progress", 3), ("end", 0)]
    assert events[-1].data == {"status": "succeeded"}
    assert [seen[2] for seen in server.log] == [None, "2", "2"]  # resumed after the last event it had

    assert run(c.jobs.cancel("job_1")).status == "cancelled"
    assert [p.id for p in run(c.prompts.list(page_size=1))] == ["prm_1", "prm_2"]
    assert run(c.prompts.download("prm_1", tmp_path / "a.safetensors")).read_bytes() == b"artifact-bytes"
    assert run(c.prompts.delete("prm_1")) is None
    assert run(c.evaluations.wait("ev_1", poll=0)).status == "succeeded"  # a 503, then polled until done
    with pytest.raises(ServiceUnavailableError):
        run(c.evaluations.create(prompt="prm_1", dataset="file_1"))  # a create is never retried
    rows = run(c.predict(prompt="prm_1", images=["https://x/a.png", b"png"], top_k=1))
    assert [[p.label for p in row] for row in rows] == [["a"], ["a"]]

    assert [(method, target) for method, target, _ in server.log[3:]] == [
        ("POST", "/v1/jobs/job_1/cancel"),
        ("GET", "/v1/prompts?limit=1"),
        ("GET", "/v1/prompts?limit=1&after=c1"),
        ("GET", "/v1/prompts/prm_1/artifact"),
        ("DELETE", "/v1/prompts/prm_1"),
        ("GET", "/v1/evaluations/ev_1"),
        ("GET", "/v1/evaluations/ev_1"),
        ("GET", "/v1/evaluations/ev_1"),
        ("POST", "/v1/evaluations"),
        ("POST", "/v1/predict"),
    ]
