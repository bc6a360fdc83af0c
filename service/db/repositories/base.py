"""The tenant-scoped base repository and a cursor page."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from service.db.base import Base

M = TypeVar("M", bound=Base)
T = TypeVar("T")

#: values per ``IN (...)`` list: far below any database's limit on bound parameters
IN_LIST_SIZE = 500


def in_lists(values: Collection[str]) -> Iterator[list[str]]:
    """``values`` sorted, in lists of at most IN_LIST_SIZE: one ``IN (...)`` query each."""
    ordered = sorted(values)
    for i in range(0, len(ordered), IN_LIST_SIZE):
        yield ordered[i : i + IN_LIST_SIZE]


@dataclass
class Page(Generic[T]):
    items: list[T]
    has_more: bool
    next_cursor: str | None


class TenantScopedRepository(Generic[M]):
    """Every statement starts from `base_statement()`, which already filters by the tenant."""

    model: ClassVar[type[Any]]

    def __init__(self, session: Session, tenant_id: str) -> None:
        self.session = session
        self.tenant_id = tenant_id

    def check_tenant(self, row: Any) -> None:
        """A row written here must belong to the tenant (a bug otherwise, caught even under -O)."""
        if row.tenant_id != self.tenant_id:
            raise ValueError(f"row of tenant {row.tenant_id!r} written through tenant {self.tenant_id!r}")

    def base_statement(self) -> Select[M]:
        return select(self.model).where(self.model.tenant_id == self.tenant_id)
