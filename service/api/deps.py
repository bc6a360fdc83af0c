"""Typed dependency aliases: settings, the request's session, the caller, the queue, the predictor, caches."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas.common import ListPublic
from service.domain.errors import Forbidden
from service.domain.predict import Predictor, PromptResolver
from service.domain.tenants import Authenticator, Principal, Scope
from service.queue import JobQueue
from service.serving import metrics as serving_metrics
from service.serving.ratelimit import RateLimiter
from service.settings import Settings

R = TypeVar("R")
P = TypeVar("P")

_bearer = HTTPBearer(auto_error=False, description="A tenant API key, or the admin key for admin calls.")


def _app_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """The dependency that returns `app.state.<name>`, which `create_app` builds once for every request.

    The dependencies that only read or check are coroutines: FastAPI runs a plain `def` dependency in a
    worker thread, and a thread hop costs more than what they do (a predict solves six of them).
    """

    async def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    return dependency


_session_factory = _app_state("session_factory")


def _session(factory: Annotated[sessionmaker[Session], Depends(_session_factory)]) -> Iterator[Session]:
    """The request is the unit of work: routes commit explicitly; anything uncommitted is rolled back."""
    with factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(_app_state("settings"))]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(_session_factory)]
SessionDep = Annotated[Session, Depends(_session)]


def bearer_token(request: Request) -> str | None:
    """The `Authorization: Bearer <key>` token of a request, if any."""
    return token_of_authorization(request.headers.get("authorization", ""))


def token_of_authorization(value: str) -> str | None:
    """The token of an `Authorization` header's value when its scheme is Bearer, else None."""
    scheme, _, token = value.partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


async def authenticate_request(request: Request) -> Principal:
    """Who is calling, resolved once per request (the edge check and the dependency share the answer).

    A remembered key answers on the loop; a miss queries the database in a thread (with one retry on a
    connection that died mid-flight, see `Authenticator.authenticate`).
    """
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    auth: Authenticator = request.app.state.authenticator
    raw = bearer_token(request)
    hit = auth.cached(raw)
    principal = hit if hit is not None else await run_in_threadpool(auth.authenticate, raw)
    request.state.principal = principal
    return principal


async def authenticate_dependency(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    # `_bearer` stays a dependency so that OpenAPI documents the security scheme.
    return await authenticate_request(request)


PrincipalDep = Annotated[Principal, Depends(authenticate_dependency)]


async def _scoped(security_scopes: SecurityScopes, principal: PrincipalDep) -> Principal:
    """The caller, if its key holds every scope the route (and what it depends on) asks for; else 403."""
    missing = [str(s) for s in security_scopes.scopes if s not in principal.scopes]
    if missing:
        raise Forbidden(
            f"this API key lacks the {' and '.join(repr(s) for s in missing)} scope "
            f"(it holds: {', '.join(sorted(principal.scopes)) or 'none'}); create a key with it",
            code="insufficient_scope",
        )
    return principal


async def _tenant_id(principal: Annotated[Principal, Security(_scoped)]) -> str:
    if principal.tenant_id is None:
        raise Forbidden("this call needs a tenant API key, not the admin key", code="tenant_key_required")
    return principal.tenant_id


async def _admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this call needs the admin key", code="admin_key_required")
    return principal


#: The calling tenant, whose key holds the scope the alias names (every tenant route takes one of these).
PredictTenantDep = Annotated[str, Security(_tenant_id, scopes=[Scope.PREDICT])]
ReadTenantDep = Annotated[str, Security(_tenant_id, scopes=[Scope.READ])]
TrainTenantDep = Annotated[str, Security(_tenant_id, scopes=[Scope.TRAIN])]
#: The admin key, or a tenant key with the scope (the admin key holds every scope).
ReaderDep = Annotated[Principal, Security(_scoped, scopes=[Scope.READ])]
KeyAdminDep = Annotated[Principal, Security(_scoped, scopes=[Scope.ADMIN])]
#: The admin key only (tenants, backbones).
AdminDep = Annotated[Principal, Depends(_admin)]


QueueDep = Annotated[JobQueue, Depends(_app_state("queue"))]
PredictorDep = Annotated[Predictor, Depends(_app_state("predictor"))]
ResolverDep = Annotated[PromptResolver, Depends(_app_state("prompt_resolver"))]
AuthenticatorDep = Annotated[Authenticator, Depends(_app_state("authenticator"))]


async def _rate_limit(
    tenant_id: PredictTenantDep, limiter: Annotated[RateLimiter | None, Depends(_app_state("rate_limiter"))]
) -> None:
    """Per-tenant token bucket: 429 with `Retry-After` (whole seconds) while the tenant is over its rate.

    The limiter never raises for its store: without Redis it limits per process (see serving.ratelimit).
    """
    await enforce_rate_limit(limiter, tenant_id)


async def enforce_rate_limit(limiter: RateLimiter | None, tenant_id: str) -> None:
    """Take one of the tenant's tokens, or raise the 429 (shared by the dependency and the fast path)."""
    if limiter is None:
        return
    decision = await limiter.acquire(tenant_id)
    if not decision.allowed:
        serving_metrics.RATE_LIMITED.labels(tenant=serving_metrics.tenant_label(tenant_id)).inc()
        raise StarletteHTTPException(
            429,
            detail=f"rate limit exceeded for this tenant; retry in {decision.retry_after_header} s",
            headers={"Retry-After": decision.retry_after_header},
        )


#: A predict route's dependency: the caller's tenant has a token left (else 429).
RateLimited = Depends(_rate_limit)


def page_limit(limit: int, settings: Settings) -> int:
    return max(1, min(limit, settings.page_size_max))


def paginate(items: list[Any], limit: int, cursor_of: Any) -> tuple[list[Any], bool, str | None]:
    """Items were fetched with limit + 1: split off the look-ahead row."""
    has_more = len(items) > limit
    items = items[:limit]
    return items, has_more, (str(cursor_of(items[-1])) if has_more and items else None)


@dataclass(frozen=True)
class Page:
    """The page a cursor listing asks for: at most `limit` rows (capped by the settings) after `after`."""

    limit: int
    after: str | None

    @property
    def fetch(self) -> int:
        """Rows to read: one more than the page tells whether another page follows."""
        return self.limit + 1

    def answer(
        self, rows: list[R], cursor_of: Callable[[R], object], public: Callable[[R], P]
    ) -> ListPublic[P]:
        rows, has_more, cursor = paginate(rows, self.limit, cursor_of)
        return ListPublic(data=[public(r) for r in rows], has_more=has_more, next_cursor=cursor)


def _page(
    settings: SettingsDep,
    limit: int = Query(20, ge=1, le=1000),
    after: str | None = Query(None, max_length=64, description="Cursor: `next_cursor` of the previous page."),
) -> Page:
    return Page(page_limit(limit, settings), after)


#: `limit` and `after` of a cursor listing.
PageDep = Annotated[Page, Depends(_page)]
