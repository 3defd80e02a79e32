"""Engines, transactions and migrations for SQLite (aiosqlite) and PostgreSQL (asyncpg).

Store operations are plain functions of a SQLAlchemy `Connection` that run inside one transaction. How
they run depends on the database:

- PostgreSQL: each write is its own transaction on the asyncpg pool (`AsyncConnection.run_sync`); row
  locks order concurrent writers, and a transaction that loses a race (serialization failure, deadlock,
  unique violation) is run again. Appends and creates (operations with `run_many`) are the exception:
  they commit in groups, like on SQLite. One group is in flight at a time; those that arrive meanwhile
  form the next one, which under concurrent load waits a little for more (`GroupSizer`). A transaction
  costs several network round trips whatever it holds, so this turns 64 concurrent appends from 64
  transactions into one or two.
- SQLite reads: point reads (a session, a page of messages or events, an agent, a turn) run on the event
  loop itself with a plain `sqlite3` connection: an indexed read of a warm WAL database takes tens of
  microseconds, less than one trip to another thread and back (aiosqlite makes several per query: a
  50-message ListMessages went from 1.1 ms to 0.89 ms at p50, end to end, on this change alone). Reads
  that may scan (ListSessions with filters) go through the aiosqlite pool, so a long scan never stalls
  the loop. WAL keeps both beside the writer.
- SQLite writes: one writer thread with its own connection commits every operation queued meanwhile in
  one transaction (group commit), which is what SQLite's one-writer model rewards. If any operation of a
  group fails, the group is rolled back and each operation runs again in a transaction of its own, so
  one caller's error never fails another's write; under concurrent load a group waits a little for
  more (`GroupSizer`). Why a thread and not aiosqlite here: through aiosqlite every statement is a
  round trip to its thread and back through the event loop (0.40 ms measured on an idle loop, against
  0.05 ms for the statement itself), and a single writer pays that for every statement of every write
  in series; the writer thread pays one loop round trip per group.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[Connection], T]
Outcome = tuple[Any, BaseException | None]  # (result, None) or (None, exception)
# An operation may also have an `after_commit()` method: called on the event loop once its transaction
# committed, whether or not its caller still waits (a cancelled RPC's write commits all the same, and
# what must follow a commit, such as publishing its events, must follow it too).

_RETRY_SQLSTATES = {"40001", "40P01", "23505"}
# lock_not_available (lock_timeout), query_canceled (statement_timeout): the database is busy, not the
# request wrong.
TIMEOUT_SQLSTATES = {"55P03", "57014"}
_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)
# SQLite with no lock timeout: how long a write waits for the database's write lock (the driver's longest).
_SQLITE_NO_LOCK_TIMEOUT = (2**31 - 1) / 1000


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL error code of a failed statement (asyncpg's, under SQLAlchemy's wrapper), if any."""
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)


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
        self,
        url: str,
        *,
        schema: str | None = None,
        pool_size: int = 10,
        max_batch: int = 256,
        write_linger: float = 0.01,
        lock_timeout: float = 0,
        statement_timeout: float = 0,
    ) -> None:
        """`lock_timeout`, `statement_timeout` (seconds, 0 for none): how long a statement waits for a lock
        another client holds, and (PostgreSQL) runs, before it fails (`database_unavailable`). Without
        them a row lock held by another client stalled every grouped write behind it, and a shutdown with
        them. On SQLite the lock is the database's write lock (its busy timeout).

        `write_linger` (seconds, 0 for never): how long a group commit may wait for more operations
        before it starts, which it does only under concurrent load (`GroupSizer`)."""
        self.url = normalize_url(url)
        self.dialect = "sqlite" if self.url.get_backend_name() == "sqlite" else "postgresql"
        self.schema = schema
        self._timeouts = {"lock_timeout": lock_timeout, "statement_timeout": statement_timeout}
        self._pool_size = pool_size
        self._max_batch = max_batch
        self._engine: AsyncEngine | None = None
        self._read_engine: AsyncEngine | None = None  # PostgreSQL reads: the same pool, in autocommit
        self._writer: _SQLiteWriter | None = None
        self._inline: Engine | None = None  # SQLite point reads, on the loop's thread
        # ...all on one connection, held open: in autocommit each statement sees the latest commit, and a
        # read runs to its end without yielding, so nothing else uses the connection meanwhile (a pool
        # checkout and return per read was a tenth of a ListMessages).
        self._inline_conn: Connection | None = None
        # PostgreSQL group commit: operations waiting for the next group, and the task running groups.
        self._pending: list[tuple[Op[Any], asyncio.Future[Any]]] = []
        self._grouper: asyncio.Task[None] | None = None
        # PostgreSQL writes run on their own, whose callers may have gone away: `close` waits for them too.
        self._solo: set[asyncio.Task[Any]] = set()
        # When a group waits for more (both backends; the SQLite writer thread is given it).
        self._sizer = GroupSizer(max_batch, write_linger)
        self._more = asyncio.Event()  # PostgreSQL: set when as many operations wait as the group waits for

    def _sqlite_lock_timeout(self) -> float:
        return self._timeouts["lock_timeout"] or _SQLITE_NO_LOCK_TIMEOUT

    def asyncpg_dsn(self) -> str:
        """The PostgreSQL URL as asyncpg itself takes it (for connections outside the pool)."""
        return self.url.set(drivername="postgresql").render_as_string(hide_password=False)

    @property
    def writer_thread_id(self) -> int | None:
        """The native id of the SQLite writer's thread (None on PostgreSQL, or before `open`)."""
        return self._writer.thread_id if self._writer is not None else None

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
            # Reads run in autocommit (each statement sees a consistent WAL snapshot) with no reset on
            # return: every avoided BEGIN / ROLLBACK is an avoided trip through aiosqlite's thread.
            self._engine = create_async_engine(
                self.url,
                pool_size=self._pool_size,
                max_overflow=0,
                pool_reset_on_return=None,
                isolation_level="AUTOCOMMIT",
                connect_args={"timeout": self._sqlite_lock_timeout()},
            )
            _sqlite_setup(self._engine.sync_engine, begin=None)
            sync_url = self.url.set(drivername="sqlite+pysqlite")
            self._inline = create_engine(
                sync_url,
                pool_size=1,
                max_overflow=0,
                pool_reset_on_return=None,
                isolation_level="AUTOCOMMIT",
                connect_args={"timeout": self._sqlite_lock_timeout(), "check_same_thread": False},
            )
            _sqlite_setup(self._inline, begin=None)
            self._inline_conn = self._inline.connect()
            writer_engine = create_engine(
                sync_url,
                pool_size=1,
                max_overflow=0,
                connect_args={"timeout": self._sqlite_lock_timeout(), "check_same_thread": False},
            )
            _sqlite_setup(writer_engine, begin="BEGIN IMMEDIATE")
            self._writer = _SQLiteWriter(
                writer_engine, asyncio.get_running_loop(), self._max_batch, self._sizer
            )
        else:
            settings = {name: f"{round(seconds * 1000)}ms" for name, seconds in self._timeouts.items()}
            if self.schema:
                settings["search_path"] = self.schema
            self._engine = create_async_engine(
                self.url,
                pool_size=self._pool_size,
                max_overflow=self._pool_size,
                connect_args={"server_settings": settings},
            )
            # Reads run in autocommit: under READ COMMITTED each statement sees its own snapshot whether or
            # not a transaction wraps them, and the BEGIN and the ROLLBACK on return were two of a point
            # read's four round trips.
            self._read_engine = self._engine.execution_options(isolation_level="AUTOCOMMIT")

    async def close(self, wait_seconds: float = 10.0) -> None:
        """Closes the connections, after the writes under way, grouped or not, whether or not their callers
        still wait (for up to `wait_seconds`: a database that does not answer must not keep the process
        from stopping)."""
        running = [*([self._grouper] if self._grouper is not None else []), *self._solo]
        if running:
            _, pending = await asyncio.wait(running, timeout=wait_seconds)
            if pending:
                log.warning("closing the database with writes still waiting for it")
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            self._grouper = None
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)
            self._writer = None
        if self._inline_conn is not None:
            self._inline_conn.close()
            self._inline_conn = None
        if self._inline is not None:
            self._inline.dispose()
            self._inline = None
        self._read_engine = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            log.warning("database ping failed", exc_info=True)
            return False

    async def read(self, op: Op[T], *, scan: bool = False) -> T:
        """Runs `op` on a read connection. `scan`: it may read many rows, so on SQLite it must not run
        on the loop's thread."""
        if self._inline is not None and not scan:
            inline = self._inline_conn
            if inline is None:  # dropped after a failure: the read that comes next connects again
                inline = self._inline_conn = self._inline.connect()
            try:
                return op(inline)
            except DBAPIError:
                # A statement that failed in the driver may leave the connection in a failed state: the
                # next read starts on a new one (`invalidate` keeps the pool from handing this one back).
                self._inline_conn = None
                with contextlib.suppress(Exception):
                    inline.invalidate()
                    inline.close()
                raise
        async with (self._read_engine or self.engine).connect() as conn:
            return await conn.run_sync(op)

    async def write_each(self, ops: Sequence[Op[Any]]) -> list[Outcome]:
        """Runs `ops` as that many writes made at once, which join the same group commits where they can,
        and returns each one's outcome: (its result, None) or (None, its exception). On SQLite they reach
        the writer together, with one future for all of them: a BatchAppendMessages call's entries each
        paid a task, a future and a trip through the loop of their own before."""
        if self._writer is not None:
            return await self._writer.submit_each(ops)
        # Submitted at once and shielded: if the caller goes away they all still run, as on SQLite.
        tasks = [self._under_way(asyncio.ensure_future(self.write(op))) for op in ops]
        results = await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        return [(None, r) if isinstance(r, BaseException) else (r, None) for r in results]

    async def write(self, op: Op[T]) -> T:
        if self._writer is not None:
            return await self._writer.submit(op)
        if hasattr(op, "run_many"):
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._pending.append((op, future))
            if self._sizer.filled(len(self._pending)):
                self._more.set()
            if self._grouper is None or self._grouper.done():
                self._grouper = asyncio.create_task(self._run_groups())
            return await future
        # Once started, a write runs to its end even if its caller goes away (a cancelled or timed-out RPC),
        # as on SQLite's writer thread: cancelling asyncpg mid-statement broke the connection and left a
        # "Future exception was never retrieved" error in the log. The outcome is then dropped.
        task = asyncio.ensure_future(self._transaction(op))
        task.add_done_callback(functools.partial(_committed, op))
        return await asyncio.shield(self._under_way(task))

    def _under_way(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """`task`, a PostgreSQL write whose caller may go away, kept until done: `close` waits for it."""
        self._solo.add(task)
        task.add_done_callback(self._solo.discard)
        return task

    async def _transaction(self, op: Op[T]) -> T:
        """`op` in a transaction of its own, run again when it loses a race."""
        for attempt in range(5):
            try:
                async with self.engine.begin() as conn:
                    return await conn.run_sync(op)
            except DBAPIError as exc:
                state = sqlstate(exc)
                if state not in _RETRY_SQLSTATES or attempt == 4:
                    raise
                log.debug("retrying a write after %s (attempt %d)", state, attempt + 1)
                await asyncio.sleep(0.001 * 2**attempt)
        raise AssertionError("unreachable")

    async def _run_groups(self) -> None:
        """PostgreSQL group commit: while operations wait, runs up to `max_batch` of them in one
        transaction. If the group fails as a whole, each runs in a transaction of its own, so that one
        caller's failure is never another's."""
        while self._pending:
            batch: list[tuple[Op[Any], asyncio.Future[Any]]] = []
            try:
                await self._gather()
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                self._sizer.ran(len(batch))
                ops = [op for op, _ in batch]
                try:
                    outcomes = await self._transaction(functools.partial(_run_grouped, ops=ops))
                except Exception as exc:
                    if len(ops) == 1:
                        outcomes = [(None, exc)]
                    else:
                        outcomes = list(await asyncio.gather(*(self._outcome(op) for op in ops)))
            except asyncio.CancelledError:  # `close` gave up on the database
                waiting = batch + self._pending
                self._pending.clear()
                _settle_all(waiting, [(None, _closed_error()) for _ in waiting])
                raise
            _settle_all(batch, outcomes)

    async def _gather(self) -> None:
        """Before a group: waits as `GroupSizer` says."""
        sizer = self._sizer
        want = sizer.target(len(self._pending))
        if not want:
            return
        self._more.clear()
        sizer.wanted = want
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._more.wait(), sizer.linger)
        finally:
            sizer.wanted = 0

    async def _outcome(self, op: Op[Any]) -> Outcome:
        try:
            return await self._transaction(op), None
        except Exception as exc:
            return None, exc


def _sqlite_setup(engine: Engine, *, begin: str | None) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (the documented recipe for
        # savepoints and transactional DDL on pysqlite and aiosqlite).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    if begin is not None:

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            try:
                _driver_sql(conn, begin)
            except sqlite3.Error as exc:  # SQLAlchemy does not wrap what a begin listener raises
                raise DBAPIError.instance(begin, None, exc, sqlite3.Error) from exc


def _driver_sql(conn: Connection, sql: str) -> Any:
    """Runs `sql` on the driver's own connection and returns the first column of its first row, if any.
    For the writer's per-group statements (BEGIN, PRAGMA data_version), SQLAlchemy's statement machinery
    cost more than the statements themselves."""
    driver = conn.connection.dbapi_connection
    assert driver is not None
    row = driver.execute(sql).fetchone()  # type: ignore[attr-defined]
    return None if row is None else row[0]


class GroupSizer:
    """When a group commit should wait for more operations before it starts (both backends).

    Under concurrent load a group taken as soon as one operation arrives is small, and each group has a
    fixed cost: a transaction, and on SQLite hand-overs of the one GIL between the event loop and the
    writer thread (on PostgreSQL, its round trips). So while the process is CPU-bound (it used `BUSY` of
    a core or more over the last `WINDOW` seconds) and recent groups held `LINGER_FROM` operations or
    more, the next group waits until as many as the largest of them lately are queued, for up to the
    linger. Callers waiting for their answers come back together, so the wait often ends before the
    linger does. A caller alone, or a few, never waits. The estimate decays group by group, so after a
    burst the writer soon goes back to starting each group at once.

    Both conditions are needed. Without the first, writes trickling in from independent callers at a
    moderate rate (one a millisecond) kept waiting for each other: a group of four formed once made the
    next wait for four, and so on, which tripled their latency for no gain in throughput. Without the
    second, a lone caller on a busy process waited out the linger on every write."""

    LINGER_FROM = 4
    DECAY = 0.9
    BUSY = 0.9
    WINDOW = 0.05

    def __init__(self, max_batch: int, linger: float) -> None:
        self.linger = linger
        self._max_batch = max_batch
        self._writers = 1.0  # how many operations tend to be under way at once: a decaying peak of groups
        self.wanted = 0  # while a group waits: how many queued operations end the wait (0: none waits)
        self._window = (time.monotonic(), time.process_time())
        self._busy = False

    def target(self, queued: int) -> int:
        """How many queued operations (`queued` now, the group's first included) the next group should
        wait for; 0 to start at once."""
        if self.linger <= 0:
            return 0
        want = min(self._max_batch, int(self._writers))
        return want if want >= self.LINGER_FROM and queued < want and self._cpu_bound() else 0

    def filled(self, queued: int) -> bool:
        """Whether a group waits and `queued` operations (its first included) end the wait."""
        return bool(self.wanted) and queued >= self.wanted

    def ran(self, size: int) -> None:
        self._writers = max(float(size), self._writers * self.DECAY)

    def _cpu_bound(self) -> bool:
        """Whether the process used `BUSY` of a core over the last window (the previous window's answer
        until this one is `WINDOW` long)."""
        wall, cpu = time.monotonic(), time.process_time()
        start_wall, start_cpu = self._window
        if wall > start_wall and wall - start_wall >= self.WINDOW:
            self._busy = cpu - start_cpu >= self.BUSY * (wall - start_wall)
            self._window = (wall, cpu)
        return self._busy


class WriteCache:
    """Rows the SQLite writer keeps between its transactions, so that a run of appends to the same
    sessions does not read each session row back (that read, with its conversion, was an eighth of an
    append's cost). Grouped operations read it and stage what they wrote; staged rows become visible
    only once their transaction commits. It is emptied whenever it could be stale: when another
    connection, in this process or another, committed to the database (SQLite's `PRAGMA data_version`,
    read inside the write lock), before any operation that is not grouped (it may change any row), and
    after any failure."""

    KEY = "sessiond.write_cache"

    def __init__(self, limit: int = 10_000) -> None:
        self._rows: dict[Any, Any] = {}
        self._staged: dict[Any, Any] = {}
        self._limit = limit
        self.enabled = True

    def get(self, key: Any) -> Any:
        return self._rows.get(key) if self.enabled else None

    def stage(self, key: Any, value: Any) -> None:
        if self.enabled:
            self._staged[key] = value

    def commit(self) -> None:
        if len(self._rows) + len(self._staged) > self._limit:
            self._rows.clear()
        self._rows.update(self._staged)
        self._staged.clear()

    def reset(self) -> None:
        self._rows.clear()
        self._staged.clear()


class _SQLiteWriter:
    """One thread, one connection, group commit. Results go back to the event loop in one hop per group.
    Under concurrent load a group waits for the writers under way (`GroupSizer`)."""

    _STOP = object()

    def __init__(
        self, engine: Engine, loop: asyncio.AbstractEventLoop, max_batch: int, sizer: GroupSizer
    ) -> None:
        self._engine = engine
        self._loop = loop
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sizer = sizer
        self._more = threading.Event()
        # Operations submitted and not yet taken into a group (the group's first, which the writer holds
        # while it waits, included): what `GroupSizer` counts. A queue item may hold several (`_Each`).
        self._queued = 0
        self._counting = threading.Lock()
        # Connected here, so that a database the writer cannot open fails `Database.open` at once; a thread
        # that failed to connect would have died with every later write left waiting on it.
        self._conn = engine.connect()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()

    @property
    def thread_id(self) -> int | None:
        return self._thread.native_id

    def submit(self, op: Op[T]) -> asyncio.Future[T]:
        return self._put(op)

    def submit_each(self, ops: Sequence[Op[Any]]) -> asyncio.Future[list[Outcome]]:
        """`ops` as that many writes (`Database.write_each`), in the same group commit if they fit."""
        return self._put(_Each(ops))

    def _put(self, op: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        with self._counting:  # counted before it is queued: the writer takes it off the count once taken
            self._queued += len(op.ops) if isinstance(op, _Each) else 1
            queued = self._queued
        self._queue.put((op, future))
        if self._sizer.filled(queued):
            self._more.set()
        return future

    def close(self) -> None:
        self._queue.put(self._STOP)
        self._more.set()
        self._thread.join()
        self._engine.dispose()

    def _gather(self) -> None:
        """Before a group, whose first operation the writer holds: waits as `GroupSizer` says."""
        sizer = self._sizer
        want = sizer.target(self._queued)
        if not want:
            return
        self._more.clear()
        sizer.wanted = want
        try:
            if not sizer.filled(self._queued):  # one queued before `wanted` was set is seen
                self._more.wait(sizer.linger)
        finally:
            sizer.wanted = 0

    def _run(self) -> None:
        with self._conn as conn:
            cache = WriteCache()
            conn.info[WriteCache.KEY] = cache
            data_version = None
            while True:
                first = self._queue.get()
                if first is self._STOP:
                    return
                self._gather()
                batch = [first]
                ops = _flat(first[0])
                # A batch's writes are never split, so a group may pass `max_batch` by one batch's size.
                while len(ops) < self._max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is self._STOP:
                        self._queue.put(item)
                        break
                    batch.append(item)
                    ops.extend(_flat(item[0]))
                with self._counting:
                    self._queued -= len(ops)
                self._sizer.ran(len(ops))
                outcomes, data_version = self._run_batch(conn, ops, cache, data_version)
                self._loop.call_soon_threadsafe(_settle_all, batch, outcomes)

    @staticmethod
    def _run_batch(
        conn: Connection, ops: list[Op[Any]], cache: WriteCache, data_version: Any
    ) -> tuple[list[Outcome], Any]:
        try:
            transaction = conn.begin()
        except Exception as exc:
            # The write lock not had (another process held it past the lock timeout) or the database
            # gone: the same for every operation, which would only wait that long again one by one.
            cache.reset()
            return [(None, exc)] * len(ops), None
        try:
            with transaction:
                seen = _driver_sql(conn, "PRAGMA data_version")
                if seen != data_version or not all(hasattr(op, "run_many") for op in ops):
                    cache.reset()
                outcomes = _run_grouped(conn, ops)
            cache.commit()
            return outcomes, seen
        except Exception as exc:
            cache.reset()
            if len(ops) == 1:
                return [(None, exc)], None
        # Something failed beyond one caller's own error: run each on its own so the others still land.
        cache.enabled = False
        try:
            return _run_each(conn, ops), None
        finally:
            cache.reset()
            cache.enabled = True


def _run_each(conn: Connection, ops: list[Op[Any]]) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for op in ops:
        try:
            with conn.begin():
                outcomes.append((op(conn), None))
        except Exception as exc:
            outcomes.append((None, exc))
    return outcomes


def _run_grouped(conn: Connection, ops: list[Op[Any]]) -> list[Outcome]:
    """Runs a group in one transaction. Operations that offer `run_many` (appends) run together, in one
    set of statements; a caller's own failure among them fails that caller only. Any other exception
    fails the whole group (and the caller runs the operations one by one)."""
    outcomes: list[Outcome | None] = [None] * len(ops)
    together: dict[Any, list[int]] = {}
    for i, op in enumerate(ops):
        run_many = getattr(op, "run_many", None)
        if run_many is not None:
            together.setdefault(run_many, []).append(i)
        else:
            outcomes[i] = (op(conn), None)
    for run_many, indexes in together.items():
        for i, outcome in zip(indexes, run_many(conn, [ops[i] for i in indexes]), strict=True):
            outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


def _closed_error() -> ConnectionError:
    """What a grouped write gets when the database closes before it could run or finish: a write may have
    committed or not, as when a connection is lost."""
    return ConnectionError("the database was closed before this write finished")


def _after_commit(op: Op[Any]) -> None:
    hook = getattr(op, "after_commit", None)
    if hook is not None:
        try:
            hook()
        except Exception:
            log.exception("after a committed write")


def _committed(op: Op[Any], task: asyncio.Future[Any]) -> None:
    """A write run on its own finished: its after-commit step, and its outcome marked as seen (nobody may
    wait for it any more: its failure was its caller's)."""
    if not task.cancelled() and task.exception() is None:
        _after_commit(op)


class _Each:
    """Writes submitted together (`Database.write_each`): each runs as if submitted on its own, and the
    one future they share gets the list of their outcomes."""

    __slots__ = ("ops",)

    def __init__(self, ops: Sequence[Op[Any]]) -> None:
        self.ops = list(ops)


def _flat(op: Op[Any] | _Each) -> list[Op[Any]]:
    return list(op.ops) if isinstance(op, _Each) else [op]


def _settle_all(
    batch: Sequence[tuple[Op[Any] | _Each, asyncio.Future[Any]]], outcomes: Sequence[Outcome]
) -> None:
    """The outcomes of a group's operations, in the order of `batch` with every `_Each` spread out."""
    i = 0
    for op, fut in batch:
        if isinstance(op, _Each):
            mine = outcomes[i : i + len(op.ops)]
            i += len(op.ops)
            for each, (_, exc) in zip(op.ops, mine, strict=True):
                if exc is None:
                    _after_commit(each)
            if not fut.done():
                fut.set_result(mine)
            continue
        result, exc = outcomes[i]
        i += 1
        if exc is None:
            _after_commit(op)
        if fut.done():  # the caller went away; the write happened all the same
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    assert i == len(outcomes), "a group's outcomes do not match its operations"
