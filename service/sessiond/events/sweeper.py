"""The sweeper: pushes expiry warnings and expiries when they fall due, and purges old sessions.

Both jobs work in bounded batches on indexed queries (`next_notify_time`, `end_time`, `expire_time`), each
batch its own short transaction, so a sweep over a million sessions never holds the database for long.
Several processes may sweep one PostgreSQL database: each batch locks its rows with SKIP LOCKED and marks
them in the same transaction, so no event is pushed twice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from ..domain.clock import Clock
from ..store.repository import SWEEP_START, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    notified: int
    purged: int


class Sweeper:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        retention: timedelta | None,
        notify_interval: float,
        cleanup_interval: float,
        batch_size: int = 200,
        pause: float = 0.005,
    ) -> None:
        self.store = store
        self.clock = clock
        self.retention = retention  # None: keep expired and ended sessions forever
        self.notify_interval = notify_interval
        self.cleanup_interval = cleanup_interval
        self.batch_size = batch_size
        # Between two batches: a batch holds the SQLite writer (and the GIL) for tens of milliseconds,
        # and serving gets this long to catch up before the next one.
        self.pause = pause

    async def push_notices(self) -> int:
        """Pushes every warning and expiry due now; returns how many sessions it looked at."""
        now = self.clock.now()
        total, cursor = 0, SWEEP_START
        while True:
            seen, cursor = await self.store.push_due_notices(now, limit=self.batch_size, after=cursor)
            total += seen
            if seen < self.batch_size:
                return total
            await asyncio.sleep(self.pause)  # serving catches up between batches

    async def purge(self) -> int:
        """Deletes sessions that ended or expired more than the retention period ago; their watchers get
        a `deleted` event, as when DeleteSession removes one."""
        if self.retention is None:
            return 0
        now = self.clock.now()
        cutoff = now - self.retention
        total = 0
        for ended in (True, False):
            cursor = SWEEP_START
            while True:
                deleted, cursor = await self.store.purge(
                    cutoff, ended=ended, limit=self.batch_size, now=now, after=cursor
                )
                total += deleted
                if deleted < self.batch_size:
                    break
                await asyncio.sleep(self.pause)
        return total

    async def run_once(self) -> SweepResult:
        """One full pass: notices first (an expired session gets its expiry pushed before it can go)."""
        notified = await self.push_notices()
        return SweepResult(notified=notified, purged=await self.purge())

    async def run(self) -> None:
        """Runs until cancelled: notices every notify_interval, purges every cleanup_interval."""
        loop = asyncio.get_running_loop()
        next_cleanup = loop.time()
        while True:
            try:
                await self.push_notices()
                if loop.time() >= next_cleanup:
                    purged = await self.purge()
                    if purged:
                        log.info("sweeper purged %d sessions", purged)
                    next_cleanup = loop.time() + self.cleanup_interval
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed; trying again at the next interval")
            await asyncio.sleep(self.notify_interval)
