"""Alembic from code: upgrade to head, and the check the server runs before it starts."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from service.db.session import normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class DatabaseNotMigrated(RuntimeError):
    """The database schema is not at the migrations' head."""


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # `%` would be read as interpolation by configparser.
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_migrated_url(database_url: str) -> None:
    """`check_migrated` on a throw-away engine (start-up checks: forked children must not inherit it)."""
    from service.db.session import make_engine

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
