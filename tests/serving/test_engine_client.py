"""A front's engine client against an engine that answers heartbeats but never a request.

The real engine cannot be made to hang on demand, so a ZeroMQ ROUTER speaking its wire protocol stands in:
it answers every ``ping`` with ``pong`` (so the heartbeat keeps the engine up) and swallows everything else,
which is what a front sees when a forward pass never returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import pytest
import torch
import zmq
import zmq.asyncio

from service.engine import BackboneSpec
from service.serving import metrics
from service.serving.client import EngineClient
from service.serving.engine_server import EngineServer
from service.serving.errors import EngineReplyTimeoutError
from service.serving.transport import decode, encode


async def _mute_engine(sock: zmq.asyncio.Socket, seen: list[str]) -> None:
    while True:
        identity, *frames = await sock.recv_multipart()
        header, _ = decode(frames)
        seen.append(str(header["op"]))
        if header["op"] == "ping":
            await sock.send_multipart([identity, *encode({"id": header["id"], "op": "pong"})])


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_a_request_the_engine_never_answers_fails_with_503_at_the_ceiling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"ipc://{tmp_path}/engine.sock"
    timeouts = metrics.ENGINE_REPLY_TIMEOUTS.labels(op="predict")

    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        engine = ctx.socket(zmq.ROUTER)
        engine.setsockopt(zmq.LINGER, 0)
        engine.bind(endpoint)
        seen: list[str] = []
        serving = asyncio.ensure_future(_mute_engine(engine, seen))
        client = EngineClient(endpoint, timeout_s=0.4, reply_timeout_s=0.8)
        await client.start()
        try:
            assert await client.wait_alive(5.0)
            before = timeouts._value.get()
            started = time.monotonic()
            with pytest.raises(EngineReplyTimeoutError) as raised:
                predict = client.predict(BackboneSpec("resnet20_cifar"), ["k"], torch.zeros(1, 3, 32, 32))
                await asyncio.wait_for(predict, 5.0)  # a client with no ceiling fails here (TimeoutError)
            waited = time.monotonic() - started
            assert 0.7 < waited < 3.0, waited
            assert raised.value.status == 503 and raised.value.code == "engine_timeout"
            assert raised.value.retry_after_s > 0
            assert "predict" in seen  # the request reached the engine; it just never came back
            assert client.alive  # heartbeats still answered: the engine is not marked down
            assert timeouts._value.get() == before + 1
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert any("no reply from the engine" in m for m in errors), errors
        finally:
            await client.aclose()
            serving.cancel()
            engine.close()
            ctx.term()

    with caplog.at_level(logging.ERROR, logger="service.serving.client"):
        asyncio.run(scenario())


class _StuckCore:
    """An engine core whose forward pass never returns (the fault the stall watchdog is for)."""

    async def predict(self, *args: object, **kwargs: object) -> list[object]:
        await self._never_returning_pass()
        return []

    async def _never_returning_pass(self) -> None:
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        pass


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_a_request_stuck_in_the_engine_logs_where_it_is_stuck(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"ipc://{tmp_path}/engine.sock"

    async def scenario() -> None:
        server = EngineServer(_StuckCore(), endpoint, stall_s=0.3)  # type: ignore[arg-type]
        serving = asyncio.ensure_future(server.serve())
        client = EngineClient(endpoint, timeout_s=2.0, reply_timeout_s=1.5)
        await client.start()
        try:
            assert await client.wait_alive(5.0)
            with pytest.raises(EngineReplyTimeoutError):
                predict = client.predict(BackboneSpec("resnet20_cifar"), ["k"], torch.zeros(1, 3, 32, 32))
                await asyncio.wait_for(predict, 5.0)
        finally:
            await client.aclose()
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving

    with caplog.at_level(logging.ERROR, logger="service.serving.engine_server"):
        asyncio.run(scenario())
    stalls = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(stalls) == 1, stalls  # once per stalled request, not once per check
    assert "predict" in stalls[0] and "_never_returning_pass" in stalls[0]
    assert "--- thread MainThread" in stalls[0]
