"""The light client against the real app: models match the server's OpenAPI, typed errors, retries (a real
429 from the rate limiter), idempotent job creation, paging, the async client, and the SSE watch."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import actprompt
import httpx
import pytest
from actprompt import APIConnectionError, AsyncClient, Client, NotFoundError, RateLimitError
from pydantic import BaseModel

from service.api.main import create_app
from tests.api.conftest import Api
from tests.api.test_files import folder_zip

#: client model -> the server's response schema it mirrors
MODELS: dict[type[BaseModel], str] = {
    actprompt.File: "FilePublic",
    actprompt.Job: "JobPublic",
    actprompt.JobEvent: "JobEventPublic",
    actprompt.Prompt: "PromptPublic",
    actprompt.Evaluation: "EvaluationPublic",
    actprompt.Backbone: "BackbonePublic",
    actprompt.Prediction: "PredictionPublic",
    actprompt.Progress: "Progress",
    actprompt.Tenant: "TenantPublic",
    actprompt.TenantCreated: "TenantCreated",
    actprompt.ApiKey: "KeyPublic",
    actprompt.ApiKeyCreated: "KeyCreated",
}


def _client(api: Api, headers: dict[str, str], **kwargs: Any) -> Client:
    api.client.headers.update(headers)
    return Client(base_url="http://testserver", http_client=api.client, **kwargs)


@pytest.mark.parametrize("model", list(MODELS), ids=lambda m: m.__name__)
def test_models_match_openapi(model: type[BaseModel], sqlite_url: str, tmp_path) -> None:
    from tests.api.conftest import settings_for

    schemas = create_app(settings_for(sqlite_url, tmp_path, tmp_path)).openapi()["components"]["schemas"]
    schema = schemas[MODELS[model]]
    served = set(schema["properties"])
    fields = set(model.model_fields)
    assert fields <= served, f"{model.__name__} has fields the server does not send: {fields - served}"
    assert set(schema.get("required", [])) <= fields, (
        f"{model.__name__} misses {set(schema['required']) - fields}"
    )
    ours = model.model_json_schema()["properties"]
    for name in fields:  # every JSON type the server may send, the client accepts
        theirs = _types(schema["properties"][name])
        mine = _types(ours[name])
        assert not mine or theirs <= mine, f"{model.__name__}.{name}: server {theirs}, client {mine}"


def _types(prop: dict[str, Any]) -> set[str]:
    """JSON types a schema property allows (empty = any); a `$ref` or `allOf` counts as an object."""
    if "$ref" in prop or "allOf" in prop:
        return {"object"}
    if "anyOf" in prop:
        return set().union(*(_types(p) for p in prop["anyOf"]))
    kind = prop.get("type")
    if kind is None:
        return set()
    return {kind}


def test_errors_paging_and_idempotent_create(api: Api) -> None:
    t = api.tenant()
    api.tiny_backbone()
    c = _client(api, t)
    with pytest.raises(NotFoundError) as exc:
        c.files.get("file_nope")
    assert (exc.value.status, exc.value.code, exc.value.param) == (404, "file_not_found", "file_id")
    uploaded = [c.files.upload(_zip_file(api, i)) for i in range(3)]
    assert [f.id for f in c.files.list(page_size=2)] == [f.id for f in reversed(uploaded)]  # two pages
    a = c.jobs.create(
        backbone="tiny", dataset=uploaded[0].id, hyperparameters={"epochs": 1}, idempotency_key="k1"
    )
    b = c.jobs.create(
        backbone="tiny", dataset=uploaded[0].id, hyperparameters={"epochs": 1}, idempotency_key="k1"
    )
    assert a.id == b.id
    other = c.jobs.create(backbone="tiny", dataset=uploaded[1].id, hyperparameters={"epochs": 1})
    assert other.id != a.id  # a generated key per call: two calls, two jobs
    assert {j.id for j in c.jobs.list(page_size=1)} == {a.id, other.id}
    final = c.jobs.wait(a.id, poll=0.1)
    assert final.status == "succeeded", final
    events = list(c.jobs.watch(a.id))
    assert events[-1].type == "end" and events[-1].data == {"status": "succeeded"}
    assert [e.id for e in events[:-1]] == [e.id for e in c.jobs.events(a.id)]


def _zip_file(api: Api, i: int):
    path = api.settings.var_dir / f"d{i}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(folder_zip(4, seed=i))
    return path


def test_rate_limited_calls_are_retried(make_api) -> None:
    api = make_api(rate_limit_per_second=1.0, rate_limit_burst=1)
    t = api.tenant()
    png = folder_zip(1)  # any bytes: the rate limit answers before the prompt is looked up
    no_retry = _client(api, t, max_retries=0)
    with pytest.raises(NotFoundError):
        no_retry.predict(prompt="prm_nope", images=[png])
    with pytest.raises(RateLimitError) as limited:
        no_retry.predict(prompt="prm_nope", images=[png])
    assert (
        limited.value.status == 429
        and limited.value.retry_after is not None
        and limited.value.retry_after >= 1
    )
    retrying = _client(api, t, max_retries=3)
    with pytest.raises(NotFoundError):  # waited Retry-After, tried again, got through the limiter
        retrying.predict(prompt="prm_nope", images=[png])


def test_connection_errors_are_typed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Client(base_url=f"http://127.0.0.1:{port}", api_key="k", max_retries=1)
    with pytest.raises(APIConnectionError):
        c.jobs.get("job_x")
    with pytest.raises(APIConnectionError):
        c.evaluations.create(prompt="prm_x", dataset="file_x")


def test_async_client(api: Api) -> None:
    t = api.tenant()
    api.tiny_backbone()

    async def run() -> None:
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api.client.app), base_url="http://t", headers=t
        )
        async with AsyncClient(http_client=http) as c:
            f = await c.files.upload(_zip_file(api, 9))
            assert (await c.files.get(f.id)).sha256 == f.sha256
            job = await c.jobs.create(backbone="tiny", dataset=f.id, hyperparameters={"epochs": 1})
            assert [j.id async for j in c.jobs.list()] == [job.id]
            final = await c.jobs.wait(job.id, poll=0.1)
            assert final.status == "succeeded"
            events = [e async for e in c.jobs.watch(job.id)]
            assert events[-1].type == "end" and len(events) > 2
            with pytest.raises(NotFoundError):
                await c.evaluations.get("eval_nope")
            assert [b.id for b in await c.backbones.list()] == ["tiny"]

    asyncio.run(run())
