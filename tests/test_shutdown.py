"""A graceful stop (SIGTERM), as the callers of each kind of stream see it: nothing waits out the grace
period, every stream ends with a status its client acts on, and what a running turn produced is stored."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from conftest import DatabaseTarget, make_settings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from turn_support import ERROR, Reader, message_text, only, reason, text_of

from agentsessions import AsyncSessionsClient, Connection, MessageStatus, Role, SessionsClient, errors
from sessiond.domain.clock import ManualClock
from sessiond.server import start_server

# A grace period no test waits out, and a guard against a hang: a drain that waited for its streams
# would wait for all of it.
GRACE_SECONDS = 3600
HANG_GUARD_SECONDS = 60


async def test_a_graceful_stop_ends_every_stream_at_once_and_keeps_partial_answers(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    settings = make_settings(database)
    running = await start_server(settings, clock=clock)
    stopped = False
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            executed, connected, watched = (f"{unique}/{name}" for name in ("exec", "connect", "watch"))
            for sid in (executed, connected, watched):
                await client.create_session(agent_id="echo", session_id=sid)

            watch = Reader(client.watch_session(session_id=watched, after_event_id=0, resume=False))
            await client.append_text(session_id=watched, role="user", text="hi")
            (appended,) = await watch.until(lambda e: e.HasField("messages_appended"))

            execute = Reader(client.execute(session_id=executed, text="/hang partial answer"))
            await execute.until(lambda e: text_of([e]) == "answer")

            conn = client.connect(session_id=connected)
            relay = Reader(conn)
            await conn.send_execute(text="/hang other words")
            await relay.until(lambda r: r.HasField("turn_event") and text_of([r.turn_event]) == "words")

            await asyncio.wait_for(running.stop(GRACE_SECONDS), HANG_GUARD_SECONDS)
            stopped = True

            # Execute: the turn stopped, told why (retryable), and kept its partial answer.
            tail = await execute.rest()
            error = only(tail, "error")
            assert (error.reason, error.retryable) == ("SERVER_SHUTTING_DOWN", True)
            assert reason(tail) == ERROR
            answer = only(tail, "message_completed").message
            assert (message_text(answer), answer.status) == (
                "partial answer",
                MessageStatus.MESSAGE_STATUS_INTERRUPTED,
            )

            # Connect: the turn's end is relayed, then the stream ends UNAVAILABLE, so the caller reconnects.
            relayed = []
            with pytest.raises(errors.Unavailable) as ended:
                async for frame in conn:
                    relayed.append(frame)
            assert ended.value.reason == "SERVER_SHUTTING_DOWN"
            assert ended.value.metadata["session_id"] == connected
            events = [f.turn_event for f in relay.seen + relayed if f.HasField("turn_event")]
            assert only(events, "error").reason == "SERVER_SHUTTING_DOWN"
            assert reason(events) == ERROR
            assert message_text(only(events, "message_completed").message) == "other words"

            # WatchSession: UNAVAILABLE with where to resume from (what a resuming watch does by itself).
            with pytest.raises(errors.Unavailable) as cut:
                await watch.rest()
            assert cut.value.reason == "SERVER_SHUTTING_DOWN"
            assert cut.value.metadata == {"session_id": watched, "last_event_id": str(appended.event_id)}

        # What the stopped turns stored is there after a restart.
        running = await start_server(settings, clock=clock)
        stopped = False
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            for sid, text in ((executed, "partial answer"), (connected, "other words")):
                stored = [m async for m in await client.list_messages(session_id=sid)]
                assert [(m.role, m.status) for m in stored] == [
                    (Role.ROLE_USER, MessageStatus.MESSAGE_STATUS_COMPLETE),
                    (Role.ROLE_ASSISTANT, MessageStatus.MESSAGE_STATUS_INTERRUPTED),
                ]
                assert message_text(stored[1]) == text
            # The turns let their sessions go: the next turn runs.
            assert reason([e async for e in client.execute(session_id=executed, text="again")]) != ERROR
    finally:
        if not stopped:
            await running.stop(0)


async def test_streams_opened_while_the_server_drains_end_at_once(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """A watch or turn that reaches the server in the moment its drain begins is not left behind."""
    running = await start_server(make_settings(database), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            sid = f"{unique}/late"
            await client.create_session(agent_id="echo", session_id=sid)
            assert running.turns is not None
            running.bus.end_subscriptions()  # the first steps of a drain, before grpc refuses calls
            await running.turns.close()
            with pytest.raises(errors.Unavailable) as watch:
                [e async for e in client.watch_session(session_id=sid, after_event_id=0, resume=False)]
            assert watch.value.reason == "SERVER_SHUTTING_DOWN"
            with pytest.raises(errors.Unavailable) as turn:
                [e async for e in client.execute(session_id=sid, text="hi")]
            assert turn.value.reason == "SERVER_SHUTTING_DOWN"
            conn = client.connect(session_id=sid)
            await conn.send_execute(text="hi")
            with pytest.raises(errors.Unavailable) as connect:
                [r async for r in conn]
            assert connect.value.reason == "SERVER_SHUTTING_DOWN"
            # Unary calls are still served until grpc stops taking calls.
            assert (await client.get_session(session_id=sid)).session_id == sid
    finally:
        await running.stop(0)


async def test_a_sync_connect_stream_the_server_ends_lets_its_request_thread_go(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """gRPC's sync API reads a stream's requests on a thread of its own, here from the Connection's outbox;
    when the server ends the stream, the Connection ends the outbox too. Before, nothing did, and that
    thread waited on it for as long as the process ran: one thread lost per stream the server ended."""
    running = await start_server(make_settings(database), clock=clock)
    stopped = False
    client = SessionsClient(f"127.0.0.1:{running.port}")
    sid = f"{unique}/sync-connect"

    def connect() -> tuple[Connection, list[threading.Thread]]:
        client.create_session(agent_id="echo", session_id=sid)
        client.heartbeat(session_id=sid)  # threads the server starts on first use start now, not below
        before = set(threading.enumerate())
        connection = client.connect(session_id=sid)
        connection.send_heartbeat()
        answer = next(connection)
        assert answer.session.session_id == sid
        return connection, [t for t in threading.enumerate() if t not in before]

    def read_the_rest(connection: Connection) -> errors.AgentSessionsError | None:
        try:
            list(connection)
        except errors.AgentSessionsError as err:
            return err
        return None

    try:
        connection, started = await asyncio.to_thread(connect)
        assert started  # the request thread at least
        await asyncio.wait_for(running.stop(GRACE_SECONDS), HANG_GUARD_SECONDS)
        stopped = True
        ended = await asyncio.to_thread(read_the_rest, connection)
        assert isinstance(ended, errors.Unavailable) and ended.reason == "SERVER_SHUTTING_DOWN"
        # The client stays open: what ends the threads is the stream's end, not the channel's.
        for thread in started:
            await asyncio.to_thread(thread.join, HANG_GUARD_SECONDS / 4)
        assert [t.name for t in started if t.is_alive()] == []
    finally:
        client.close()
        if not stopped:
            await running.stop(0)


async def test_a_caller_waiting_for_the_running_turn_is_let_go_when_the_drain_begins(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """An Execute waiting (enqueue) for the turn running here ends SERVER_SHUTTING_DOWN when the drain
    begins, and starts nothing. Before, once the drain had stopped the running turn, the waiting one
    started its own turn, stored its input and ran while the server stopped."""
    settings = make_settings(database)
    running = await start_server(settings, clock=clock)
    stopped = False
    sid = f"{unique}/queued"
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            await client.create_session(agent_id="echo", session_id=sid)
            first = Reader(client.execute(session_id=sid, text="/hang first answer"))
            await first.until(lambda e: text_of([e]) == "answer")
            queued = asyncio.ensure_future(
                Reader(client.execute(session_id=sid, text="queued", multitask_strategy="enqueue")).rest()
            )
            assert running.turns is not None
            await asyncio.wait_for(running.turns.wait_for_waiting(sid, 1), HANG_GUARD_SECONDS)
            await asyncio.wait_for(running.stop(GRACE_SECONDS), HANG_GUARD_SECONDS)
            stopped = True
            with pytest.raises(errors.Unavailable) as refused:
                await queued
            assert refused.value.reason == "SERVER_SHUTTING_DOWN"
            assert only(await first.rest(), "error").reason == "SERVER_SHUTTING_DOWN"

        running = await start_server(settings, clock=clock)
        stopped = False
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            stored = [m async for m in await client.list_messages(session_id=sid)]
            assert [message_text(m) for m in stored] == ["/hang first answer", "first answer"]
    finally:
        if not stopped:
            await running.stop(0)


async def test_a_health_watch_sees_not_serving_and_does_not_hold_the_stop(
    database: DatabaseTarget, clock: ManualClock
) -> None:
    """A client watching health (grpc's client-side health checking keeps such a stream on each channel)
    gets NOT_SERVING when the drain begins, and then its stream ends, so the stop does not wait out the
    grace period. Before, the Watch stayed open and every SIGTERM took the whole grace period."""
    running = await start_server(make_settings(database), clock=clock)
    stopped = False
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.wait_for(running.stop(GRACE_SECONDS), HANG_GUARD_SECONDS)
            stopped = True
            rest = []
            while (response := await watch.read()) is not grpc.aio.EOF:
                rest.append(response.status)
            assert rest == [health_pb2.HealthCheckResponse.NOT_SERVING]
    finally:
        if not stopped:
            await running.stop(0)
