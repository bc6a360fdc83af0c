"""Request middleware (body limit, request id, access log, Prometheus) and the app's metrics registry."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from actprompt.states import JobStatus
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("actprompt.access")


class JobStateCollector(Collector):
    """`actprompt_jobs{status=...}`: counted in the database at scrape time (the source of truth).

    When the database cannot answer, the job series are left out (absent, not zero: a dashboard must not
    read an outage as "no jobs") and `actprompt_jobs_scrape_ok` says 0.
    """

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("actprompt_jobs", "Jobs by status (all tenants)", labels=["status"])
        ok = GaugeMetricFamily(
            "actprompt_jobs_scrape_ok", "1 when actprompt_jobs could be counted in the database, else 0"
        )
        try:
            counts = self._counts()
        except Exception as exc:
            log.warning("metrics: cannot count jobs in the database: %s: %s", type(exc).__name__, exc)
            ok.add_metric([], 0)
            yield ok
            return
        for state in JobStatus:
            family.add_metric([state], counts.get(state, 0))
        ok.add_metric([], 1)
        yield family
        yield ok


class Metrics:
    def __init__(self, session_factory: Callable[[], sessionmaker[Session] | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "actprompt_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "actprompt_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

        def counts() -> dict[str, int]:
            from service.domain.jobs import job_counts

            factory = session_factory()
            if factory is None:
                return {}
            with factory() as session:
                return job_counts(session)

        collector = JobStateCollector(counts)
        self.registry.register(collector)
        self.jobs_registry = CollectorRegistry()  # the database-counted part alone (multi-process /metrics)
        self.jobs_registry.register(collector)


def request_id_of(sent: bytes | None) -> str:
    """The request's id: the client's X-Request-ID (up to 64 characters), else a new one."""
    return (sent or b"").decode("latin-1")[:64] or uuid.uuid4().hex


class RequestMiddleware:
    """Pure ASGI (streams pass through): 413 above the body limit, X-Request-ID, access log, metrics."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: Callable[[str], int], metrics: Callable[[], Metrics]
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        limit = self.max_body_bytes(scope.get("path", ""))  # per path: file uploads are larger
        headers = dict(scope.get("headers") or [])
        request_id = request_id_of(headers.get(b"x-request-id"))
        status = 500
        received = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, f"request body over the limit of {limit} bytes")
            return message

        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        try:
            if length > limit:
                body = json.dumps(
                    {
                        "error": {
                            "code": "payload_too_large",
                            "message": f"request body of {length} bytes is over the limit of {limit} bytes",
                            "param": None,
                        }
                    }
                ).encode()
                await send_wrapper(
                    {
                        "type": "http.response.start",
                        "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                    }
                )
                await send_wrapper({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route: Any = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            metrics = self.metrics()
            metrics.requests.labels(scope["method"], path, str(status)).inc()
            metrics.latency.labels(scope["method"], path).observe(elapsed)
            if path not in ("/healthz", "/readyz", "/metrics"):
                log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": path,
                        "status": status,
                        "ms": round(elapsed * 1000, 2),
                        "request_id": request_id,
                    },
                )
