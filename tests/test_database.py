"""The database layer beneath the store: a failed read does not break the reads after it."""

from __future__ import annotations

import pytest
from conftest import DatabaseTarget
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from sessiond.store import migrate
from sessiond.store.database import Database


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
    finally:
        await db.close()
