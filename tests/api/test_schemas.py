"""One source of truth: the API's job schema comes from the engine's configs and the method registry."""

from __future__ import annotations

import json

from sqlalchemy import update

from service.api.schemas.jobs import Hyperparameters, JobCreate
from service.db.models import Job
from service.db.session import make_engine, make_session_factory
from service.domain.jobs import METADATA_MAX_BYTES, METADATA_MAX_DEPTH
from service.engine.methods import PROMPT_SHAPES, list_methods
from service.engine.pipeline import SplitSpec
from service.engine.train import OPTIMIZERS, TrainConfig
from tests.api.conftest import Api


def test_api_defaults_are_the_engines() -> None:
    api, engine = Hyperparameters(), TrainConfig()
    for name in Hyperparameters.model_fields:
        if name == "val_fraction":
            assert api.val_fraction == SplitSpec().val_fraction
        else:
            assert getattr(api, name) == getattr(engine, name), name


def test_openapi_lists_the_registry_and_the_bounds(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    props = spec["components"]["schemas"]["JobCreate"]["properties"]
    assert props["method"]["enum"] == [*list_methods(servable_only=True), "auto"]
    assert props["prompt_shape"]["enum"] == list(PROMPT_SHAPES)
    hp = spec["components"]["schemas"]["Hyperparameters"]["properties"]
    assert hp["optimizer"]["enum"] == list(OPTIMIZERS)
    lists = [alt for alt in props["prompt_layer"]["anyOf"] if alt.get("type") == "array"]
    assert lists and lists[0]["minItems"] == 1
    assert JobCreate.model_fields["method"].default == "activation"


def _deep(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_metadata_is_bounded_and_a_stored_row_never_breaks_a_list(api: Api) -> None:
    api.tiny_backbone()
    t = api.tenant()
    post = lambda **kw: api.client.post("/v1/jobs", json=api.job_body(**kw), headers=t)  # noqa: E731
    deep = post(metadata=_deep(300))
    assert deep.status_code == 422 and deep.json()["error"]["param"] == "metadata"
    assert f"deeper than {METADATA_MAX_DEPTH}" in deep.json()["error"]["message"]
    big = post(metadata={"x": "a" * (METADATA_MAX_BYTES + 1)})
    assert big.status_code == 422 and str(METADATA_MAX_BYTES) in big.json()["error"]["message"]
    many = post(metadata={f"k{i}": i for i in range(300)})
    assert many.status_code == 422 and "keys" in many.json()["error"]["message"]
    assert api.client.get("/v1/jobs", headers=t).json()["data"] == []  # none of them was stored
    ok = post(metadata=_deep(METADATA_MAX_DEPTH))
    assert ok.status_code == 202, ok.text
    # a row stored before the bounds existed: listing still works and says why it is not shown
    engine = make_engine(api.settings.database_url)
    with make_session_factory(engine)() as s:
        s.execute(update(Job).where(Job.id == ok.json()["id"]).values(metadata_=_deep(300)))
        s.commit()
    engine.dispose()
    listed = api.client.get("/v1/jobs", headers=t)
    assert listed.status_code == 200, listed.text
    (row,) = listed.json()["data"]
    assert "_unavailable" in row["metadata"] and json.dumps(row)


def test_options_that_do_not_apply_are_refused_at_submission(api: Api) -> None:
    api.tiny_backbone()
    t = api.tenant()
    r = api.client.post("/v1/jobs", json=api.job_body(method="linear", prompt_shape="channel"), headers=t)
    assert r.status_code == 422, r.text
    assert (
        r.json()["error"]["code"] == "option_not_applicable" and r.json()["error"]["param"] == "prompt_shape"
    )


def test_openapi_documents_readiness_and_metrics(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    ready = paths["/readyz"]["get"]["responses"]
    assert ready["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/NotReady")
    assert ready["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Ready")
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    served = api.client.get("/metrics").headers["content-type"]
    assert list(metrics) == [served]


def test_a_methods_default_prompt_layer_applies_at_submission(api: Api) -> None:
    from service.engine.methods import get_method_class

    api.tiny_backbone()
    t = api.tenant()
    deep = [m for m in list_methods(servable_only=True) if get_method_class(m).default_prompt_layer == "all"]
    assert deep  # deep_activation_norm
    blocks = [layer["index"] for layer in api.tiny_backbone()["layers"] if layer["kind"] == "block"]
    for method in deep:
        r = api.client.post("/v1/jobs", json=api.job_body(method=method), headers=t)
        assert r.status_code == 202, r.text
        assert r.json()["resolved_layers"] == blocks, method
