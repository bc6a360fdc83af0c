"""A front's connection to the engine process: requests over ZeroMQ, and failing fast when it is gone.

One DEALER socket per front process, shared by every request of its event loop; replies are matched to
requests by id. The engine counts as *up* from its first answer until either the socket reports the
connection lost (the kernel closes an IPC socket the instant its process dies, so a SIGKILLed engine is
noticed within milliseconds) or nothing, not even a heartbeat, has come back for ``timeout_s``. While it
is down every request in flight and every new one fails at once with :class:`EngineUnavailableError`
(503, ``Retry-After``); nothing waits for an engine that may never answer. When the supervisor has
restarted it, the socket reconnects by itself and the next heartbeat's answer marks it up again.

An engine that answers heartbeats but never one request (a pass that does not return) is the case the
heartbeat cannot see, so every call also has a ceiling, ``reply_timeout_s``: past it the request fails with
:class:`EngineReplyTimeoutError` (503) and an error in the log, instead of holding its client, and a
graceful shutdown, forever. The ceiling sits far above the engine's own bounds (its queue-wait budget plus
the longest pass), so it only ever fires on a fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio
from torch import Tensor
from zmq.utils.monitor import recv_monitor_message

from service.engine import BackboneSpec
from service.engine.preprocessing import Preprocessing
from service.serving import metrics
from service.serving.core import PromptPrediction
from service.serving.errors import EngineReplyTimeoutError, EngineUnavailableError
from service.serving.transport import decode, encode, error_from_wire

log = logging.getLogger(__name__)

__all__ = ["EngineClient"]


class EngineClient:
    """The engine process, seen from a front: the same async calls as an in-process engine."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 2.0,
        heartbeat_s: float | None = None,
        reply_timeout_s: float = 60.0,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.reply_timeout_s = reply_timeout_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else timeout_s / 4
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[Tensor]]]] = {}
        self._up = asyncio.Event()
        self._last_heard = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None

    @property
    def alive(self) -> bool:
        return self._up.is_set()

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for an engine that is not connected
        sock.setsockopt(zmq.SNDHWM, 0)  # so a send fails only for want of a connection, never of room
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        metrics.ENGINE_UP.labels(endpoint=self.endpoint).set(0)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self._sock = sock
        self._tasks = [
            asyncio.ensure_future(self._receive()),
            asyncio.ensure_future(self._heartbeat()),
            asyncio.ensure_future(self._watch(monitor)),
        ]

    async def wait_alive(self, timeout_s: float) -> bool:
        """Whether the engine answered within ``timeout_s`` (start-up: it may still be importing torch)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
        return self.alive

    # -- the engine's calls ------------------------------------------------------------------------------
    async def predict(
        self,
        spec: BackboneSpec,
        keys: Sequence[str],
        x: Tensor,
        *,
        tenant_id: str = "",
        deadline: float | None = None,
    ) -> list[PromptPrediction]:
        header = {
            "op": "predict",
            "spec": spec.to_dict(),
            "keys": list(keys),
            "tenant": tenant_id,
            "deadline": deadline,
        }
        reply, probs = await self._call(header, [x])
        return [
            PromptPrediction(key=k, classes=list(c), probabilities=p)
            for k, c, p in zip(reply["keys"], reply["classes"], probs, strict=True)
        ]

    async def pipelines(self, spec: BackboneSpec, keys: Sequence[str]) -> list[Preprocessing]:
        reply, _ = await self._call({"op": "pipelines", "spec": spec.to_dict(), "keys": list(keys)})
        return [Preprocessing.from_dict(p) for p in reply["pipelines"]]

    async def pin(self, spec: BackboneSpec, key: str) -> int:
        reply, _ = await self._call({"op": "pin", "spec": spec.to_dict(), "key": key})
        return int(reply["slot"])

    async def unpin(self, key: str) -> bool:
        reply, _ = await self._call({"op": "unpin", "key": key})
        return bool(reply["was"])

    async def invalidate(self, key: str) -> None:
        await self._call({"op": "invalidate", "key": key})

    async def stats(self) -> dict[str, Any]:
        reply, _ = await self._call({"op": "stats"})
        stats: dict[str, Any] = reply["stats"]
        return stats

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all("the front is shutting down")
        if self._sock is not None:
            self._sock.close()
        if self._ctx is not None:
            self._ctx.term()

    # -- plumbing ---------------------------------------------------------------------------------------
    async def _call(
        self, header: dict[str, Any], tensors: Sequence[Tensor] = ()
    ) -> tuple[dict[str, Any], list[Tensor]]:
        if not self.alive or self._sock is None:
            raise EngineUnavailableError("the engine process is not available (restarting); retry shortly")
        rid = next(self._ids)
        fut: asyncio.Future[tuple[dict[str, Any], list[Tensor]]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            try:
                await self._sock.send_multipart(
                    encode({**header, "id": rid}, tensors), copy=False, flags=zmq.NOBLOCK
                )
            except zmq.Again:  # no connection to hand it to (IMMEDIATE): the engine is gone
                self._mark_down("the engine process is not connected")
                raise EngineUnavailableError("the engine process is not connected; retry shortly") from None
            try:
                async with asyncio.timeout(self.reply_timeout_s):
                    reply, out = await fut
            except TimeoutError:
                metrics.ENGINE_REPLY_TIMEOUTS.labels(op=str(header.get("op"))).inc()
                log.error(
                    "no reply from the engine at %s to %s request %d within %.1f s (it still answers "
                    "heartbeats): the request fails with 503; %d other requests are waiting",
                    self.endpoint,
                    header.get("op"),
                    rid,
                    self.reply_timeout_s,
                    len(self._pending) - 1,
                )
                raise EngineReplyTimeoutError(
                    f"the engine did not answer within {self.reply_timeout_s:.0f} s; retry shortly"
                ) from None
        finally:
            self._pending.pop(rid, None)
        if "error" in reply:
            raise error_from_wire(reply["error"])
        return reply, out

    async def _receive(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                header, tensors = decode(frames)
            except Exception:
                log.exception("undecodable message from the engine")
                continue
            self._last_heard = time.monotonic()
            if not self._up.is_set():
                log.info("engine at %s answers", self.endpoint)
                self._up.set()
                metrics.ENGINE_UP.labels(endpoint=self.endpoint).set(1)
            fut = self._pending.get(header.get("id", -1)) if header.get("op") == "reply" else None
            if fut is not None and not fut.done():
                fut.set_result((header, tensors))

    def _ping(self) -> None:
        """Send a heartbeat if a connection can take it; a failed one (no engine) is simply not sent."""
        if self._sock is not None:
            sent = asyncio.ensure_future(
                self._sock.send_multipart(encode({"op": "ping", "id": -1}), flags=zmq.NOBLOCK)
            )
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _heartbeat(self) -> None:
        while True:
            self._ping()
            await asyncio.sleep(self.heartbeat_s)
            if self.alive and time.monotonic() - self._last_heard > self.timeout_s:
                self._mark_down(f"no answer from the engine for {self.timeout_s:.1f} s")

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """The socket's own events: a lost connection fails everything in flight at once; a new one is
        asked for a heartbeat at once, so a restarted engine is back in use without waiting a beat."""
        try:
            while True:
                event = await recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._mark_down("the connection to the engine process was lost")
                elif event["event"] == zmq.EVENT_CONNECTED:  # a (re)started engine: ask now, not next beat
                    self._ping()
        finally:
            monitor.close()

    def _mark_down(self, why: str) -> None:
        if self._up.is_set():
            log.warning(
                "engine at %s down: %s; failing %d requests in flight", self.endpoint, why, len(self._pending)
            )
        self._up.clear()
        metrics.ENGINE_UP.labels(endpoint=self.endpoint).set(0)
        self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineUnavailableError(f"{why}; retry shortly"))
        self._pending.clear()
