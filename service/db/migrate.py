"""Alembic from code: upgrade to head, and the check the server runs before it starts."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, make_url, pool, text

from service.db.session import make_engine, normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class DatabaseNotMigrated(RuntimeError):
    """The database schema is not at the migrations' head."""


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # `%` would be read as interpolation by configparser.
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


#: The PostgreSQL advisory-lock key that serialises upgrades ("actp" in ASCII).
MIGRATION_LOCK_KEY = 0x61637470


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to `revision`, one process at a time: `serve --workers N`, several gateway replicas or a
    gateway and `actprompt db upgrade` may all start on one fresh database, and two Alembic runs racing
    on it fail ("table ... already exists"); under the lock the second finds the work done."""
    with migration_lock(url):
        command.upgrade(alembic_config(url), revision)


@contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """A lock held across the database's users: a session advisory lock on PostgreSQL, an exclusive
    `flock` on a file beside a SQLite database (in-memory databases have a single user)."""
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "postgresql":
        engine = make_engine(normalize_url(url), poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        finally:
            engine.dispose()
        return
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    path = Path(database).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".migrate-lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_migrated_url(database_url: str) -> None:
    """`check_migrated` on a throw-away engine (start-up checks: forked children must not inherit it)."""
    engine = make_engine(database_url)
    try:
        check_migrated(engine)
    finally:
        engine.dispose()


def check_migrated(engine: Engine) -> None:
    """Raise `DatabaseNotMigrated` with the command that fixes it."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise DatabaseNotMigrated(
            f"database {engine.url.render_as_string(hide_password=True)} is at revision {current or 'none'}, "
            f"the code needs {head}; run `actprompt db upgrade` (with the same ACTPROMPT_DATABASE_URL) first"
        )
