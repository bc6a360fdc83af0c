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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
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

    def __init__(self, core: EngineCore, endpoint: str) -> None:
        self.core = core
        self.endpoint = endpoint
        self._specs: dict[str, BackboneSpec] = {}
        self._tasks: set[asyncio.Task[None]] = set()

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
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (receiving, stopping):
                task.cancel()
            await asyncio.gather(receiving, stopping, return_exceptions=True)
            log.info("engine draining %d requests in flight", len(self._tasks))
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            await self.core.aclose()
            sock.close()
            ctx.term()

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        """Each message is handled in a task of its own (its rows then meet every other front's)."""
        while True:
            frames = await sock.recv_multipart(copy=False)
            task = asyncio.ensure_future(self._handle(sock, frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, sock: zmq.asyncio.Socket, frames: list[Any]) -> None:
        identity, *body = frames
        try:
            header, tensors = decode(body)
        except Exception:  # not one of our fronts' messages: nobody to answer by id
            log.exception("undecodable message on %s", self.endpoint)
            return
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
