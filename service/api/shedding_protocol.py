"""uvicorn's httptools protocol with the load-shedding gate at its door: a predict that the gate refuses is
answered in the very callback that parsed its headers, with no ASGI task.

Past saturation most predicts are refused, and on a CPU host every cycle a front spends on them is taken
from the engine. Through ASGI, a refusal is a task that waits its turn behind whatever else the event loop
has ready (the answers of a whole batch, say), then the scope and message plumbing of two ``send`` calls:
more than the gate's own decision, and a wait that sets the refusals' tail latency. Here it is one
``transport.write`` as soon as the headers are in; the unread body is discarded by uvicorn as it arrives
(the request's cycle is complete), and the connection stays open for the next request, as before.

Everything else, admitted predicts included, goes the usual way: uvicorn starts the ASGI task and the app's
own gate (``LoadShedding``, which this asks without taking a place) admits it. A server without this
protocol (a test client, another ASGI server) gets the same refusals from that gate, one task later.
This subclass leans on uvicorn's ``HttpToolsProtocol`` internals (``_start_asgi_task``, the cycle's
fields); ``tests/serving/test_shedding_protocol.py`` pins the behaviour that relies on them.
"""

from __future__ import annotations

import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.api.shedding import LoadShedding, Refusal

__all__ = ["SheddingHttpToolsProtocol"]

_STATUS_LINE = b"HTTP/1.1 503 Service Unavailable\r\n"


class SheddingHttpToolsProtocol(HttpToolsProtocol):
    @functools.cached_property
    def _shedding(self) -> LoadShedding | None:
        """The app's gate, looked up once per connection."""
        return shedding_of(self.app)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        scope: Any = cycle.scope  # uvicorn's typed scope is the mapping Starlette's gate reads
        refusal = self._shedding.refusal(scope) if self._shedding is not None else None
        if refusal is None:
            super()._start_asgi_task(cycle, app)
        elif refusal.pause_s:
            self.loop.call_later(refusal.pause_s, self._refuse, cycle, refusal)
        else:
            self._refuse(cycle, refusal)

    def _refuse(self, cycle: RequestResponseCycle, refusal: Refusal) -> None:
        """Write the whole refusal and complete the cycle, as uvicorn's own ``send`` would."""
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()
        if cycle.disconnected or self.transport.is_closing():
            return
        head = [_STATUS_LINE]
        for name, value in (*self.server_state.default_headers, *refusal.headers):
            head += [name, b": ", value, b"\r\n"]
        if not cycle.keep_alive:  # the server is shutting down, or the client asked to close
            head.append(b"connection: close\r\n")
        head += [b"\r\n", refusal.body]
        self.transport.write(b"".join(head))
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()


def shedding_of(app: Any, depth: int = 8) -> LoadShedding | None:
    """The app's gate (``GatedFastAPI.shedding``) under the middleware uvicorn wraps around the app."""
    for _ in range(depth):
        shedding = getattr(app, "shedding", None)
        if isinstance(shedding, LoadShedding):
            return shedding
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None
