"""The FastAPI app: `create_app(settings)`; long-lived resources are built in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.api.console import install_console
from service.api.errors import install_error_handlers
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
from service.db.migrate import check_migrated, upgrade
from service.db.session import make_engine, make_session_factory
from service.domain.evaluation_runner import EvaluationRunner
from service.domain.predict import Predictor, PromptResolver
from service.domain.tenants import Authenticator, load_or_create_admin_key
from service.gateway.predictor import BatchingPredictor
from service.gateway.ratelimit import build_rate_limiter
from service.log import configure_logging
from service.queue import InProcessQueue, create_queue
from service.serving import metrics as serving_metrics
from service.settings import Settings, get_settings
from service.storage import create_storage

log = logging.getLogger("actprompt.api")


def build_predictor(settings: Settings, session_factory: sessionmaker[Session]) -> Predictor:
    """The predict path: every tenant's requests micro-batched on one shared backbone per device."""
    return BatchingPredictor(session_factory, settings)


def body_limit(settings: Settings, path: str) -> int:
    """Request bodies are small everywhere but the file upload, which streams up to `max_file_bytes`."""
    if path.rstrip("/") == "/v1/files":
        return settings.max_file_bytes + files.MULTIPART_SLACK
    return settings.max_upload_bytes


def resolve_admin_key(settings: Settings) -> Settings:
    """Embedded mode without ACTPROMPT_ADMIN_KEY: the key stored under var_dir (generated once)."""
    if settings.admin_key or not settings.is_embedded:
        return settings
    return settings.model_copy(update={"admin_key": load_or_create_admin_key(settings.var_dir)})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = make_engine(settings.database_url)
    if settings.should_auto_migrate:
        await run_in_threadpool(upgrade, settings.database_url)
    else:
        await run_in_threadpool(check_migrated, engine)  # DatabaseNotMigrated: refuse to start, say the fix
    session_factory = make_session_factory(engine)
    queue = create_queue(settings, session_factory)
    app.state.session_factory = session_factory
    app.state.queue = queue
    app.state.authenticator = Authenticator(
        session_factory, admin_key=settings.admin_key, ttl_s=settings.auth_cache_seconds
    )
    app.state.prompt_resolver = PromptResolver(session_factory, ttl_s=settings.prompt_resolve_cache_seconds)
    app.state.predictor = build_predictor(settings, session_factory)  # on the loop that will own its state
    app.state.rate_limiter = build_rate_limiter(settings)
    serving_metrics.set_per_tenant_labels(settings.metrics_per_tenant)
    app.state.storage = create_storage(settings)
    app.state.evaluations = EvaluationRunner(
        session_factory, app.state.predictor, app.state.storage, settings
    )
    await run_in_threadpool(app.state.evaluations.fail_orphans)  # left running by a crashed API process
    app.state.evaluations.start()
    if not settings.admin_key:
        log.warning("no ACTPROMPT_ADMIN_KEY: admin endpoints answer 401")
    if isinstance(queue, InProcessQueue):
        queue.start()
    log.info(
        "gateway started",
        extra={
            "database": engine.url.render_as_string(hide_password=True),
            "mode": "embedded" if settings.is_embedded else "celery",
        },
    )
    try:
        yield
    finally:
        if isinstance(queue, InProcessQueue):
            await run_in_threadpool(queue.stop)
        else:
            queue.close()
        await app.state.evaluations.aclose()
        await app.state.predictor.aclose()
        if app.state.rate_limiter is not None:
            await app.state.rate_limiter.aclose()
        engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = resolve_admin_key(settings or get_settings())
    configure_logging(settings.log_level, json_lines=settings.log_json)
    app = FastAPI(
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
    app.add_middleware(
        RequestMiddleware,
        max_body_bytes=lambda path: body_limit(app.state.settings, path),
        metrics=lambda: app.state.metrics,
    )
    for module in (health, tenants, backbones, files, jobs, prompts, serving, predict, evaluations):
        app.include_router(module.router)
    install_docs(app)
    install_console(app)
    return app
