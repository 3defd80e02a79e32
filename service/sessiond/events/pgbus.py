"""Live events between replicas: the in-process bus, plus PostgreSQL LISTEN/NOTIFY.

Every replica on one PostgreSQL database listens on one channel (named after the schema, so that schemas
sharing a database stay apart). Publishing delivers to this replica's subscribers at once, as the
in-process bus does, and queues a notice for the others; a sender task sends what queued meanwhile in one
statement, in publish order. A notice names its origin (a replica ignores its own), the session and the
event id, and carries the serialized event when it is small enough for NOTIFY's 8,000-byte payload.
Signals travel the same way: a stop asked for a turn that another replica runs reaches that replica at
once, instead of with its next lease renewal.

A replica that receives a notice does nothing unless it has subscribers for that session. A notice with
the event in it is delivered as is. One without (a large `messages_appended`) makes the replica read the
event from storage (the same replay a resuming watcher does), one reader per session at a time. Turn
events (event id 0) are not stored, so a large one that does not fit is not relayed; watchers lose only
that delta. Deltas, most of a turn's events, are relayed only for sessions that another replica has
watchers of that asked for them (a soft interest each replica repeats every 10 s and the others forget
after 30 s), so a busy turn costs nothing on the bus while nobody elsewhere wants its deltas.

Notices are not durable. If the listening connection drops, the replica reconnects and then, for every
session it has subscribers for, reads the latest event and delivers it: a watcher that missed events in
between sees the gap and replays it from storage, as it does for any gap. A notice the sender could not
send is lost the same way, and recovered by the session's next event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Mapping
from typing import Any

import asyncpg

from agentsessions.v1 import events_pb2

from .bus import DEFAULT_BUFFER, InProcessEventBus, Latest, Loader, Subscription, is_delta

log = logging.getLogger(__name__)

DELTAS_SIGNAL = "deltas_wanted"
INTEREST_REFRESH = 10.0
INTEREST_TTL = 30.0

# Notices kept while they cannot be sent; older ones are dropped past it (lost notices are recovered by
# the session's next event, as any lost notice is).
MAX_OUTBOX = 10_000

# Raw bytes of an event sent inside a notice; base64 makes them 4/3 larger, under the 8,000-byte payload
# limit with room for the rest of the notice.
MAX_INLINE_EVENT = 5_500
# NOTIFY refuses a payload of 8,000 bytes or more, and with it the whole statement: every notice of the
# batch. A notice is kept under this, in bytes (a signal listing sessions is cut into several).
MAX_NOTICE = 7_900


def channel_name(schema: str | None) -> str:
    """The channel of one schema: an identifier PostgreSQL accepts (at most 63 bytes, no quoting)."""
    suffix = re.sub(r"[^a-z0-9_]", "_", (schema or "public").lower())
    return f"sessiond_events_{suffix}"[:63]


class PostgresEventBus(InProcessEventBus):
    """`InProcessEventBus` for this replica's subscribers; LISTEN/NOTIFY to and from the others."""

    def __init__(self, dsn: str, *, schema: str | None, reconnect_delay: float = 0.5) -> None:
        super().__init__()
        self.channel = channel_name(schema)
        self.origin = uuid.uuid4().hex[:16]
        self._dsn = dsn
        self._load: Loader | None = None
        self._latest: Latest | None = None
        self._reconnect_delay = reconnect_delay
        self._outbox: list[str] = []
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._sender: asyncpg.Connection | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._catching_up: dict[str, list[int]] = {}  # session -> [delivered up to, known up to]
        # Highest stored event delivered per watched session: what arrives twice (a notice and a read
        # from storage) or late (replicas notify independently) is not delivered again; watchers
        # replay any gap from storage.
        self._delivered: dict[str, int] = {}
        self._closed = False
        self.reconnects = 0
        # Turn deltas are most of a turn's events and few watchers want them, so they are relayed only
        # for sessions some other replica said it has such watchers of; replicas repeat that every
        # INTEREST_REFRESH seconds while it holds and the others forget it after INTEREST_TTL.
        self._wanting: Counter[str] = Counter()  # here: delta subscriptions per session
        self._wanted: dict[str, float] = {}  # elsewhere: session -> until (monotonic time)
        self._handlers.setdefault(DELTAS_SIGNAL, []).append(self._on_deltas_wanted)

    async def start(self, load: Loader, latest: Latest) -> None:
        self._load, self._latest = load, latest
        await self._listen()
        self._spawn(self._send_loop())
        self._spawn(self._refresh_interest())

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for conn in (self._listener, self._sender):
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)

    # --- out ----------------------------------------------------------------------------------------

    def publish(self, event: events_pb2.SessionEvent) -> None:
        self._deliver(event)
        if self._closed:
            return
        if is_delta(event) and not self.relays_deltas_of(event.session_id):
            return  # no other replica has a watcher that wants it
        notice: dict[str, Any] = {"o": self.origin, "s": event.session_id, "e": event.event_id}
        data = event.SerializeToString()
        if len(data) <= MAX_INLINE_EVENT:
            notice["p"] = base64.b64encode(data).decode()
        elif event.event_id == 0:
            log.debug("a turn event of %d bytes is too large to relay to other replicas", len(data))
            return
        self._queue(json.dumps(notice, separators=(",", ":")))

    def signal(self, name: str, data: Mapping[str, Any]) -> None:
        if not self._closed:
            self._queue(json.dumps({"o": self.origin, "k": name, "d": dict(data)}, separators=(",", ":")))

    def _queue(self, notice: str) -> None:
        if len(notice.encode()) > MAX_NOTICE:  # would fail the whole batch it is sent in
            log.warning("dropped a notice of %d bytes, too large for NOTIFY", len(notice.encode()))
            return
        if len(self._outbox) >= MAX_OUTBOX:  # the database is unreachable: keep the newest only
            del self._outbox[: len(self._outbox) // 2]
        self._outbox.append(notice)
        self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._outbox = self._outbox, []
            if not batch:
                continue
            try:
                if self._sender is None or self._sender.is_closed():
                    self._sender = await asyncpg.connect(self._dsn)
                await self._sender.execute(
                    "SELECT pg_notify($1, n) FROM unnest($2::text[]) WITH ORDINALITY AS t(n, i) ORDER BY i",
                    self.channel,
                    batch,
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("could not notify other replicas of %d events", len(batch), exc_info=True)
                self._sender = None
                await asyncio.sleep(self._reconnect_delay)

    # --- in -----------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(self.channel, self._on_notice)
        conn.add_termination_listener(self._on_lost)
        self._listener = conn

    def _on_lost(self, _conn: Any) -> None:
        if not self._closed:
            log.warning("lost the connection listening for other replicas' events; reconnecting")
            self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        while not self._closed:
            try:
                await self._listen()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.sleep(self._reconnect_delay)
                continue
            self.reconnects += 1
            break
        # Events may have been missed meanwhile: the latest of each watched session exposes any gap.
        assert self._latest is not None
        for session_id in list(self._subscribers):
            with contextlib.suppress(Exception):
                self._remote(session_id, await self._latest(session_id))

    def _on_notice(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            notice = json.loads(payload)
            if notice["o"] == self.origin:
                return
            if "k" in notice:
                for handler in self._handlers.get(notice["k"], ()):
                    handler(notice["d"])
                return
            session_id, event_id = notice["s"], int(notice["e"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed notice on %s", self.channel, exc_info=True)
            return
        if session_id not in self._subscribers:
            return
        if "p" in notice and not (event_id > 0 and session_id in self._catching_up):
            self._deliver(events_pb2.SessionEvent.FromString(base64.b64decode(notice["p"])))
        elif event_id > 0:
            # Too large to come inline, or an earlier one is being read from storage: this one is read
            # after it, in order (delivered ahead, it would make the earlier one look like a duplicate).
            self._remote(session_id, event_id)

    def _remote(self, session_id: str, event_id: int) -> None:
        """Delivers stored events of the session up to `event_id`, read by one task per session."""
        if event_id <= 0:
            return
        progress = self._catching_up.get(session_id)
        if progress is None:
            self._catching_up[session_id] = [event_id - 1, event_id]
            self._spawn(self._catch_up(session_id))
        else:
            progress[1] = max(progress[1], event_id)

    async def _catch_up(self, session_id: str) -> None:
        progress = self._catching_up[session_id]
        assert self._load is not None
        try:
            while progress[0] < progress[1] and session_id in self._subscribers:
                events = await self._load(session_id, progress[0], progress[1])
                if not events:
                    break
                for event in events:
                    self._deliver(event)
                progress[0] = events[-1].event_id
        except Exception:
            log.warning("could not read events of session %r for its watchers", session_id, exc_info=True)
        finally:
            del self._catching_up[session_id]

    def _deliver(self, event: events_pb2.SessionEvent) -> None:
        """To this replica's subscribers, each stored event once and in order."""
        session_id, event_id = event.session_id, event.event_id
        if event_id > 0 and session_id in self._subscribers:
            if event_id <= self._delivered.get(session_id, 0):
                return
            self._delivered[session_id] = event_id
        super().publish(event)
        if event.HasField("deleted"):  # a session created again under its id numbers its events from 1
            self._delivered.pop(session_id, None)

    def _remove(self, subscription: Subscription) -> None:
        super()._remove(subscription)
        session_id = subscription.session_id
        if session_id not in self._subscribers:
            self._delivered.pop(session_id, None)
        if subscription.deltas:
            self._wanting[session_id] -= 1
            if self._wanting[session_id] <= 0:
                del self._wanting[session_id]

    def subscribe(
        self, session_id: str, *, max_buffer: int = DEFAULT_BUFFER, deltas: bool = False
    ) -> Subscription:
        subscription = super().subscribe(session_id, max_buffer=max_buffer, deltas=deltas)
        if deltas:
            self._wanting[session_id] += 1
            if self._wanting[session_id] == 1:
                self.signal(DELTAS_SIGNAL, {"sessions": [session_id]})
        return subscription

    def relays_deltas_of(self, session_id: str) -> bool:
        """Whether another replica said it has watchers of the session that want its turn deltas."""
        return self._wanted.get(session_id, 0.0) >= time.monotonic()

    def _on_deltas_wanted(self, data: Mapping[str, Any]) -> None:
        until = time.monotonic() + INTEREST_TTL
        for session_id in data.get("sessions", ()):
            self._wanted[str(session_id)] = until

    async def _refresh_interest(self) -> None:
        while True:
            await asyncio.sleep(INTEREST_REFRESH)
            for chunk in _chunks(list(self._wanting), MAX_NOTICE - 200):  # 200: the rest of the notice
                self.signal(DELTAS_SIGNAL, {"sessions": chunk})
            now = time.monotonic()
            for session_id in [s for s, until in self._wanted.items() if until < now]:
                del self._wanted[session_id]

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _chunks(session_ids: list[str], max_bytes: int) -> list[list[str]]:
    """`session_ids` in runs whose JSON stays under `max_bytes` (ids are up to 256 characters)."""
    chunks: list[list[str]] = []
    size = max_bytes
    for session_id in session_ids:
        cost = len(json.dumps(session_id).encode()) + 1
        if size + cost > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(session_id)
        size += cost
    return chunks
