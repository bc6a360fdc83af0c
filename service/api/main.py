"""The FastAPI app: `create_app(settings)`; long-lived resources are built in the lifespan."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from service.api.console import install_console
from service.api.errors import install_error_handlers
from service.api.fast_predict import FastPredict
from service.api.observability import Metrics, RequestMiddleware
from service.api.routes import (
    backbones,
    evaluations,
    files,
    health,
    jobs,
    predict,
    prompts,
    serving,
    tenants,
)
from service.api.routes.docs import install_docs
from service.api.shedding import LoadShedding
from service.db.migrate import check_migrated, upgrade
from service.db.session import make_engine, make_session_factory
from service.domain.evaluation_runner import EvaluationRunner
from service.domain.predict import PromptResolver
from service.domain.tenants import Authenticator, resolve_admin_key
from service.launch.engine import DatabasePromptSource
from service.launch.front import EnginePredictor, serving_config
from service.launch.heap import freeze_startup_heap, thaw
from service.log import configure_logging
from service.queue import InProcessQueue, create_queue
from service.serving import metrics as serving_metrics
from service.serving.client import EngineClient
from service.serving.core import EngineCore
from service.serving.front_gate import FrontGate
from service.serving.ratelimit import build_rate_limiter
from service.settings import Settings, get_settings
from service.storage import create_storage

log = logging.getLogger("actprompt.api")


async def build_predictor(
    settings: Settings, session_factory: sessionmaker[Session], gate: FrontGate | None = None
) -> EnginePredictor:
    """The predict path: the engine process when `actprompt serve` started one (its endpoint is set), else
    an engine inside this process (single-process mode, in-process tests); either micro-batches every
    tenant's requests on one shared backbone per device."""
    on_overloaded = gate.engine_refused if gate else None
    if settings.serving_engine_endpoint:
        client = EngineClient(
            settings.serving_engine_endpoint,
            timeout_s=settings.serving_engine_timeout_ms / 1000,
            reply_timeout_s=settings.serving_engine_reply_timeout_ms / 1000,
        )
        await client.start()
        if not await client.wait_alive(timeout_s=120):
            log.warning("the engine at %s does not answer yet: predicts get 503", client.endpoint)
        return EnginePredictor(client, on_overloaded=on_overloaded)
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    core = EngineCore(DatabasePromptSource(session_factory), serving_config(settings))
    return EnginePredictor(core, on_overloaded=on_overloaded)


def body_limit(settings: Settings, path: str) -> int:
    """Request bodies are small everywhere but the file upload, which streams up to `max_file_bytes`."""
    if path.rstrip("/") == "/v1/files":
        return settings.max_file_bytes + files.MULTIPART_SLACK
    return settings.max_upload_bytes


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Builds the long-lived resources in order; whatever was built is released (in reverse) when
    start-up fails half-way, as on shutdown."""
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        engine = make_engine(settings.database_url)
        stack.callback(engine.dispose)
        if settings.should_auto_migrate:
            await run_in_threadpool(upgrade, settings.database_url)
        else:  # DatabaseNotMigrated: refuse to start, say the fix
            await run_in_threadpool(check_migrated, engine)
        session_factory = make_session_factory(engine)
        app.state.session_factory = session_factory
        app.state.authenticator = Authenticator(
            session_factory, admin_key=settings.admin_key, ttl_s=settings.auth_cache_seconds
        )
        app.state.authenticator.start()
        stack.push_async_callback(app.state.authenticator.aclose)
        app.state.prompt_resolver = PromptResolver(
            session_factory, ttl_s=settings.prompt_resolve_cache_seconds
        )
        app.state.prompt_resolver.start()
        stack.push_async_callback(app.state.prompt_resolver.aclose)
        # on the loop that owns it
        app.state.predictor = await build_predictor(settings, session_factory, app.state.front_gate)
        stack.push_async_callback(app.state.predictor.aclose)
        app.state.rate_limiter = build_rate_limiter(settings)
        if app.state.rate_limiter is not None:
            stack.push_async_callback(app.state.rate_limiter.aclose)
        serving_metrics.set_per_tenant_labels(settings.metrics_per_tenant)
        app.state.storage = create_storage(settings)
        app.state.evaluations = EvaluationRunner(
            session_factory, app.state.predictor, app.state.storage, settings
        )
        await run_in_threadpool(app.state.evaluations.fail_orphans)  # left running by a crashed API process
        app.state.evaluations.start()
        stack.push_async_callback(app.state.evaluations.aclose)
        queue = create_queue(settings, session_factory)
        app.state.queue = queue
        if isinstance(queue, InProcessQueue):
            queue.start()
            stack.push_async_callback(run_in_threadpool, queue.stop)
        else:
            stack.callback(queue.close)
        if not settings.admin_key:
            log.warning("no ACTPROMPT_ADMIN_KEY: admin endpoints answer 401")
        frozen = freeze_startup_heap()  # start-up is done: its objects leave the collector's walk
        stack.callback(thaw)
        log.info(
            "gateway started",
            extra={
                "database": engine.url.render_as_string(hide_password=True),
                "mode": "embedded" if settings.is_embedded else "celery",
                "engine": settings.serving_engine_endpoint or "in-process",
                "frozen_objects": frozen,
            },
        )
        yield


def _cached_tenant(app: FastAPI, raw_key: str) -> str | None:
    """The tenant of a key this process has already authenticated (no database read), else None."""
    authenticator = getattr(app.state, "authenticator", None)
    principal = authenticator.cached(raw_key) if authenticator is not None else None
    return principal.tenant_id if principal is not None else None


class GatedFastAPI(FastAPI):
    """FastAPI behind the front's load-shedding gate: a predict is admitted or refused before any
    middleware, routing or FastAPI's own telemetry runs, so a refusal costs none of them."""

    shedding: LoadShedding | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.shedding is None:
            await super().__call__(scope, receive, send)
        else:
            await self.shedding(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = resolve_admin_key(settings or get_settings())
    configure_logging(settings.log_level, json_lines=settings.log_json)
    app = GatedFastAPI(
        title="actprompt",
        version="0.1.0",
        summary="Activation prompts for frozen vision backbones, trained and served per tenant.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by install_docs: /docs works offline
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.session_factory = None
    app.state.metrics = Metrics(lambda: app.state.session_factory)
    install_error_handlers(app)
    quarter_budget_s = settings.serving_queue_budget_ms / 4000
    app.state.front_gate = FrontGate(
        max_in_flight=settings.serving_front_max_in_flight,
        target_s=quarter_budget_s,  # a predict's time in the front
        min_hold_s=quarter_budget_s,
        max_hold_s=settings.serving_queue_budget_ms / 1000,
    )
    app.add_middleware(FastPredict, fastapi_app=app)  # innermost: inside the request metrics
    app.shedding = LoadShedding(  # outermost: in front of FastAPI itself
        functools.partial(FastAPI.__call__, app),
        gate=app.state.front_gate,
        tenant_of=lambda raw_key: _cached_tenant(app, raw_key),
        count_refusal=lambda: app.state.metrics.requests.labels("POST", "/v1/predict", "503").inc(),
    )
    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=lambda path: body_limit(app.state.settings, path),
        metrics=lambda: app.state.metrics,
    )
    # predict first: routes are matched in order, and it is the call that is made thousands of times a second
    for module in (predict, health, tenants, backbones, files, jobs, prompts, serving, evaluations):
        app.include_router(module.router)
    install_docs(app)
    install_console(app)
    return app
