"""Test harness: a real grpc.aio server on port 0 over a real database, called through the published client.

Every test that uses `server` or `client` runs twice: on a SQLite file and on the PostgreSQL server at
127.0.0.1:5432 (database `test`, a fresh schema per run). Time is a ManualClock that tests move.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from agentsessions import AsyncSessionsClient
from sessiond.config import Settings
from sessiond.domain.clock import ManualClock
from sessiond.server import RunningServer, start_server

POSTGRES_URL = os.environ.get("SESSIOND_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class DatabaseTarget:
    backend: str
    url: str
    schema: str | None = None


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
async def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[DatabaseTarget]:
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("sqlite") / "sessiond.db"
        yield DatabaseTarget("sqlite", f"sqlite:///{path}")
        return
    async with new_schema("t") as schema:
        yield DatabaseTarget("postgresql", POSTGRES_URL, schema)


@asynccontextmanager
async def new_schema(prefix: str) -> AsyncIterator[str]:
    """A schema of its own in the PostgreSQL test database, dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await _admin(f"CREATE SCHEMA {schema}")
    try:
        yield schema
    finally:  # on a connection of its own: a test may cut every connection to the database
        await _admin(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def fresh_database(database: DatabaseTarget, tmp_path: Path) -> AsyncIterator[DatabaseTarget]:
    """An empty database of the backend at hand: nothing has migrated it or written to it."""
    if database.backend == "sqlite":
        yield DatabaseTarget("sqlite", f"sqlite:///{tmp_path / 'fresh.db'}")
        return
    async with new_schema("f") as schema:
        yield DatabaseTarget("postgresql", database.url, schema)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def make_settings(database: DatabaseTarget, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database.url,
        "database_schema": database.schema,
        "listen": "127.0.0.1:0",
        "database_pool_size": 4,
        # Tests drive the sweeper themselves (server.sweeper.run_once()) with the injected clock.
        "sweeper_enabled": False,
        # The tests' servers run in the test process: its threads stay where the kernel puts them
        # (test_affinity.py turns it on).
        "cpu_affinity": "off",
        # The variables the chat-completions tests' agents read their keys from.
        "agent_key_vars": "TEST_LLM_KEY,TEST_LLM_MISSING_KEY",
    }
    return Settings.of(**{**values, **overrides})


@pytest.fixture
def settings(database: DatabaseTarget) -> Settings:
    return make_settings(database)


@asynccontextmanager
async def serving(settings: Settings, clock: ManualClock) -> AsyncIterator[RunningServer]:
    """A server started with `settings`, stopped at once afterwards."""
    running = await start_server(settings, clock=clock)
    try:
        yield running
    finally:
        await running.stop(0)


@pytest.fixture
async def server(settings: Settings, clock: ManualClock) -> AsyncIterator[RunningServer]:
    async with serving(settings, clock) as running:
        yield running


@asynccontextmanager
async def two_servers(
    settings: Settings, clock: ManualClock
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two servers on one database, as two replicas."""
    first = await start_server(settings, clock=clock)
    try:
        second = await start_server(settings, clock=clock)
        try:
            yield first, second
        finally:
            await second.stop(0)
    finally:
        await first.stop(0)


@asynccontextmanager
async def replica_clients(
    settings: Settings, clock: ManualClock
) -> AsyncIterator[tuple[AsyncSessionsClient, AsyncSessionsClient]]:
    """Two replicas (`two_servers`) and a client of each."""
    async with (
        two_servers(settings, clock) as (first, second),
        AsyncSessionsClient(f"127.0.0.1:{first.port}") as on_first,
        AsyncSessionsClient(f"127.0.0.1:{second.port}") as on_second,
    ):
        yield on_first, on_second


@pytest.fixture
def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
async def client(target: str) -> AsyncIterator[AsyncSessionsClient]:
    async with AsyncSessionsClient(target) as c:
        yield c


@pytest.fixture
def unique() -> str:
    """A fresh prefix, so tests sharing a database never see each other's rows."""
    return uuid.uuid4().hex[:10]
