"""Admission control: the fair queue's order, the work-bounded budget, deadlines, and the wire format."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import torch

from service.engine import Backbone, BackboneSpec, EngineError
from service.engine.artifacts import PromptArtifact
from service.engine.mixed_batch import predict_single
from service.serving.admission import Admission, FairQueue
from service.serving.cache import MemorySource
from service.serving.core import EngineCore, ServingConfig
from service.serving.errors import DeadlineExceededError, OverloadedError, PromptNotFoundError
from service.serving.transport import decode, encode, error_from_wire, error_to_wire


def test_fair_queue_serves_tenants_in_turn_whatever_their_share() -> None:
    """A tenant with 90 % of the queued rows gets its quantum per turn; the others are not behind it."""
    q: FairQueue[str] = FairQueue(quantum=2)
    for i in range(18):
        q.put("heavy", f"h{i}", 1)
    q.put("light", "l0", 1)
    q.put("light", "l1", 1)
    order = [q.get_nowait() for _ in range(20)]
    assert q.get_nowait() is None
    # heavy's first turn (2 rows), then light's whole backlog, long before heavy's 18 rows are done
    assert order.index("l1") <= 4, order
    assert [o for o in order if o and o.startswith("h")] == [f"h{i}" for i in range(18)]  # FIFO per tenant


def test_fair_queue_charges_rows_not_requests() -> None:
    """A 16-row request costs its tenant 16 rows of turns: one-row requests of others pass it meanwhile."""
    q: FairQueue[str] = FairQueue(quantum=4)
    q.put("big", "B", 16)
    for i in range(6):
        q.put("small", f"s{i}", 1)
    order = [q.get_nowait() for _ in range(7)]
    assert order.index("B") >= 4, order


def test_admission_refuses_past_the_budget_and_always_admits_an_idle_engine() -> None:
    adm = Admission(budget_s=0.1, initial_row_s=0.01)
    big = adm.admit("a", 50)  # 0.5 s of work, but nothing is ahead: admitted
    with pytest.raises(OverloadedError) as refused:
        adm.admit("a", 1)  # 50 rows ahead x 10 ms = 0.5 s > 0.1 s
    assert refused.value.retry_after_s >= 1 and refused.value.status == 503
    assert refused.value.code == "overloaded"
    # another tenant waits at most its own rows' worth of a's backlog (fair share): admitted
    small = adm.admit("b", 1)
    assert adm.expected_wait_s("b", 1) == pytest.approx(0.01 * (1 + 2))
    adm.release(big)
    adm.release(small)
    assert adm.rows == 0
    adm.admit("a", 5)  # room again


def test_admission_learns_the_cost_of_a_pass_from_measured_passes() -> None:
    adm = Admission(budget_s=1.0, initial_row_s=0.5, smoothing=0.5)
    for _ in range(20):
        adm.observe(64, 0.064)  # one batch size: 1 ms a row
    assert adm.row_s == pytest.approx(0.001, rel=1e-3) and adm.pass_s == 0
    for _ in range(10):  # 20 ms a pass + 0.5 ms a row: quiet single rows do not price a burst at 20 ms/row
        adm.observe(1, 0.0205)
        adm.observe(64, 0.052)
    assert adm.row_s == pytest.approx(0.0005, rel=1e-2) and adm.pass_s == pytest.approx(0.02, rel=1e-2)
    adm.admit("a", 128)
    assert adm.expected_wait_s("a", 1) == pytest.approx(2 * 0.02 + 128 * 0.0005, rel=1e-2)


def test_a_burst_after_quiet_single_rows_is_not_priced_a_pass_per_row() -> None:
    adm = Admission(budget_s=0.5, batch_rows=64, initial_row_s=0.01)
    for _ in range(20):
        adm.observe(1, 0.02)  # only single-row passes so far, 20 ms each
    assert adm.pass_s + adm.row_s == pytest.approx(0.02)  # what was measured is still what a row costs
    adm.admit("a", 32)
    adm.admit("a", 32)
    adm.admit("a", 32)  # 64 rows ahead: a pass or two, not 64 x 20 ms = 1.3 s
    assert adm.expected_wait_s("a", 32) < 0.1


def test_admission_refuses_a_deadline_it_cannot_meet() -> None:
    now = [100.0]
    adm = Admission(budget_s=10.0, initial_row_s=0.01, clock=lambda: now[0])
    adm.admit("a", 20)  # 0.2 s ahead of a's next request
    with pytest.raises(DeadlineExceededError) as late:
        adm.admit("a", 1, deadline=100.1)
    assert late.value.status == 504
    adm.admit("a", 1, deadline=101.0)
    adm.admit("b", 1, deadline=100.1)  # b waits for one of a's rows only (fair share)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # [n, 3, 32, 32]


def test_engine_under_a_burst_refuses_the_excess_and_answers_the_rest_exactly(
    resnet20_spec: BackboneSpec, resnet20: Backbone, make_artifact: Callable[..., PromptArtifact]
) -> None:
    """Offered work far above a 30 ms budget: some requests are refused at once (none waits long), and
    every admitted one equals per-row scoring."""
    arts = {f"p{i}": make_artifact(i) for i in range(4)}
    source = MemorySource({k: a.to_bytes() for k, a in arts.items()})
    requests = [(f"p{i % 4}", _images(8, seed=i)) for i in range(40)]

    async def run() -> None:
        core = EngineCore(source, ServingConfig(max_wait_ms=2, queue_budget_ms=30))
        try:
            await core.predict(
                resnet20_spec, ["p0"], _images(8, 99)
            )  # warm: backbone loaded, row cost learnt
            outs = await asyncio.gather(
                *(core.predict(resnet20_spec, [k], x, tenant_id="t") for k, x in requests),
                return_exceptions=True,
            )
        finally:
            await core.aclose()
        refused = [o for o in outs if isinstance(o, OverloadedError)]
        served = [(r, o) for r, o in zip(requests, outs, strict=True) if not isinstance(o, BaseException)]
        assert refused and served, outs
        assert len(refused) + len(served) == len(requests)
        for (key, x), (out,) in served:
            expected = torch.softmax(predict_single(resnet20, arts[key], x), dim=1)
            torch.testing.assert_close(out.probabilities, expected, atol=1e-5, rtol=0)

    asyncio.run(run())


def test_rows_whose_deadline_passed_in_the_queue_are_dropped_before_compute(
    resnet20_spec: BackboneSpec, make_artifact: Callable[..., PromptArtifact]
) -> None:
    """Admitted (admission believes rows are nearly free), then queued behind a long pass: the deadline
    passes in the queue and the rows are dropped, not computed."""
    source = MemorySource({"p": make_artifact(0).to_bytes(), "q": make_artifact(1).to_bytes()})

    async def run() -> None:
        core = EngineCore(source, ServingConfig(max_wait_ms=1, queue_budget_ms=60_000))
        try:
            await core.predict(resnet20_spec, ["p", "q"], _images(1, 0))
            srv = await core.server(resnet20_spec)
            srv.admission.row_s, srv.admission.pass_s = 1e-9, 0.0
            busy = asyncio.ensure_future(core.predict(resnet20_spec, ["p", "q"], _images(64, 1)))
            await asyncio.sleep(0)  # the long request is queued first
            with pytest.raises(DeadlineExceededError):
                await core.predict(resnet20_spec, ["p"], _images(1, 2), deadline=time.time() + 0.02)
            await busy
            assert srv.admission.refused == 0 and srv.batcher.stats.expired == 1
            assert srv.batcher.stats.rows == 2 + 128  # nothing computed for it
            with pytest.raises(DeadlineExceededError):  # already past: refused at admission
                await core.predict(resnet20_spec, ["p"], _images(1, 3), deadline=time.time() - 1)
            assert srv.admission.refused == 1
        finally:
            await core.aclose()

    asyncio.run(run())


def test_wire_round_trip_keeps_tensors_and_typed_errors() -> None:
    x = torch.randn(3, 3, 8, 8)
    header, (y,) = decode(encode({"op": "predict", "keys": ["a"]}, [x]))
    assert header["op"] == "predict" and header["keys"] == ["a"]
    assert torch.equal(x, y)
    for exc in (
        OverloadedError("busy", retry_after_s=3),
        PromptNotFoundError("gone"),
        DeadlineExceededError("late"),
        EngineError("wrong backbone", code="artifact_backbone_mismatch", param="prompt"),
    ):
        back = error_from_wire(error_to_wire(exc))
        assert (type(back), back.code, back.status, back.param) == (
            type(exc),
            exc.code,
            exc.status,
            exc.param,
        )
        assert getattr(back, "retry_after_s", None) == getattr(exc, "retry_after_s", None)
