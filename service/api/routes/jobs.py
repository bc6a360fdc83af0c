"""Jobs: submit (idempotent), list, get, cancel, events (paginated or live SSE), checkpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from actprompt.states import TERMINAL_JOB_STATES, JobStatus
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event
from starlette.concurrency import run_in_threadpool

from service.api.deps import (
    PageDep,
    QueueDep,
    ReadTenantDep,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    TrainTenantDep,
    page_limit,
    paginate,
)
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES, ListPublic
from service.api.schemas.jobs import CheckpointPublic, JobCreate, JobEventPublic, JobPublic
from service.db.models import Job, JobEvent
from service.domain import jobs
from service.domain.jobs import JobRequest

log = logging.getLogger("actprompt.api.jobs")
router = APIRouter(route_class=CheckedRoute, tags=["jobs"], responses=ERROR_RESPONSES)


def to_request(body: JobCreate) -> JobRequest:
    """The domain's request has the body's fields, as plain values (hyperparameters a dict)."""
    return JobRequest(**body.model_dump())


def job_public(job: Job) -> JobPublic:
    return JobPublic.model_validate(job)


def event_public(e: JobEvent) -> JobEventPublic:
    return JobEventPublic.model_validate(e)


@router.post("/v1/jobs", status_code=202, response_model=JobPublic)
def create_job(
    body: JobCreate,
    response: Response,
    tenant_id: TrainTenantDep,
    session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JobPublic:
    job, created = jobs.submit_job(
        session, tenant_id, to_request(body), idempotency_key=idempotency_key, settings=settings
    )
    if created:
        jobs.dispatch(session, queue, job)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return job_public(job)


@router.get("/v1/jobs", response_model=ListPublic[JobPublic])
def list_jobs(
    tenant_id: ReadTenantDep,
    session: SessionDep,
    page: PageDep,
    status: JobStatus | None = Query(None),
) -> ListPublic[JobPublic]:
    rows = jobs.list_jobs(session, tenant_id, limit=page.fetch, after=page.after, status=status)
    return page.answer(rows, lambda j: j.id, job_public)


@router.get("/v1/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: str, tenant_id: ReadTenantDep, session: SessionDep) -> JobPublic:
    return job_public(jobs.get_job(session, tenant_id, job_id))


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, tenant_id: TrainTenantDep, session: SessionDep) -> JobPublic:
    job = jobs.cancel_job(session, tenant_id, job_id)
    session.commit()
    return job_public(job)


@router.get(
    "/v1/jobs/{job_id}/events",
    response_model=ListPublic[JobEventPublic],
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON page, or an SSE stream."}},
)
async def list_events(
    job_id: str,
    request: Request,
    tenant_id: ReadTenantDep,
    factory: SessionFactoryDep,
    settings: SettingsDep,
    limit: int = Query(100, ge=1, le=1000),
    after: int | None = Query(None, ge=0, description="Cursor: events with a larger id."),
    last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0)] = None,
) -> ListPublic[JobEventPublic] | EventSourceResponse:
    def page(after_id: int | None, n: int) -> tuple[list[JobEvent], str]:
        with factory() as session:
            events = jobs.list_events(session, tenant_id, job_id, after=after_id, limit=n)
            return events, jobs.get_job(session, tenant_id, job_id).status

    if "text/event-stream" in request.headers.get("accept", ""):
        start = last_event_id if last_event_id is not None else after
        await run_in_threadpool(page, start, 1)  # 404 before the stream starts
        return EventSourceResponse(
            _stream(page, start), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    limit = page_limit(limit, settings)
    rows, _status = await run_in_threadpool(page, after, limit + 1)
    rows, has_more, cursor = paginate(rows, limit, lambda e: e.id)
    return ListPublic[JobEventPublic](
        data=[event_public(e) for e in rows], has_more=has_more, next_cursor=cursor
    )


async def _stream(
    page: Callable[[int | None, int], tuple[list[JobEvent], str]],
    after: int | None,
    poll: float = 0.5,
    keepalive: float = 15.0,
) -> AsyncIterator[bytes]:
    """Events as they are written; ends with `event: end` once the job is final and drained.

    FastAPI's own SSE framing (`fastapi.sse`) writes each message; the route answers JSON pages too (by
    `Accept`), so it cannot be a generator route and sends its own keep-alive comment while idle.
    """
    last = after
    quiet_since = time.monotonic()
    while True:
        events, status = await run_in_threadpool(page, last, 500)
        for e in events:
            yield format_sse_event(data_str=event_public(e).model_dump_json(), event=e.type, id=str(e.id))
            last = e.id
        if events:
            quiet_since = time.monotonic()
            continue
        if status in TERMINAL_JOB_STATES:
            yield format_sse_event(data_str=json.dumps({"status": status}), event="end")
            return
        if time.monotonic() - quiet_since > keepalive:
            yield KEEPALIVE_COMMENT
            quiet_since = time.monotonic()
        await asyncio.sleep(poll)


@router.get("/v1/jobs/{job_id}/checkpoints", response_model=ListPublic[CheckpointPublic])
def list_checkpoints(
    job_id: str, tenant_id: ReadTenantDep, session: SessionDep
) -> ListPublic[CheckpointPublic]:
    rows = jobs.list_checkpoints(session, tenant_id, job_id)
    data = [CheckpointPublic.model_validate(c) for c in rows]
    return ListPublic[CheckpointPublic](data=data, has_more=False)
