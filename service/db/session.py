"""Engine and session factory: one per process, built from the database URL."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

SessionFactory = sessionmaker[Session]
T = TypeVar("T")
log = logging.getLogger("actprompt.db")


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (psycopg2 is not a dependency)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine; SQLite: the folder is created, WAL + a busy timeout let threads share the file."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(bind=engine, expire_on_commit=False)


def is_disconnect(exc: BaseException) -> bool:
    """A database error that means "the connection died" (backend terminated, server restarted, network)."""
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_read(factory: SessionFactory, read: Callable[[Session], T]) -> T:
    """Run a read-only unit of work; once more, on a fresh connection, if its connection died mid-flight.

    Pre-ping catches a connection that died while it sat in the pool, but not one that dies between the
    ping and the query (`pg_terminate_backend`, a failover): SQLAlchemy then invalidates it and raises.
    A read has no side effect, so one retry on a new connection is safe; a write is never retried here.
    """
    try:
        with factory() as session:
            return read(session)
    except DBAPIError as exc:
        if not is_disconnect(exc):
            raise
        log.warning("database connection lost during a read; retrying once", extra={"error": str(exc)[:200]})
    with factory() as session:
        return read(session)
