"""Liveness, readiness (database and queue), Prometheus metrics."""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from service.api.schemas.common import NotReady, Ready

log = logging.getLogger("actprompt.api")

router = APIRouter(tags=["health"])


#: What a generated client needs: the 503 body of /readyz, and /metrics as Prometheus text.
_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": Ready},
    503: {"model": NotReady, "description": "The database, the queue or the engine is down (`checks`)."},
}
_METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "Prometheus text."}
}


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses=_READY_RESPONSES)
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state

    def check_db() -> bool:
        try:
            with state.session_factory() as session:
                session.execute(text("SELECT 1"))
            return True
        except Exception as exc:
            log.warning("readiness: database check failed: %s: %s", type(exc).__name__, exc)
            return False

    database = await run_in_threadpool(check_db)
    queue = await run_in_threadpool(state.queue.ping)
    if not queue:
        log.warning("readiness: the job queue (broker) does not answer its ping")
    engine = state.predictor.ready
    checks = {
        "database": "ok" if database else "down",
        "queue": "ok" if queue else "down",
        "engine": "ok" if engine else "down",
    }
    if database and queue and engine:
        return JSONResponse({"status": "ok", "checks": checks})
    return JSONResponse(
        status_code=503,
        content={
            "error": {"code": "not_ready", "message": f"not ready: {checks}", "param": None},
            "checks": checks,
        },
    )


@router.get("/metrics", response_class=Response, responses=_METRICS_RESPONSES)
def metrics(request: Request) -> Response:
    """One process: its app registry (requests, job states) plus the process-wide one (serving, process).

    Several (`actprompt serve --workers N`): counters and histograms of every process, summed from the
    files under PROMETHEUS_MULTIPROC_DIR, plus the job states counted in the database once.
    """
    app_metrics = request.app.state.metrics
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        body = generate_latest(registry) + generate_latest(app_metrics.jobs_registry)
    else:
        body = generate_latest(app_metrics.registry) + generate_latest(REGISTRY)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
