"""The database layer beneath the store: a failed read does not break the reads after it, and a write
whose caller goes away still completes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
from datetime import UTC, datetime

import pytest
from conftest import DatabaseTarget
from sqlalchemy import Connection, func, insert, select
from sqlalchemy.exc import DBAPIError

from sessiond.store import migrate
from sessiond.store.database import Database, GroupSizer
from sessiond.store.tables import scoped_variables


async def test_a_read_that_fails_in_the_driver_leaves_reads_working(fresh_database: DatabaseTarget) -> None:
    db = Database(fresh_database.url, schema=fresh_database.schema)
    await db.open()
    try:
        await migrate.upgrade(db)

        def broken(conn: Connection) -> object:
            return conn.exec_driver_sql("SELECT * FROM no_such_table").all()

        def count(conn: Connection) -> int:
            return int(conn.exec_driver_sql("SELECT count(*) FROM agents").scalar_one())

        for _ in range(2):
            with pytest.raises(DBAPIError):
                await db.read(broken)
            assert await db.read(count) == 0
            assert await db.read(count, scan=True) == 0

        if db.dialect == "sqlite":  # point reads on the loop's own connection: it cannot reconnect once
            inline = db._inline
            assert inline is not None
            connect = inline.connect
            attempts = []

            def refused() -> Connection:
                attempts.append(1)
                raise OSError("too many open files")

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(inline, "connect", refused)
                with pytest.raises(DBAPIError):  # its own error, not the reconnection's
                    await db.read(broken)
                with pytest.raises(OSError):
                    await db.read(count)
            # Before, the closed connection stayed in place and every later point read failed.
            assert await db.read(count) == 0 and attempts == [1]
            assert inline.connect == connect
    finally:
        await db.close()


async def test_a_write_whose_caller_goes_away_still_completes_cleanly(
    fresh_database: DatabaseTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """A cancelled RPC does not cut a write off mid-statement: it commits (as on SQLite's writer thread),
    nothing is logged as an unretrieved failure, and the connections stay usable. On PostgreSQL the
    cancellation used to reach asyncpg mid-query and break the connection."""
    db = Database(fresh_database.url, schema=fresh_database.schema)
    await db.open()
    try:
        await migrate.upgrade(db)
        slow = "SELECT pg_sleep(0.2)" if db.dialect == "postgresql" else "SELECT 1"

        def write(conn: Connection, n: int) -> None:
            conn.exec_driver_sql(slow)
            conn.execute(
                insert(scoped_variables).values(
                    scope=1, agent_id=f"a{n}", user_id="", variables={"n": n}, update_time=datetime.now(UTC)
                )
            )

        for n in range(3):
            caller = asyncio.ensure_future(db.write(functools.partial(write, n=n)))
            await asyncio.sleep(0.02)
            caller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await caller
        await asyncio.sleep(0.5)  # the writes run on
        gc.collect()

        def count(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(scoped_variables)).scalar_one())

        assert await db.read(count) == 3
        await db.write(functools.partial(write, n=3))
        assert await db.read(count) == 4
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    finally:
        await db.close()


class _Marked:
    """A write on its own (no `run_many`), slow on PostgreSQL, that records its after-commit step."""

    def __init__(self, slow: str) -> None:
        self.slow = slow
        self.committed = False

    def __call__(self, conn: Connection) -> None:
        conn.exec_driver_sql(self.slow)
        conn.execute(
            insert(scoped_variables).values(
                scope=1, agent_id="marked", user_id="", variables={}, update_time=datetime.now(UTC)
            )
        )

    def after_commit(self) -> None:
        self.committed = True


async def test_closing_waits_for_a_write_whose_caller_went_away(fresh_database: DatabaseTarget) -> None:
    """A write whose caller went away (a cancelled RPC during a shutdown) still commits, and its
    after-commit step (publishing its events) still runs, before `close` returns. On PostgreSQL `close`
    waited for the grouped writes only, so such a write was cut off with the engine."""
    db = Database(fresh_database.url, schema=fresh_database.schema)
    await db.open()
    closed = False
    try:
        await migrate.upgrade(db)
        op = _Marked("SELECT pg_sleep(0.3)" if db.dialect == "postgresql" else "SELECT 1")
        caller = asyncio.ensure_future(db.write(op))
        await asyncio.sleep(0.05)  # the write is under way
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        await db.close()
        closed = True
        assert op.committed
    finally:
        if not closed:
            await db.close()
    again = Database(fresh_database.url, schema=fresh_database.schema)
    await again.open()
    try:

        def count(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(scoped_variables)).scalar_one())

        assert await again.read(count) == 1
    finally:
        await again.close()


class _Stuck:
    """A grouped write (it has `run_many`, as appends and creates do) that the database keeps waiting."""

    def __call__(self, conn: Connection) -> None:
        self.run_many(conn, [self])

    @staticmethod
    def run_many(conn: Connection, ops: list[_Stuck]) -> list[tuple[None, None]]:
        conn.exec_driver_sql("SELECT pg_sleep(5)")
        return [(None, None) for _ in ops]


async def test_closing_does_not_wait_for_a_database_that_does_not_answer(
    fresh_database: DatabaseTarget,
) -> None:
    """PostgreSQL: a grouped write stuck in the database (no lock or statement timeout set) does not keep
    `close`, and so a SIGTERM, from finishing; its caller and the one queued behind it learn that the
    database went away instead of waiting for ever. Before, `close` waited on them with no bound."""
    if fresh_database.backend != "postgresql":
        pytest.skip("SQLite's writer thread answers for its own writes")
    db = Database(fresh_database.url, schema=fresh_database.schema)
    await db.open()
    closed = False
    try:
        first = asyncio.ensure_future(db.write(_Stuck()))
        await asyncio.sleep(0)  # the first group starts; the second write waits for the next
        second = asyncio.ensure_future(db.write(_Stuck()))
        await asyncio.wait_for(db.close(wait_seconds=0.2), 10)
        closed = True
        for caller in (first, second):
            with pytest.raises(ConnectionError):
                await caller
    finally:
        if not closed:
            await db.close()


class _Grouped:
    """A grouped operation (as appends and creates are) that records the size of each group it ran in."""

    def __init__(self, groups: list[int], value: int) -> None:
        self.groups = groups
        self.value = value

    def __call__(self, conn: Connection) -> int:
        ((result, _),) = self.run_many(conn, [self])
        return result  # type: ignore[no-any-return]

    @staticmethod
    def run_many(conn: Connection, ops: list[_Grouped]) -> list[tuple[int, None]]:
        ops[0].groups.append(len(ops))
        conn.exec_driver_sql("SELECT 1")
        return [(op.value, None) for op in ops]


async def _staggered_writers(db: Database, groups: list[int]) -> None:
    """Eight callers, thirty writes each, coming back at different times (as over a network)."""

    async def caller(k: int) -> list[int]:
        answers = []
        for r in range(30):
            for _ in range(3 * k):
                await asyncio.sleep(0)
            answers.append(await db.write(_Grouped(groups, 100 * k + r)))
        return answers

    results = await asyncio.gather(*(caller(k) for k in range(8)))
    assert results == [[100 * k + r for r in range(30)] for k in range(8)]  # each got its own answer
    assert sum(groups) == 8 * 30


def _judged(monkeypatch: pytest.MonkeyPatch, *, cpu_bound: bool) -> None:
    """Makes `GroupSizer` judge the process CPU-bound (`BUSY` 0) or never (`BUSY` above any process), on
    every group rather than after the first 50 ms."""
    monkeypatch.setattr(GroupSizer, "BUSY", 0.0 if cpu_bound else 1000.0)
    monkeypatch.setattr(GroupSizer, "WINDOW", 0.0)


async def test_a_group_commit_waits_for_concurrent_writers_only(
    fresh_database: DatabaseTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU-bound process (forced here: `BUSY` 0, judged on every group), a lone writer's groups
    start at once however long the writer may linger; writers under way together are gathered into one
    group each round; once they stop coming together the writer goes back to starting each group at
    once. Group sizes are asserted, never times."""
    _judged(monkeypatch, cpu_bound=True)
    groups: list[int] = []
    # A linger of ten minutes: a lone write that waited would be seen as a hung test.
    db = Database(fresh_database.url, schema=fresh_database.schema, write_linger=600)
    await db.open()
    try:
        for n in range(20):
            assert await asyncio.wait_for(db.write(_Grouped(groups, n)), 30) == n
        assert groups == [1] * 20
    finally:
        await db.close()

    groups.clear()
    db = Database(fresh_database.url, schema=fresh_database.schema, write_linger=0.5)
    await db.open()
    try:
        await _staggered_writers(db, groups)
        # Once the eight came together they stay together: every caller in each group of a round.
        assert groups.count(8) >= 20, groups

        groups.clear()
        for n in range(20):  # alone again: after a few groups the estimate has decayed and none waits
            assert await db.write(_Grouped(groups, n)) == n
        assert groups == [1] * 20
    finally:
        await db.close()


async def test_a_group_commit_waits_only_on_a_cpu_bound_process(
    fresh_database: DatabaseTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same writers on a process that is never CPU-bound (`BUSY` above any process): no group waits
    for them, so they do not come together (a wait would have made nearly every group hold all eight)."""
    _judged(monkeypatch, cpu_bound=False)
    groups: list[int] = []
    db = Database(fresh_database.url, schema=fresh_database.schema, write_linger=600)
    await db.open()
    try:
        await asyncio.wait_for(_staggered_writers(db, groups), 60)
        assert groups.count(8) < 20, groups
    finally:
        await db.close()


class _Row:
    """A write on its own (no `run_many`) that adds one row, or fails as a caller's bad request would."""

    def __init__(self, agent_id: str, *, fails: bool = False) -> None:
        self.agent_id = agent_id
        self.fails = fails
        self.committed = False

    def __call__(self, conn: Connection) -> str:
        conn.execute(
            insert(scoped_variables).values(
                scope=1, agent_id=self.agent_id, user_id="", variables={}, update_time=datetime.now(UTC)
            )
        )
        if self.fails:
            raise ValueError(f"{self.agent_id} refused")
        return self.agent_id

    def after_commit(self) -> None:
        self.committed = True


async def test_writes_made_together_keep_their_own_outcomes(fresh_database: DatabaseTarget) -> None:
    """`write_each` (a BatchAppendMessages call's entries): each write's result or exception in order;
    one that fails fails alone (the others land, and only theirs run their after-commit step); and
    grouped writes submitted together share one group commit on SQLite."""
    db = Database(fresh_database.url, schema=fresh_database.schema)
    await db.open()
    try:
        await migrate.upgrade(db)
        ops = [_Row("a"), _Row("b", fails=True), _Row("c")]
        outcomes = await db.write_each(ops)
        assert [result for result, _ in outcomes] == ["a", None, "c"]
        assert outcomes[0][1] is None and outcomes[2][1] is None
        assert isinstance(outcomes[1][1], ValueError) and str(outcomes[1][1]) == "b refused"
        assert [op.committed for op in ops] == [True, False, True]

        def stored(conn: Connection) -> list[str]:
            return list(conn.execute(select(scoped_variables.c.agent_id).order_by("agent_id")).scalars())

        assert await db.read(stored) == ["a", "c"]

        groups: list[int] = []
        grouped = await db.write_each([_Grouped(groups, n) for n in range(12)])
        assert grouped == [(n, None) for n in range(12)]
        assert sum(groups) == 12
        if db.dialect == "sqlite":
            assert groups == [12]
        assert await db.write_each([]) == []
    finally:
        await db.close()


async def test_writes_made_together_complete_when_their_caller_goes_away(
    fresh_database: DatabaseTarget,
) -> None:
    """A cancelled BatchAppendMessages call: its entries' writes still commit, with their after-commit
    steps, as a lone write's do."""
    db = Database(fresh_database.url, schema=fresh_database.schema)
    await db.open()
    closed = False
    try:
        await migrate.upgrade(db)
        ops = [_Row(f"gone-{n}") for n in range(4)]
        caller = asyncio.ensure_future(db.write_each(ops))
        await asyncio.sleep(0)  # submitted
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        await db.close()
        closed = True
        assert all(op.committed for op in ops)
    finally:
        if not closed:
            await db.close()


async def test_writes_made_together_count_as_that_many_writers(
    fresh_database: DatabaseTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group that waits for as many writes as were lately under way (a CPU-bound process, forced here)
    counts the writes of a `write_each` one by one: after rounds of eight writers, eight submitted
    together end its wait at once. On SQLite they reach the writer as one queue item, which would have
    counted as one and left the group waiting out the linger for seven more."""
    _judged(monkeypatch, cpu_bound=True)
    groups: list[int] = []
    db = Database(fresh_database.url, schema=fresh_database.schema, write_linger=0.5)
    await db.open()
    try:
        await _staggered_writers(db, groups)  # the writer now expects eight at a time
        assert groups.count(8) >= 20, groups
        db._sizer.linger = 600  # from here a group that waited would be seen as a hung test
        for r in range(3):
            together = [_Grouped(groups, 10 * r + k) for k in range(8)]
            outcomes = await asyncio.wait_for(db.write_each(together), 30)
            assert outcomes == [(10 * r + k, None) for k in range(8)]
    finally:
        await db.close()
