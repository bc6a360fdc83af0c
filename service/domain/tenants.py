"""Tenants and API keys: keys are shown once, stored as sha256 with a visible prefix."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from service.db.base import utcnow
from service.db.ids import new_id
from service.db.models import ApiKey, Tenant
from service.db.repositories import ApiKeyRepository, TenantRepository
from service.db.session import retry_read
from service.domain.errors import InvalidInput, NotFound, Unauthorized, found
from service.revalidating_cache import RevalidatingCache
from service.settings import Settings

KEY_PREFIX = "ap_"
VISIBLE_PREFIX_LEN = 11


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class IssuedKey:
    """A key just created: `secret` exists only in this object and the response that carries it."""

    key: ApiKey
    secret: str


class Scope(StrEnum):
    """What a tenant key may do; a key holds any subset (a predict-only key can ship inside an app)."""

    PREDICT = "predict"  # POST /v1/predict
    READ = "read"  # every GET of the tenant's files, jobs, prompts, evaluations and the backbones
    TRAIN = "train"  # uploads, jobs, evaluations, prompt imports, deletions and pins
    ADMIN = "admin"  # the tenant's own API keys: create, list, revoke


ALL_SCOPES: frozenset[Scope] = frozenset(Scope)


def parse_scopes(names: Iterable[str]) -> frozenset[Scope]:
    """Scope names -> scopes; an unknown name is a typed 422 (an empty list is allowed: a dormant key)."""
    try:
        return frozenset(Scope(n) for n in names)
    except ValueError:
        known = ", ".join(s.value for s in Scope)
        raise InvalidInput(f"scopes: each one of {known}", param="scopes") from None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the admin (every scope), or a tenant through one of its keys (the key's scopes)."""

    is_admin: bool
    tenant_id: str | None = None
    key_id: str | None = None
    scopes: frozenset[Scope] = field(default=ALL_SCOPES)


def create_tenant(session: Session, name: str) -> tuple[Tenant, IssuedKey]:
    tenant = TenantRepository(session).add(Tenant(id=new_id("ten"), name=name))
    return tenant, create_key(session, tenant.id, name="default")


def get_tenant(session: Session, tenant_id: str) -> Tenant:
    return found(TenantRepository(session).get(tenant_id), "tenant", tenant_id, param="tenant_id")


def list_tenants(session: Session, *, limit: int, after: str | None) -> list[Tenant]:
    return TenantRepository(session).list(limit=limit, after=after)


def create_key(
    session: Session, tenant_id: str, *, name: str | None = None, scopes: Iterable[Scope] = ALL_SCOPES
) -> IssuedKey:
    get_tenant(session, tenant_id)
    secret = generate_key()
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant_id,
        prefix=secret[:VISIBLE_PREFIX_LEN],
        key_hash=hash_key(secret),
        name=name,
        scopes=sorted(Scope(s).value for s in scopes),
    )
    ApiKeyRepository(session).add(key)
    return IssuedKey(key=key, secret=secret)


def own_tenant(principal: Principal, tenant_id: str) -> str:
    """`tenant_id`, if the caller may manage it: the admin any tenant, a tenant key only its own (another
    tenant is not found, as every foreign id is)."""
    if principal.tenant_id is not None and principal.tenant_id != tenant_id:
        raise NotFound(f"no tenant {tenant_id!r}", code="tenant_not_found", param="tenant_id")
    return tenant_id


def list_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    get_tenant(session, tenant_id)
    return ApiKeyRepository(session).list_for_tenant(tenant_id)


def revoke_key(session: Session, key_id: str, *, tenant_id: str | None = None) -> None:
    """Revoke a key; with `tenant_id` (a tenant managing its own keys) another tenant's key is not found."""
    repo = ApiKeyRepository(session)
    key = repo.get(key_id)
    if key is None or key.revoked_at is not None or (tenant_id is not None and key.tenant_id != tenant_id):
        raise NotFound(f"no active key {key_id!r}", code="key_not_found", param="key_id")
    repo.revoke(key, utcnow())


def authenticate(session: Session, raw_key: str | None, *, admin_key: str | None) -> Principal:
    """Resolve a bearer token to the admin or a tenant; Unauthorized otherwise."""
    if not raw_key:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    if admin_key and hmac.compare_digest(raw_key.encode(), admin_key.encode()):
        return Principal(is_admin=True)
    key = ApiKeyRepository(session).find_active_by_hash(hash_key(raw_key))
    if key is None:
        raise Unauthorized("invalid or revoked API key")
    return _principal(key)


def _principal(key: ApiKey) -> Principal:
    """Who calls with this stored (active) key."""
    return Principal(is_admin=False, tenant_id=key.tenant_id, key_id=key.id, scopes=_held(key))


def _held(key: ApiKey) -> frozenset[Scope]:
    """A stored key's scopes (a name this version does not know grants nothing)."""
    return frozenset(s for s in Scope if s.value in (key.scopes or ()))


class Authenticator:
    """`authenticate` with the answers for valid tenant keys remembered for ``ttl_s`` seconds.

    Bound on revocation: a key revoked through this process (:meth:`forget_key`) is refused at once; one
    revoked through another process at most ``ttl_s`` seconds later. Unknown keys are never remembered.
    Keys in use are revalidated ahead of expiry, all in one query (:class:`RevalidatingCache`), so a
    tenant's requests do not pay a database read every ``ttl_s``.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        admin_key: str | None,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = session_factory
        self._admin_key = admin_key
        self.cache: RevalidatingCache[str, Principal] = RevalidatingCache(
            ttl_s, self._still_valid, name="API keys", clock=clock
        )

    def cached(self, raw_key: str | None) -> Principal | None:
        """The principal without touching the database (admin, or a remembered key), else None."""
        if not raw_key:
            return None
        if self._admin_key and hmac.compare_digest(raw_key.encode(), self._admin_key.encode()):
            return Principal(is_admin=True)
        return self.cache.get(hash_key(raw_key))

    def authenticate(self, raw_key: str | None) -> Principal:
        """Blocking (a query on a miss): the principal, or Unauthorized."""
        hit = self.cached(raw_key)
        if hit is not None:
            return hit
        read_at = self.cache.clock()
        principal = retry_read(self._factory, lambda s: authenticate(s, raw_key, admin_key=self._admin_key))
        if raw_key and not principal.is_admin:
            self.cache.put(hash_key(raw_key), principal, read_at)
        return principal

    def _still_valid(self, held: Mapping[str, Principal]) -> dict[str, bool]:
        """Per key hash: whether the key is still active with the same tenant and scopes."""

        def read(session: Session) -> dict[str, Principal]:
            keys = ApiKeyRepository(session).find_active_by_hashes(held)
            return {k.key_hash: _principal(k) for k in keys}

        now = retry_read(self._factory, read)
        return {h: now.get(h) == principal for h, principal in held.items()}

    def start(self) -> None:
        """Revalidate the keys in use from now on (on the event loop that serves the requests)."""
        self.cache.start()

    async def aclose(self) -> None:
        await self.cache.aclose()

    def forget_key(self, key_id: str) -> None:
        self.cache.discard_where(lambda _, p: p.key_id == key_id)


def load_or_create_admin_key(var_dir: Path) -> str:
    """The embedded mode's admin key: read from `var_dir/admin_key`, or generated there (mode 600) once."""
    path = var_dir / "admin_key"
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key
    var_dir.mkdir(parents=True, exist_ok=True)
    key = "admin_" + secrets.token_urlsafe(24)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def resolve_admin_key(settings: Settings) -> Settings:
    """Embedded mode without ACTPROMPT_ADMIN_KEY: the key stored under var_dir (generated once)."""
    if settings.admin_key or not settings.is_embedded:
        return settings
    return settings.model_copy(update={"admin_key": load_or_create_admin_key(settings.var_dir)})
