"""The engine process's server: one ZeroMQ ROUTER socket in front of one :class:`EngineCore`.

Every front connects a DEALER socket (:class:`service.serving.client.EngineClient`); each message is
handled in its own task, so the rows of every front meet in the same batcher and form one mixed batch.
Ops (header ``"op"``; see :mod:`service.serving.transport` for the framing):

====================  ===========================================  =====================================
op                    request                                      reply
====================  ===========================================  =====================================
``ping``              (heartbeat)                                  ``pong``
``predict``           spec, keys, tenant, deadline; x [N,3,H,W]    classes per key; probabilities [N,K]
``pipelines``         spec, keys                                   each prompt's training image pipeline
``pin`` / ``unpin``   spec, key / key                              slot / whether it was pinned
``invalidate``        key                                          (done: no front is served it again)
``stats``                                                          the core's stats
====================  ===========================================  =====================================

SIGTERM drains: the socket stops taking requests, the ones in flight finish and are answered, then the
core closes.

A request that stays in the engine past ``stall_s`` (far longer than any admitted request should take) is a
fault the fronts can only time out on; the engine then logs, once per stall, the stacks of every thread and
every task, so the log shows where it is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import zmq
import zmq.asyncio

from service.engine import BackboneSpec
from service.serving.core import EngineCore
from service.serving.transport import decode, encode, error_to_wire

log = logging.getLogger(__name__)

__all__ = ["EngineServer"]


class EngineServer:
    """Serves an :class:`EngineCore` to the fronts on ``endpoint`` (``ipc://...``)."""

    def __init__(self, core: EngineCore, endpoint: str, *, stall_s: float = 20.0) -> None:
        self.core = core
        self.endpoint = endpoint
        self.stall_s = stall_s
        self._specs: dict[str, BackboneSpec] = {}
        #: the requests in flight: each one's task -> (op, when it arrived), for the drain and the stall watch
        self._started: dict[asyncio.Task[None], tuple[str, float]] = {}

    async def serve(self, on_ready: Callable[[], None] = lambda: None) -> None:
        """Answer until SIGTERM (or cancellation), then drain the requests in flight and close the core."""
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a front that went away is dropped quietly
        sock.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops what passes its high-water mark: never for a reply
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(self.endpoint)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        log.info("engine listening on %s", self.endpoint)
        on_ready()
        try:
            # one receiving task for the socket's life, cancelled by the stop: waiting on both per message
            # (asyncio.wait) cost more of the event loop than the rest of a message's handling
            receiving = asyncio.ensure_future(self._receive(sock))
            stopping = asyncio.ensure_future(stop.wait())
            watching = asyncio.ensure_future(self._watch_stalls())
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (receiving, stopping):
                task.cancel()
            await asyncio.gather(receiving, stopping, return_exceptions=True)
            log.info("engine draining %d requests in flight", len(self._started))
            if self._started:
                await asyncio.gather(*self._started, return_exceptions=True)
            watching.cancel()
        finally:
            await self.core.aclose()
            sock.close()
            ctx.term()

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        """Each message is handled in a task of its own (its rows then meet every other front's)."""
        while True:
            frames = await sock.recv_multipart(copy=False)
            task = asyncio.ensure_future(self._handle(sock, frames))
            self._started[task] = ("", time.monotonic())
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._started.pop(task, None)

    async def _watch_stalls(self) -> None:
        """Log every thread's and task's stack when a request has been here past ``stall_s`` (once per
        stalled request): the trace a hang leaves, where the fronts can only say they timed out."""
        reported: set[asyncio.Task[None]] = set()
        while True:
            await asyncio.sleep(min(1.0, self.stall_s / 4))
            now = time.monotonic()
            stalled = [(t, op, now - t0) for t, (op, t0) in self._started.items() if now - t0 > self.stall_s]
            reported &= set(self._started)
            fresh = [s for s in stalled if s[0] not in reported]
            if fresh:
                reported.update(t for t, _, _ in fresh)
                log.error(
                    "engine: %d requests in flight longer than %.0f s (%s); stacks follow\n%s",
                    len(stalled),
                    self.stall_s,
                    ", ".join(f"{op or '?'} {age:.0f} s" for _, op, age in stalled),
                    _stacks(),
                )

    async def _handle(self, sock: zmq.asyncio.Socket, frames: list[Any]) -> None:
        identity, *body = frames
        try:
            header, tensors = decode(body)
        except Exception:  # not one of our fronts' messages: nobody to answer by id
            log.exception("undecodable message on %s", self.endpoint)
            return
        task = asyncio.current_task()
        if task in self._started:
            self._started[task] = (str(header.get("op")), self._started[task][1])
        reply: dict[str, Any] = {"id": header.get("id"), "op": "reply"}
        out: list[torch.Tensor] = []
        try:
            out = await self._dispatch(header, tensors, reply)
        except Exception as exc:  # every failure goes back to the front that asked, typed
            if not hasattr(exc, "code"):
                log.exception("engine op %s failed", header.get("op"))
            reply["error"] = error_to_wire(exc)
        try:
            await sock.send_multipart([identity, *encode(reply, out)], copy=False)
        except zmq.ZMQError as exc:  # the socket closed under us (shutdown): nobody to answer
            log.warning("engine could not answer %s: %s", header.get("op"), exc)

    def _spec(self, raw: dict[str, Any]) -> BackboneSpec:
        key = repr(sorted(raw.items()))
        spec = self._specs.get(key)
        if spec is None:
            spec = self._specs[key] = BackboneSpec.from_dict(raw)
        return spec

    async def _dispatch(
        self, header: dict[str, Any], tensors: list[torch.Tensor], reply: dict[str, Any]
    ) -> list[torch.Tensor]:
        op = header.get("op")
        if op == "ping":
            reply["op"] = "pong"
            return []
        if op == "predict":
            outs = await self.core.predict(
                self._spec(header["spec"]),
                header["keys"],
                tensors[0],
                tenant_id=header.get("tenant", ""),
                deadline=header.get("deadline"),
            )
            reply["keys"] = [o.key for o in outs]
            reply["classes"] = [o.classes for o in outs]
            return [o.probabilities for o in outs]
        if op == "pipelines":
            pipelines = await self.core.pipelines(self._spec(header["spec"]), header["keys"])
            reply["pipelines"] = [p.to_dict() for p in pipelines]
        elif op == "pin":
            reply["slot"] = await self.core.pin(self._spec(header["spec"]), header["key"])
        elif op == "unpin":
            reply["was"] = await self.core.unpin(header["key"])
        elif op == "invalidate":
            await self.core.invalidate(header["key"])
        elif op == "stats":
            reply["stats"] = await self.core.stats()
        else:
            raise ValueError(f"unknown op {op!r}")
        return []


def _stacks() -> str:
    """Every thread's Python stack, then every asyncio task's chain of awaits (where each is suspended)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():  # one line per frame, no source: the dump stays short
        lines = [f"  {f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)]
        parts.append(f"--- thread {names.get(ident, ident)}\n" + "\n".join(lines))
    for task in asyncio.all_tasks():
        lines = []
        coro: Any = task.get_coro()
        while coro is not None:
            where: Any = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if where is not None:
                lines.append(f"  {where.f_code.co_filename}:{where.f_lineno} {where.f_code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        parts.append(f"--- task {task.get_name()}\n" + "\n".join(lines))
    return "\n".join(parts)
