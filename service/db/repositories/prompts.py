"""Prompt versions, tenant-scoped; the artifact bytes are deferred and loaded only on demand."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, undefer

from service.db.models import Prompt
from service.db.repositories.base import TenantScopedRepository, in_lists


class PromptRepository(TenantScopedRepository[Prompt]):
    model = Prompt

    def add(self, prompt: Prompt) -> Prompt:
        self.check_tenant(prompt)
        self.session.add(prompt)
        self.session.flush()
        return prompt

    def get(
        self, prompt_id: str, version: int | None = None, *, with_artifact: bool = False
    ) -> Prompt | None:
        """A version, or the latest one when `version` is None."""
        stmt = self.base_statement().where(Prompt.prompt_id == prompt_id)
        if with_artifact:
            stmt = stmt.options(undefer(Prompt.artifact))
        stmt = (
            stmt.where(Prompt.version == version)
            if version is not None
            else stmt.order_by(Prompt.version.desc())
        )
        return self.session.scalars(stmt.limit(1)).first()

    def exists(self, prompt_id: str) -> bool:
        stmt = select(func.count()).where(Prompt.tenant_id == self.tenant_id, Prompt.prompt_id == prompt_id)
        return bool(self.session.scalar(stmt))

    def next_version(self, prompt_id: str) -> int:
        stmt = select(func.max(Prompt.version)).where(Prompt.prompt_id == prompt_id)
        return int(self.session.scalar(stmt) or 0) + 1

    def list_latest(self, *, limit: int, after: str | None = None) -> list[Prompt]:
        """The latest version of each prompt, newest prompt first."""
        latest = (
            select(Prompt.prompt_id, func.max(Prompt.version).label("version"))
            .where(Prompt.tenant_id == self.tenant_id)
            .group_by(Prompt.prompt_id)
            .subquery()
        )
        stmt = (
            self.base_statement()
            .join(latest, (Prompt.prompt_id == latest.c.prompt_id) & (Prompt.version == latest.c.version))
            .order_by(Prompt.prompt_id.desc())
            .limit(limit)
        )
        if after:
            stmt = stmt.where(Prompt.prompt_id < after)
        return list(self.session.scalars(stmt))

    def list_versions(self, prompt_id: str) -> list[Prompt]:
        stmt = self.base_statement().where(Prompt.prompt_id == prompt_id).order_by(Prompt.version.desc())
        return list(self.session.scalars(stmt))

    def delete(self, prompt_id: str, version: int | None = None) -> int:
        stmt = delete(Prompt).where(Prompt.tenant_id == self.tenant_id, Prompt.prompt_id == prompt_id)
        if version is not None:
            stmt = stmt.where(Prompt.version == version)
        return int(self.session.execute(stmt).rowcount)  # type: ignore[attr-defined]

    # --- system scope (the serving layer's loader, by internal key) ---------------------------------
    @staticmethod
    def load_artifact(session: Session, key: int) -> bytes | None:
        return session.scalar(select(Prompt.artifact).where(Prompt.key == key))

    @staticmethod
    def versions_of(session: Session, prompt_ids: Collection[str]) -> list[tuple[str, str, int, int]]:
        """(tenant_id, prompt_id, version, key) of every version of these prompts: light queries (no ORM
        objects), one per IN list."""
        out: list[tuple[str, str, int, int]] = []
        for ids in in_lists(prompt_ids):
            stmt = select(Prompt.tenant_id, Prompt.prompt_id, Prompt.version, Prompt.key).where(
                Prompt.prompt_id.in_(ids)
            )
            out.extend((t, p, v, k) for t, p, v, k in session.execute(stmt))
        return out
