"""Tenants and their API keys (admin scope: these are not tenant-filtered)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Tenant
from service.db.repositories.base import in_lists


class TenantRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, tenant: Tenant) -> Tenant:
        self.session.add(tenant)
        self.session.flush()
        return tenant

    def get(self, tenant_id: str) -> Tenant | None:
        return self.session.get(Tenant, tenant_id)

    def list(self, *, limit: int, after: str | None = None) -> list[Tenant]:
        stmt = select(Tenant).order_by(Tenant.id.desc()).limit(limit)
        if after:
            stmt = stmt.where(Tenant.id < after)
        return list(self.session.scalars(stmt))


class ApiKeyRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        self.session.flush()
        return key

    def get(self, key_id: str) -> ApiKey | None:
        return self.session.get(ApiKey, key_id)

    def find_active_by_hash(self, key_hash: str) -> ApiKey | None:
        stmt = select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        return self.session.scalars(stmt).first()

    def find_active_by_hashes(self, key_hashes: Collection[str]) -> list[ApiKey]:
        """The active keys among these hashes, one query per IN list."""
        out: list[ApiKey] = []
        for hashes in in_lists(key_hashes):
            stmt = select(ApiKey).where(ApiKey.key_hash.in_(hashes), ApiKey.revoked_at.is_(None))
            out.extend(self.session.scalars(stmt))
        return out

    def list_for_tenant(self, tenant_id: str) -> list[ApiKey]:
        stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.id)
        return list(self.session.scalars(stmt))

    def revoke(self, key: ApiKey, when: datetime) -> None:
        key.revoked_at = when
        self.session.flush()
