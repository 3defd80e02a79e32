"""Schema migrations, applied through Alembic on the store's own connection."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from .database import Database

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed number: replicas starting together take turns at migrating.
_ADVISORY_LOCK = 0x5E5510D


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection, revision: str, schema: str | None) -> None:
    if connection.dialect.name == "postgresql":
        # A migration may wait for another replica's, and rewrite large tables: no time limits here.
        connection.execute(text("SET LOCAL lock_timeout = 0"))
        connection.execute(text("SET LOCAL statement_timeout = 0"))
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK})
        if schema:
            # SESSIOND_DATABASE_SCHEMA names where the tables go: made here if it is not there yet (before,
            # the start failed with "no schema has been selected to create in").
            quoted = connection.dialect.identifier_preparer.quote_identifier(schema)
            connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))
    command.upgrade(alembic_config(connection), revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(db: Database, revision: str = "head") -> None:
    """Brings the schema to `revision` (default: the newest)."""
    async with db.engine.begin() as conn:
        await conn.run_sync(_upgrade, revision, db.schema)


async def current_revision(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        return await conn.run_sync(_current)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
