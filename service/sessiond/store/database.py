"""Engines, transactions and migrations for SQLite (aiosqlite) and PostgreSQL (asyncpg).

Writes go through `Database.write(op)`, where `op` is an async function of a connection that runs inside
one transaction. On SQLite a single writer connection commits concurrent writes together (group commit:
one BEGIN IMMEDIATE ... COMMIT for every operation queued meanwhile), which is what SQLite's one-writer
model rewards. If any operation of a group fails, the group is rolled back and each operation is run again
in a transaction of its own, so one caller's error never fails another's write. On PostgreSQL every write
is its own transaction on the pool; row locks order concurrent writers, and a transaction that loses a
race (serialization failure, deadlock, unique violation) is run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[AsyncConnection], Awaitable[T]]

_RETRY_SQLSTATES = {"40001", "40P01", "23505"}


def normalize_url(url: str) -> URL:
    """Accepts plain `sqlite:///` and `postgresql://` URLs and picks the async drivers."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"unsupported database {backend!r}: use sqlite:/// or postgresql://")
    return parsed


class Database:
    """The store's connection to its database. Nothing connects until `open()`."""

    def __init__(
        self, url: str, *, schema: str | None = None, pool_size: int = 10, max_batch: int = 256
    ) -> None:
        self.url = normalize_url(url)
        self.dialect = "sqlite" if self.url.get_backend_name() == "sqlite" else "postgresql"
        self.schema = schema
        self._pool_size = pool_size
        self._max_batch = max_batch
        self._engine: AsyncEngine | None = None
        self._writer_engine: AsyncEngine | None = None
        self._queue: asyncio.Queue[tuple[Op[Any], asyncio.Future[Any]]] | None = None
        self._writer_task: asyncio.Task[None] | None = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.open() was not called")
        return self._engine

    async def open(self) -> None:
        if self.dialect == "sqlite":
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self._engine = self._sqlite_engine(immediate=False, pool_size=self._pool_size)
            self._writer_engine = self._sqlite_engine(immediate=True, pool_size=1)
            self._queue = asyncio.Queue()
            self._writer_task = asyncio.create_task(self._writer_loop(), name="sqlite-writer")
        else:
            connect_args: dict[str, Any] = {}
            if self.schema:
                connect_args["server_settings"] = {"search_path": self.schema}
            self._engine = create_async_engine(
                self.url, pool_size=self._pool_size, max_overflow=self._pool_size, connect_args=connect_args
            )

    def _sqlite_engine(self, *, immediate: bool, pool_size: int) -> AsyncEngine:
        engine = create_async_engine(
            self.url, pool_size=pool_size, max_overflow=0, connect_args={"timeout": 30}
        )
        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, decide when transactions begin (the documented recipe
            # for savepoints and transactional DDL on pysqlite/aiosqlite).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA synchronous=NORMAL",
                "PRAGMA foreign_keys=ON",
                "PRAGMA busy_timeout=30000",
            ):
                cursor.execute(pragma)
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql(begin)

        return engine

    async def close(self) -> None:
        if self._writer_task is not None:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        for engine in (self._writer_engine, self._engine):
            if engine is not None:
                await engine.dispose()
        self._engine = self._writer_engine = None

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            log.warning("database ping failed", exc_info=True)
            return False

    async def read(self, op: Op[T]) -> T:
        async with self.engine.connect() as conn:
            return await op(conn)

    async def write(self, op: Op[T]) -> T:
        if self._queue is not None:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._queue.put_nowait((op, future))
            return await future
        for attempt in range(5):
            try:
                async with self.engine.begin() as conn:
                    return await op(conn)
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(
                    getattr(exc.orig, "__cause__", None), "sqlstate", None
                )
                if sqlstate not in _RETRY_SQLSTATES or attempt == 4:
                    raise
                log.debug("retrying a write after %s (attempt %d)", sqlstate, attempt + 1)
                await asyncio.sleep(0.001 * 2**attempt)
        raise AssertionError("unreachable")

    async def _writer_loop(self) -> None:
        assert self._queue is not None and self._writer_engine is not None
        queue = self._queue
        async with self._writer_engine.connect() as conn:
            while True:
                batch = [await queue.get()]
                while len(batch) < self._max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                batch = [(op, fut) for op, fut in batch if not fut.done()]
                if batch:
                    await self._run_batch(conn, batch)

    async def _run_batch(
        self, conn: AsyncConnection, batch: list[tuple[Op[Any], asyncio.Future[Any]]]
    ) -> None:
        results: list[Any] = []
        try:
            async with conn.begin():
                for op, _ in batch:
                    results.append(await op(conn))
        except asyncio.CancelledError:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(RuntimeError("the database is shutting down"))
            raise
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            # Someone's operation failed: run each on its own so the others still land.
            for op, fut in batch:
                try:
                    async with conn.begin():
                        result = await op(conn)
                except Exception as single_exc:
                    _settle(fut, exc=single_exc)
                else:
                    _settle(fut, result=result)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            _settle(fut, result=result)


def _settle(fut: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def is_unique_violation(exc: BaseException) -> bool:
    return isinstance(exc, IntegrityError)
