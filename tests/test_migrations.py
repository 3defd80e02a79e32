"""The Alembic migrations build exactly the schema of `sessiond.store.tables`, on both backends, and the
`sessiond migrate` command applies them."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import POSTGRES_URL, DatabaseTarget
from sqlalchemy import Connection, inspect

from sessiond.store import migrate
from sessiond.store.database import Database
from sessiond.store.tables import metadata

ROOT = Path(__file__).resolve().parent.parent
PYTHON = (
    ROOT / ".venv" / "bin" / "python"
    if (ROOT / ".venv" / "bin" / "python").exists()
    else Path(sys.executable)
)
TABLES = set(metadata.tables)


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, metadata))


def _schema(connection: Connection) -> dict[str, Any]:
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    return {
        "tables": tables,
        "columns": {t: {c["name"] for c in inspector.get_columns(t)} for t in tables & TABLES},
        "indexes": {t: {i["name"] for i in inspector.get_indexes(t)} for t in tables & TABLES},
    }


async def test_migrations_build_exactly_the_tables_module(fresh_database: DatabaseTarget) -> None:
    db = Database(fresh_database.url, schema=fresh_database.schema)
    await db.open()
    try:
        assert await migrate.current_revision(db) is None
        async with db.engine.connect() as conn:
            before = await conn.run_sync(_schema)
        assert before["tables"] & TABLES == set()

        await migrate.upgrade(db)
        assert await migrate.current_revision(db) == migrate.head_revision()
        async with db.engine.connect() as conn:
            differences = await conn.run_sync(_differences)
            schema = await conn.run_sync(_schema)
        assert differences == [], "the migrations and sessiond/store/tables.py disagree"
        assert schema["tables"] >= TABLES | {"alembic_version"}
        for table in metadata.sorted_tables:
            assert schema["columns"][table.name] == {c.name for c in table.columns}, table.name
            named = {i.name for i in table.indexes}
            assert named <= schema["indexes"][table.name], table.name

        # Upgrading again is a no-op.
        await migrate.upgrade(db)
        assert await migrate.current_revision(db) == migrate.head_revision()
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
    finally:
        await db.close()


async def test_comparison_notices_a_schema_that_drifted(fresh_database: DatabaseTarget) -> None:
    """The check above can fail: a column the tables module does not know is reported."""
    db = Database(fresh_database.url, schema=fresh_database.schema)
    await db.open()
    try:
        await migrate.upgrade(db)

        def drift(connection: Connection) -> list[Any]:
            connection.exec_driver_sql("ALTER TABLE agents ADD COLUMN stray INTEGER")
            connection.exec_driver_sql("CREATE INDEX ix_stray ON sessions (user_id)")
            return _differences(connection)

        async with db.engine.begin() as conn:
            differences = await conn.run_sync(drift)
        kinds = {d[0] for d in differences if isinstance(d, tuple)}
        assert {"remove_column", "remove_index"} <= kinds, differences
    finally:
        await db.close()


async def _run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(PYTHON),
        "-m",
        "sessiond.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_migrate_cli_on_a_fresh_database(fresh_database: DatabaseTarget, tmp_path: Path) -> None:
    head = migrate.head_revision()
    assert head
    env: dict[str, str] = {}
    url = fresh_database.url
    if fresh_database.backend == "sqlite":
        path = tmp_path / "nested" / "dir" / "cli.db"  # directories are created as needed
        url = f"sqlite:///{path}"
    else:
        assert fresh_database.schema
        env["SESSIOND_DATABASE_SCHEMA"] = fresh_database.schema
    code, out, err = await _run_cli("migrate", "--database-url", url, env=env)
    assert code == 0, err
    assert f"schema at revision {head} ({fresh_database.backend})" in out

    if fresh_database.backend == "sqlite":
        with sqlite3.connect(path) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert version == [(head,)]
        assert journal == "wal"
    else:
        pg = await asyncpg.connect(POSTGRES_URL)
        try:
            rows = await pg.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                fresh_database.schema,
            )
            version = await pg.fetch(f"SELECT version_num FROM {fresh_database.schema}.alembic_version")
        finally:
            await pg.close()
        tables = {r["table_name"] for r in rows}
        assert [tuple(r) for r in version] == [(head,)]
    assert tables >= TABLES | {"alembic_version"}

    # Running it again on a database at head changes nothing and succeeds.
    code, out, err = await _run_cli("migrate", "--database-url", url, env=env)
    assert code == 0, err
    assert f"schema at revision {head} ({fresh_database.backend})" in out
    db = Database(url, schema=fresh_database.schema)
    await db.open()
    try:
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
    finally:
        await db.close()


async def test_migrate_cli_rejects_an_unsupported_database(tmp_path: Path) -> None:
    code, _out, err = await _run_cli("migrate", "--database-url", f"mysql://u@localhost/{tmp_path.name}")
    assert code != 0
    assert "unsupported database" in err


async def test_a_schema_named_in_the_settings_is_made_when_missing() -> None:
    """SESSIOND_DATABASE_SCHEMA naming a schema nobody created: before, the start failed with "no schema
    has been selected to create in"; now the migration makes it."""
    schema = f"made_{os.urandom(5).hex()}"
    db = Database(POSTGRES_URL, schema=schema)
    await db.open()
    try:
        await migrate.upgrade(db)
        assert await migrate.current_revision(db) == migrate.head_revision()
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            tables = await conn.fetchval(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1", schema
            )
        finally:
            await conn.close()
        assert tables >= len(metadata.tables)
    finally:
        await db.close()
        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()
