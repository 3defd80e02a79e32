"""Two replicas on one PostgreSQL database: a watcher on one sees, live, what the other changes (the
LISTEN/NOTIFY event bus), including events too large for a notice, deletes, purges and turn deltas, and
again after its listening connection is cut."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest
from conftest import POSTGRES_URL, DatabaseTarget, make_settings, replica_clients, two_servers
from turn_support import CANCELLED, STOP, Reader, reason

from agentsessions import AsyncSessionsClient, SessionEvent, errors
from sessiond.domain.clock import ManualClock
from sessiond.events import pgbus
from sessiond.events.pgbus import PostgresEventBus
from sessiond.server import RunningServer

WAIT = 20.0  # seconds before a missing event fails the test (events arrive in milliseconds)


def kind(event: SessionEvent) -> str:
    return event.WhichOneof("kind") or ""


@pytest.fixture
async def replicas(
    database: DatabaseTarget, clock: ManualClock
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    if database.backend != "postgresql":
        pytest.skip("replicas share a PostgreSQL database; SQLite serves from one process")
    async with two_servers(make_settings(database), clock) as pair:
        yield pair


@pytest.fixture
async def clients(
    replicas: tuple[RunningServer, RunningServer],
) -> AsyncIterator[tuple[AsyncSessionsClient, AsyncSessionsClient]]:
    a, b = replicas
    async with (
        AsyncSessionsClient(f"127.0.0.1:{a.port}") as on_a,
        AsyncSessionsClient(f"127.0.0.1:{b.port}") as on_b,
    ):
        yield on_a, on_b


async def next_events(stream: AsyncIterator[SessionEvent], n: int) -> list[SessionEvent]:
    async def take() -> list[SessionEvent]:
        out: list[SessionEvent] = []
        async for event in stream:
            out.append(event)
            if len(out) == n:
                break
        return out

    return await asyncio.wait_for(take(), WAIT)


async def watching(
    on_a: AsyncSessionsClient, on_b: AsyncSessionsClient, session_id: str, **kwargs: object
) -> AsyncIterator[SessionEvent]:
    """A watch on replica B that has certainly reached its live phase: it saw, live or replayed, a change
    made on A after it started. What follows can only reach it through the bus."""
    start = (await on_a.create_session(agent_id="echo", session_id=session_id)).last_event_id
    stream = on_b.watch_session(session_id=session_id, after_event_id=start, resume=False, **kwargs)
    await on_a.update_session(session_id=session_id, metadata={"watched": "yes"})
    (first,) = await next_events(stream, 1)
    assert kind(first) == "updated"
    return stream


async def test_a_watcher_on_one_replica_sees_changes_made_on_another(
    clients: tuple[AsyncSessionsClient, AsyncSessionsClient], unique: str
) -> None:
    on_a, on_b = clients
    sid = f"{unique}/r"
    stream = await watching(on_a, on_b, sid)
    await on_a.append_text(session_id=sid, role="user", text="made on A")
    await on_a.clear_session(session_id=sid)
    appended, cleared = await next_events(stream, 2)
    assert (kind(appended), kind(cleared)) == ("messages_appended", "cleared")
    assert appended.messages_appended.messages[0].parts[0].text.text == "made on A"
    assert cleared.event_id == appended.event_id + 1


async def test_an_event_too_large_for_a_notice_is_read_from_storage(
    clients: tuple[AsyncSessionsClient, AsyncSessionsClient], unique: str
) -> None:
    on_a, on_b = clients
    sid = f"{unique}/big"
    stream = await watching(on_a, on_b, sid)
    text = "x" * 20_000
    await on_a.append_text(session_id=sid, role="user", text=text)
    await on_a.append_text(session_id=sid, role="user", text="small")
    big, small = await next_events(stream, 2)
    assert big.messages_appended.messages[0].parts[0].text.text == text
    assert small.messages_appended.messages[0].parts[0].text.text == "small"
    assert small.event_id == big.event_id + 1


async def test_a_delete_on_one_replica_ends_watches_on_another(
    clients: tuple[AsyncSessionsClient, AsyncSessionsClient], unique: str
) -> None:
    on_a, on_b = clients
    sid = f"{unique}/del"
    stream = await watching(on_a, on_b, sid)
    await on_a.delete_session(session_id=sid, force=True)
    (deleted,) = await next_events(stream, 1)
    assert kind(deleted) == "deleted"


async def test_a_session_created_again_under_its_id_is_watched_live_on_another_replica(
    clients: tuple[AsyncSessionsClient, AsyncSessionsClient], unique: str
) -> None:
    """A session deleted and created again under its id numbers its events from 1 again. Replica B, whose
    Connect stream follows that id all along, delivers the new session's events live. Before, B kept
    the old session's last event id and dropped the new one's events up to it as duplicates."""
    on_a, on_b = clients
    sid = f"{unique}/again"
    await on_a.create_session(agent_id="echo", session_id=sid)
    for i in range(5):
        await on_a.append_text(session_id=sid, role="user", text=f"old {i}")
    conn = on_b.connect(session_id=sid)  # a gateway's stream on B: it follows the id from its first frame
    frames = conn.__aiter__()
    await conn.send_heartbeat()
    assert (await asyncio.wait_for(frames.__anext__(), WAIT)).HasField("session")
    await on_a.delete_session(session_id=sid, force=True)
    while not (await asyncio.wait_for(frames.__anext__(), WAIT)).session_event.HasField("deleted"):
        pass
    created = await on_a.create_session(agent_id="echo", session_id=sid)
    await on_a.append_text(session_id=sid, role="user", text="new")
    while not (frame := await asyncio.wait_for(frames.__anext__(), WAIT)).session_event.HasField(
        "messages_appended"
    ):
        pass
    assert frame.session_event.event_id == created.last_event_id + 1
    assert frame.session_event.messages_appended.messages[0].parts[0].text.text == "new"
    conn.cancel()


def test_notices_stay_under_notifys_payload_limit() -> None:
    """NOTIFY refuses a payload of 8,000 bytes or more, and with it every notice sent in the same
    statement: the list of sessions a replica wants deltas of is cut by size (it was cut every 40 ids,
    10 KB with ids of 256 characters), and a notice too large is dropped alone."""
    ids = [f"{i:03d}" + "x" * 253 for i in range(100)]
    chunks = pgbus._chunks(ids, pgbus.MAX_NOTICE - 200)
    assert [i for chunk in chunks for i in chunk] == ids
    for chunk in chunks:
        notice = json.dumps({"o": "0" * 16, "k": pgbus.DELTAS_SIGNAL, "d": {"sessions": chunk}})
        assert len(notice.encode()) < 8000
    bus = PostgresEventBus("postgresql://unused", schema=None)
    bus._queue("x" * 8000)
    bus._queue("small")
    assert bus._outbox == ["small"]


async def test_a_purge_on_one_replica_ends_watches_on_another(
    replicas: tuple[RunningServer, RunningServer],
    clients: tuple[AsyncSessionsClient, AsyncSessionsClient],
    clock: ManualClock,
    unique: str,
) -> None:
    a, _ = replicas
    on_a, on_b = clients
    sid = f"{unique}/purged"
    stream = await watching(on_a, on_b, sid)
    await on_a.end_session(session_id=sid)
    (ended,) = await next_events(stream, 1)
    clock.advance(days=8)  # past the default retention of 7 days
    await a.sweeper.purge()
    (gone,) = await next_events(stream, 1)
    assert (kind(ended), kind(gone)) == ("ended", "deleted")
    assert gone.event_id == ended.event_id + 1


async def test_turn_deltas_reach_watchers_on_another_replica(
    replicas: tuple[RunningServer, RunningServer],
    clients: tuple[AsyncSessionsClient, AsyncSessionsClient],
    unique: str,
) -> None:
    """Deltas cross only for sessions another replica has delta watchers of: replica A relays them once
    B's watch said so, and not before."""
    on_a, on_b = clients
    bus = replicas[0].bus
    assert isinstance(bus, PostgresEventBus)
    sid = f"{unique}/turn"
    assert not bus.relays_deltas_of(sid)
    stream = await watching(on_a, on_b, sid, include_deltas=True)
    deadline = asyncio.get_running_loop().time() + WAIT
    while not bus.relays_deltas_of(sid):
        assert asyncio.get_running_loop().time() < deadline, "replica A never learned of B's delta watcher"
        await asyncio.sleep(0.01)
    answer = [e async for e in on_a.execute(session_id=sid, text="hello there from replica A")]
    relayed_deltas = [e.text_delta.text for e in answer if e.WhichOneof("kind") == "text_delta"]
    assert relayed_deltas
    seen: list[str] = []
    while "".join(seen) != "".join(relayed_deltas):
        (event,) = await next_events(stream, 1)
        if kind(event) == "turn" and event.turn.WhichOneof("kind") == "text_delta":
            seen.append(event.turn.text_delta.text)
    assert seen == relayed_deltas


async def test_watchers_recover_after_the_listening_connection_is_cut(
    replicas: tuple[RunningServer, RunningServer],
    clients: tuple[AsyncSessionsClient, AsyncSessionsClient],
    unique: str,
) -> None:
    on_a, on_b = clients
    bus = replicas[1].bus
    assert isinstance(bus, PostgresEventBus)
    sid = f"{unique}/cut"
    stream = await watching(on_a, on_b, sid)
    listener = bus._listener
    assert listener is not None
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
    finally:
        await admin.close()
    # Written while B may still be reconnecting: the resync after the reconnect delivers it.
    await on_a.append_text(session_id=sid, role="user", text="during")
    (during,) = await next_events(stream, 1)
    assert during.messages_appended.messages[0].parts[0].text.text == "during"
    deadline = asyncio.get_running_loop().time() + WAIT
    while bus.reconnects == 0:
        assert asyncio.get_running_loop().time() < deadline, "the bus never reconnected"
        await asyncio.sleep(0.01)
    await on_a.append_text(session_id=sid, role="user", text="after")
    (after,) = await next_events(stream, 1)
    assert after.messages_appended.messages[0].parts[0].text.text == "after"
    assert after.event_id == during.event_id + 1


async def test_stops_and_interrupts_reach_another_replica_at_once(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """With a lease renewed only every two minutes, a StopTurn or an interrupt from replica B still ends
    the turn replica A runs at once: the stop is signalled over the bus, and B learns the turn ended from
    its TurnFinished event instead of polling the lease row."""
    if database.backend != "postgresql":
        pytest.skip("replicas share a PostgreSQL database; SQLite serves from one process")
    settings = make_settings(database, turn_lease_seconds=600.0)
    async with replica_clients(settings, clock) as (on_a, on_b):
        sid = (await on_a.create_session(agent_id="echo", session_id=f"{unique}/stop")).session_id
        running = Reader(on_a.execute(session_id=sid, text="/hang on replica A"))
        head = await asyncio.wait_for(running.until_kind("text_delta"), WAIT)
        stopped = await on_b.stop_turn(session_id=sid)
        assert (stopped.stopped, stopped.turn_id) == (True, head[0].turn_id)
        tail = await asyncio.wait_for(running.rest(), WAIT)
        assert reason(tail) == CANCELLED

        running = Reader(on_a.execute(session_id=sid, text="/hang again"))
        await asyncio.wait_for(running.until_kind("text_delta"), WAIT)
        took_over = [
            e async for e in on_b.execute(session_id=sid, text="took over", multitask_strategy="interrupt")
        ]
        tail = await asyncio.wait_for(running.rest(), WAIT)
        assert reason(tail) == CANCELLED
        assert reason(took_over) == STOP


async def test_a_draining_replica_lets_go_of_a_caller_waiting_for_another_replicas_turn(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """An Execute on replica B waiting (enqueue) for the turn replica A runs ends SERVER_SHUTTING_DOWN as
    soon as B begins to drain, so the caller can go to another replica. Before, it held B's drain until A's
    turn ended or B's grace period ran out, and B then started the turn while stopping."""
    if database.backend != "postgresql":
        pytest.skip("replicas share a PostgreSQL database; SQLite serves from one process")
    settings = make_settings(database, turn_lease_seconds=600.0)
    async with two_servers(settings, clock) as (a, b), AsyncSessionsClient(f"127.0.0.1:{a.port}") as on_a:
        sid = (await on_a.create_session(agent_id="echo", session_id=f"{unique}/drain")).session_id
        running = Reader(on_a.execute(session_id=sid, text="/hang on replica A"))
        await asyncio.wait_for(running.until_kind("text_delta"), WAIT)
        async with AsyncSessionsClient(f"127.0.0.1:{b.port}") as on_b:
            queued = asyncio.ensure_future(
                Reader(on_b.execute(session_id=sid, text="queued", multitask_strategy="enqueue")).rest()
            )
            assert b.turns is not None
            await asyncio.wait_for(b.turns.wait_for_waiting(sid, 1), WAIT)
            await asyncio.wait_for(b.stop(3600), WAIT)  # a drain that waited for A's turn would hang here
            with pytest.raises(errors.Unavailable) as refused:
                await queued
            assert refused.value.reason == "SERVER_SHUTTING_DOWN"

        # A's turn ran on, untouched; B stored nothing of the queued turn.
        assert (await on_a.stop_turn(session_id=sid)).stopped
        assert reason(await asyncio.wait_for(running.rest(), WAIT)) == CANCELLED
        texts = [m.parts[0].text.text async for m in await on_a.list_messages(session_id=sid)]
        assert "queued" not in texts
