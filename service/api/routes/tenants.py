"""Tenants (the admin key) and their API keys (the admin key, or a tenant key with the `admin` scope for
its own tenant's keys)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import AdminDep, AuthenticatorDep, KeyAdminDep, PageDep, SessionDep
from service.api.routing import CheckedRoute
from service.api.schemas.common import ERROR_RESPONSES, ListPublic
from service.api.schemas.tenants import (
    KeyCreate,
    KeyCreated,
    KeyPublic,
    TenantCreate,
    TenantCreated,
    TenantPublic,
)
from service.db.models import ApiKey, Tenant
from service.domain import tenants

router = APIRouter(route_class=CheckedRoute, tags=["admin"], responses=ERROR_RESPONSES)


def _tenant(t: Tenant) -> TenantPublic:
    return TenantPublic(id=t.id, name=t.name, created_at=t.created_at)


def _key(k: ApiKey) -> KeyPublic:
    return KeyPublic(
        id=k.id,
        tenant_id=k.tenant_id,
        prefix=k.prefix,
        name=k.name,
        scopes=sorted(tenants.parse_scopes(k.scopes)),
        created_at=k.created_at,
        revoked_at=k.revoked_at,
    )


@router.post("/v1/tenants", status_code=201, response_model=TenantCreated)
def create_tenant(body: TenantCreate, _: AdminDep, session: SessionDep) -> TenantCreated:
    tenant, issued = tenants.create_tenant(session, body.name)
    session.commit()
    return TenantCreated(**_tenant(tenant).model_dump(), api_key=issued.secret, key_id=issued.key.id)


@router.get("/v1/tenants", response_model=ListPublic[TenantPublic])
def list_tenants(_: AdminDep, session: SessionDep, page: PageDep) -> ListPublic[TenantPublic]:
    return page.answer(
        tenants.list_tenants(session, limit=page.fetch, after=page.after), lambda t: t.id, _tenant
    )


@router.get("/v1/tenants/{tenant_id}", response_model=TenantPublic)
def get_tenant(tenant_id: str, principal: KeyAdminDep, session: SessionDep) -> TenantPublic:
    return _tenant(tenants.get_tenant(session, tenants.own_tenant(principal, tenant_id)))


@router.post("/v1/tenants/{tenant_id}/keys", status_code=201, response_model=KeyCreated)
def create_key(
    tenant_id: str, principal: KeyAdminDep, session: SessionDep, body: KeyCreate | None = None
) -> KeyCreated:
    body = body or KeyCreate()
    owned = tenants.own_tenant(principal, tenant_id)
    issued = tenants.create_key(session, owned, name=body.name, scopes=body.scopes)
    session.commit()
    return KeyCreated(**_key(issued.key).model_dump(), api_key=issued.secret)


@router.get("/v1/tenants/{tenant_id}/keys", response_model=ListPublic[KeyPublic])
def list_keys(tenant_id: str, principal: KeyAdminDep, session: SessionDep) -> ListPublic[KeyPublic]:
    keys = tenants.list_keys(session, tenants.own_tenant(principal, tenant_id))
    return ListPublic[KeyPublic](data=[_key(k) for k in keys], has_more=False)


@router.delete("/v1/keys/{key_id}", status_code=204)
def revoke_key(key_id: str, principal: KeyAdminDep, session: SessionDep, auth: AuthenticatorDep) -> Response:
    """Refused at once by this process; by other API processes within `auth_cache_seconds`."""
    tenants.revoke_key(session, key_id, tenant_id=principal.tenant_id)
    session.commit()
    auth.forget_key(key_id)
    return Response(status_code=204)
