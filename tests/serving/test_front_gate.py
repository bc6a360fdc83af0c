"""The front's gate: predicts refused before their body is read, when the front is full or the engine has
just refused the tenant; the engine's refusal reaches the gate through the predictor and the transport."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from service.launch.front import EnginePredictor
from service.serving.errors import OverloadedError
from service.serving.front_gate import FrontGate
from service.serving.transport import error_from_wire, error_to_wire
from tests.fake_clock import Clock
from tests.serving.gateway import Gateway, png_b64


def test_a_full_front_refuses_until_a_place_is_given_back() -> None:
    gate = FrontGate(max_in_flight=2)
    assert gate.enter("a") is None and gate.enter("a") is None
    shed = gate.enter("a")
    assert shed is not None and shed.reason == "front_full" and shed.retry_after_s >= 1
    gate.leave("a")
    assert gate.enter("a") is None


def test_the_adaptive_limit_is_the_answer_rate_times_the_target_time() -> None:
    clock = Clock()
    gate = FrontGate(target_s=0.125, min_in_flight=16, rate_window_s=0.5, clock=clock)
    assert gate.limit == 16  # from rest: the floor, until answers have been counted
    for _ in range(60):  # 400 answers/s for 2.4 s, 16 at a time
        for _ in range(16):
            assert gate.enter("a") is None
        clock.now += 0.04
        for _ in range(16):
            gate.leave("a")
    assert 350 < gate.rate <= 420  # four windows of 400/s, each weighing half
    assert gate.limit == pytest.approx(gate.rate * 0.125, abs=1)  # ~40-50 places: Little's law
    for _ in range(gate.limit):
        assert gate.enter("a") is None
    assert gate.enter("a") is not None  # full at the adaptive limit, not at the floor
    assert FrontGate(target_s=0.125, min_in_flight=16, clock=clock).limit == 16
    assert FrontGate(max_in_flight=5, target_s=0.125).limit == 5  # a fixed limit wins


def test_a_full_front_still_takes_a_quiet_tenant_up_to_its_share() -> None:
    gate = FrontGate(max_in_flight=4)
    for _ in range(4):
        assert gate.enter("flood") is None
    assert gate.enter("flood") is not None  # full, and flood holds every place
    assert gate.enter("quiet") is None  # quiet holds none: its share of a full front is 2
    assert gate.enter("quiet") is None
    assert gate.enter("quiet") is not None  # now it holds its share too
    assert gate.enter(None) is None  # keys this process does not know yet count as one more tenant
    for _ in range(4):
        gate.leave("flood")
    assert gate.in_flight == 3
    assert gate.enter("flood") is None


def test_an_engine_refusal_holds_that_tenant_for_its_excess_and_no_one_else() -> None:
    clock = Clock()
    gate = FrontGate(max_in_flight=0, max_hold_s=0.5, clock=clock)
    gate.engine_refused("flood", 0.2)
    shed = gate.enter("flood")
    assert shed is not None and shed.reason == "tenant_overloaded"
    assert shed.retry_after_s == pytest.approx(0.2)
    assert gate.enter("quiet") is None and gate.enter(None) is None  # unknown keys go to the engine
    clock.now += 0.21
    assert gate.enter("flood") is None
    gate.engine_refused("flood", 30.0)  # capped: the queue may drain faster than estimated
    clock.now += 0.49
    assert gate.enter("flood") is not None
    clock.now += 0.02
    assert gate.enter("flood") is None
    gate.engine_refused("flood", 0.001)  # a hair over: still held for the floor, not for a millisecond
    clock.now += 0.09
    assert gate.enter("flood") is not None
    clock.now += 0.02
    assert gate.enter("flood") is None


def test_the_tenant_map_stays_bounded() -> None:
    clock = Clock()
    gate = FrontGate(max_in_flight=0, max_tenants=3, clock=clock)
    for t in "abc":
        gate.engine_refused(t, 0.1)
    gate.engine_refused("d", 0.1)  # full of live holds: not remembered
    assert gate.enter("d") is None and gate.enter("a") is not None
    clock.now += 1
    gate.engine_refused("d", 0.1)  # expired holds are dropped to make room
    assert gate.enter("d") is not None


def test_the_engines_excess_crosses_the_transport() -> None:
    exc = error_from_wire(error_to_wire(OverloadedError("full", retry_after_s=1.0, excess_s=0.123)))
    assert isinstance(exc, OverloadedError) and exc.excess_s == pytest.approx(0.123)


class _RefusingEngine:
    alive = True

    async def pipelines(self, spec: Any, keys: Any) -> list[Any]:
        raise OverloadedError("full", retry_after_s=1.0, excess_s=0.3)


def test_the_predictor_tells_the_gate_which_tenant_the_engine_refused() -> None:
    told: list[tuple[str, float]] = []
    predictor = EnginePredictor(_RefusingEngine(), on_overloaded=lambda t, s: told.append((t, s)))  # type: ignore[arg-type]
    handle = type("H", (), {"backbone_spec_hash": "h", "backbone_spec": {}, "key": 1, "sha256": "s"})()
    predictor._specs["h"] = object()  # type: ignore[assignment]
    with pytest.raises(OverloadedError):
        asyncio.run(predictor.predict_many([handle], [b""], 1, tenant_id="t1"))  # type: ignore[list-item]
    assert told == [("t1", pytest.approx(0.3))]


def test_a_held_tenant_is_refused_before_its_body_is_read(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(n_tenants=2, per_tenant=1, serving_queue_budget_ms=2000)  # holds of 0.5 to 2 s
    (t0, _), (t1, _) = gw.prompts
    for t, p in gw.prompts:  # each key authenticated once: this process now knows its tenant
        assert gw.predict(t, {"prompt": p, "images": [png_b64(0)]}).status_code == 200
    state = gw.client.app.state  # type: ignore[attr-defined]
    tenant0 = state.authenticator.cached(gw.tenants[t0]["Authorization"].removeprefix("Bearer ")).tenant_id
    state.front_gate.engine_refused(tenant0, 0.4)
    junk = b"{not json"
    r = gw.client.post(
        "/v1/predict", content=junk, headers={**gw.tenants[t0], "Content-Type": "application/json"}
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
    assert r.headers["Retry-After"] == "1"
    # the other tenant's request is read (and its bad body named): the hold is per tenant
    r = gw.client.post(
        "/v1/predict", content=junk, headers={**gw.tenants[t1], "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text


def _sample(metrics_text: str, series: str) -> float:
    """One series' value in a /metrics page (0 when absent)."""
    for line in metrics_text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_full_front_refuses_predicts_before_reading_them(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(n_tenants=1, per_tenant=1, serving_front_max_in_flight=2)
    t, p = gw.prompts[0]
    gate: FrontGate = gw.client.app.state.front_gate  # type: ignore[attr-defined]
    assert gw.predict(t, {"prompt": p, "images": [png_b64(0)]}).status_code == 200
    assert gate.in_flight == 0  # every place given back, on success as on refusal
    tenant = gw.client.app.state.authenticator.cached(gw.tenants[t]["Authorization"].removeprefix("Bearer "))
    for _ in range(2):  # two of this tenant's predicts in progress elsewhere in this process
        assert gate.enter(tenant.tenant_id) is None
    shed_before = _sample(gw.client.get("/metrics").text, 'actprompt_serving_shed_total{reason="front_full"}')
    sent = {**gw.tenants[t], "Content-Type": "application/json", "X-Request-ID": "req-42"}
    access, records = logging.getLogger("actprompt.access"), _Records()
    access.addHandler(records)
    access.setLevel(logging.INFO)
    try:
        refusals = [gw.client.post("/v1/predict", content=b"{not json", headers=sent) for _ in range(3)]
    finally:
        access.removeHandler(records)
        access.setLevel(logging.NOTSET)
    for r in refusals:  # the API's typed error, whole, though written before any middleware
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["param"] is None
        assert "refused before reading the request" in r.json()["error"]["message"]
        assert r.headers["X-Request-ID"] == "req-42" and r.headers["content-type"] == "application/json"
    logged = [rec for rec in records.records if rec.getMessage() == "predicts refused"]
    assert len(logged) == 1 and logged[0].refused == {"front_full": 1}  # the other two: within the second
    assert gw.client.get("/v1/prompts", headers=gw.tenants[t]).status_code == 200  # only predicts are gated
    for _ in range(2):
        gate.leave(tenant.tenant_id)
    assert gw.predict(t, {"prompt": p, "images": [png_b64(1)]}).status_code == 200
    text = gw.client.get("/metrics").text
    assert _sample(text, 'actprompt_serving_shed_total{reason="front_full"}') == shed_before + 3
    assert _sample(text, 'actprompt_http_requests_total{method="POST",route="/v1/predict",status="503"}') == 3


def test_only_a_connection_that_comes_straight_back_waits_for_its_refusal() -> None:
    """A client that ignores Retry-After and re-sends at once gets its next refusals after a pause; the first
    refusal on a connection, another connection's, and one that comes after a while are sent at once."""
    from service.api.shedding import LoadShedding

    clock = Clock()
    gate = FrontGate(max_in_flight=1)
    assert gate.enter(None) is None  # the only place is taken: every predict is refused
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a refused predict must not reach the app")

    shedding = LoadShedding(app, gate=gate, tenant_of=lambda _: None, clock=clock, sleep=sleep)

    def refuse(client: tuple[str, int]) -> bool:
        """Send one predict on `client`'s connection; whether its refusal waited."""
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": [], "client": client}
        before = len(slept)
        asyncio.run(shedding(scope, receive, send))  # type: ignore[arg-type]
        assert sent[0]["status"] == 503
        return len(slept) > before

    a, b = ("10.0.0.1", 5000), ("10.0.0.2", 5000)
    assert not refuse(a)  # first refusal on this connection: at once
    clock.now += 0.001
    assert refuse(a) and refuse(a)  # straight back, twice: each waits
    assert not refuse(b)  # another connection is not held up by a's loop
    clock.now += 0.2
    assert not refuse(a)  # back after a while: at once again
    assert slept == [0.01, 0.01]
