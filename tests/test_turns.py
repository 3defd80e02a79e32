"""Agent turns through the published client, with the built-in echo agent: each request type, each finish
reason, stop and disconnect, continue after a client tool request, idempotent retries, every multitask
strategy with concurrent callers, Connect, and the turn lease. The echo agent's `/hang TEXT` streams TEXT
and then waits to be stopped, so the tests synchronize on received events, never on time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import DatabaseTarget, make_settings, replica_clients
from google.protobuf import json_format
from turn_support import (
    CANCELLED,
    CLIENT_TOOL_CALLS,
    ERROR,
    LENGTH,
    STOP,
    Reader,
    kinds,
    message_text,
    only,
    reason,
    text_of,
)

from agentsessions import AsyncSessionsClient, MessageStatus, Role, SessionsClient, SessionStatus, errors
from sessiond.domain.clock import ManualClock
from sessiond.domain.turns import TurnKind, TurnRequest
from sessiond.server import RunningServer, start_server
from sessiond.store.turns import Acquired, TurnStore

INTERRUPTED = MessageStatus.MESSAGE_STATUS_INTERRUPTED
COMPLETE = MessageStatus.MESSAGE_STATUS_COMPLETE


async def new_session(client: AsyncSessionsClient, unique: str, name: str = "s") -> str:
    session = await client.create_session(agent_id="echo", session_id=f"{unique}/{name}")
    return session.session_id


async def run(client: AsyncSessionsClient, session_id: str, text: str, **kwargs: object) -> list:  # type: ignore[type-arg]
    return [e async for e in client.execute(session_id=session_id, text=text, **kwargs)]  # type: ignore[arg-type]


async def history(client: AsyncSessionsClient, session_id: str) -> list:  # type: ignore[type-arg]
    return [m async for m in await client.list_messages(session_id=session_id)]


# --- request types and finish reasons ---------------------------------------------------------------------


async def test_message_turn_streams_word_by_word_and_stores_both_messages(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    events = await run(client, sid, "hello big world")

    assert kinds(events) == [
        "turn_started",
        "text_delta",
        "text_delta",
        "text_delta",
        "usage",
        "message_completed",
        "turn_finished",
    ]
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert {e.turn_id for e in events} == {events[0].turn_id} and events[0].turn_id
    assert all(e.session_id == sid for e in events)
    assert [e.text_delta.text for e in events if e.HasField("text_delta")] == ["hello ", "big ", "world"]
    user = events[0].turn_started.user_message
    assert (user.sequence, user.role, message_text(user)) == (1, Role.ROLE_USER, "hello big world")
    assert user.turn_id == events[0].turn_id
    answer = only(events, "message_completed").message
    assert answer.message_id == events[1].text_delta.message_id
    assert (answer.sequence, answer.role, answer.status) == (2, Role.ROLE_ASSISTANT, COMPLETE)
    assert message_text(answer) == "hello big world"
    assert reason(events) == STOP

    stored = await history(client, sid)
    assert [(m.sequence, m.role, m.status, m.turn_id) for m in stored] == [
        (1, Role.ROLE_USER, COMPLETE, events[0].turn_id),
        (2, Role.ROLE_ASSISTANT, COMPLETE, events[0].turn_id),
    ]
    assert stored[1] == answer


async def test_execute_is_activity_and_renews(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    sid = await new_session(client, unique)
    before = await client.get_session(session_id=sid)
    clock.advance(minutes=10)
    await run(client, sid, "still here")
    after = await client.get_session(session_id=sid)
    assert after.last_activity_time.ToDatetime(UTC) == clock.now()
    assert after.expire_time.ToDatetime(UTC) == clock.now() + timedelta(minutes=30)
    assert after.renewal_count == before.renewal_count + 1
    assert after.message_count == 2


async def test_reasoning_deltas_are_streamed_and_stored(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    events = await run(client, sid, "/think step one")
    assert text_of(events, "reasoning_delta") == "step one"
    assert text_of(events) == "step one"
    first_text = kinds(events).index("text_delta")
    assert kinds(events).index("reasoning_delta") < first_text
    parts = only(events, "message_completed").message.parts
    assert [p.WhichOneof("kind") for p in parts] == ["reasoning", "text"]
    assert parts[0].reasoning.text == "step one"


async def test_trigger_turn(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    events = [
        e
        async for e in client.execute(
            session_id=sid, trigger={"name": "daily_digest", "input": {"topic": "news", "count": 3}}
        )
    ]
    started = events[0].turn_started
    assert started.trigger_name == "daily_digest"
    assert not started.HasField("user_message")
    assert text_of(events) == 'trigger daily_digest {"count": 3.0, "topic": "news"}'
    assert reason(events) == STOP
    stored = await history(client, sid)
    assert [m.role for m in stored] == [Role.ROLE_ASSISTANT]


async def test_length_finish(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    events = await run(client, sid, "/length cut short")
    assert reason(events) == LENGTH
    answer = only(events, "message_completed").message
    assert (message_text(answer), answer.status) == ("cut short", COMPLETE)


async def test_agent_error_event_ends_the_turn_and_keeps_partial_output(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    events = await run(client, sid, "/fail so far")
    error = only(events, "error")
    assert (error.reason, error.retryable) == ("AGENT_FAILED", False)
    answer = only(events, "message_completed").message
    assert (message_text(answer), answer.status) == ("so far", MessageStatus.MESSAGE_STATUS_ERROR)
    assert kinds(events)[-3:] == ["error", "message_completed", "turn_finished"]
    assert reason(events) == ERROR
    assert (await client.get_session(session_id=sid)).status == SessionStatus.SESSION_STATUS_ACTIVE


async def test_client_tool_request_then_continue(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    first = await run(client, sid, 'Checking.\n/tool get_weather {"city": "Paris"}\n/tool get_time')
    assert reason(first) == CLIENT_TOOL_CALLS
    calls = only(first, "client_tool_request").calls
    assert [(c.name, c.arguments, c.client_side) for c in calls] == [
        ("get_weather", '{"city": "Paris"}', True),
        ("get_time", "{}", True),
    ]
    asked = only(first, "message_completed").message
    assert [p.WhichOneof("kind") for p in asked.parts] == ["text", "tool_call", "tool_call"]
    paused_turn = first[0].turn_id

    results = [
        {"call_id": calls[0].call_id, "name": "get_weather", "output": '{"sky": "clear"}'},
        {"call_id": calls[1].call_id, "name": "get_time", "output": "noon"},
    ]
    second = [
        e
        async for e in client.execute(
            session_id=sid, continue_turn={"turn_id": paused_turn, "tool_results": results}
        )
    ]
    started = second[0].turn_started
    assert started.continued_turn_id == paused_turn
    assert second[0].turn_id != paused_turn
    assert started.user_message.role == Role.ROLE_TOOL
    assert [p.tool_result.call_id for p in started.user_message.parts] == [c.call_id for c in calls]
    assert text_of(second) == 'get_weather returned {"sky": "clear"}\nget_time returned noon'
    assert reason(second) == STOP

    stored = await history(client, sid)
    assert [m.role for m in stored] == [
        Role.ROLE_USER,
        Role.ROLE_ASSISTANT,
        Role.ROLE_TOOL,
        Role.ROLE_ASSISTANT,
    ]
    # The calls and their results stay together in a page (the window an agent receives too).
    last = await client.last_messages(session_id=sid, n=2)
    assert [m.role for m in last] == [Role.ROLE_ASSISTANT]
    last = await client.last_messages(session_id=sid, n=3)
    assert [m.role for m in last] == [Role.ROLE_ASSISTANT, Role.ROLE_TOOL, Role.ROLE_ASSISTANT]

    # A turn continues once.
    with pytest.raises(errors.FailedPrecondition) as again:
        await run_continue(client, sid, paused_turn, results)
    assert again.value.reason == "TURN_NOT_PAUSED"


async def run_continue(client: AsyncSessionsClient, sid: str, turn_id: str, results: list) -> list:  # type: ignore[type-arg]
    return [
        e
        async for e in client.execute(
            session_id=sid, continue_turn={"turn_id": turn_id, "tool_results": results}
        )
    ]


async def test_continue_is_checked(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    done = await run(client, sid, "no tools here")
    with pytest.raises(errors.NotFound) as missing:
        await run_continue(client, sid, "no-such-turn", [{"call_id": "c1", "output": "x"}])
    assert missing.value.reason == "TURN_NOT_FOUND"
    with pytest.raises(errors.FailedPrecondition) as not_paused:
        await run_continue(client, sid, done[0].turn_id, [{"call_id": "c1", "output": "x"}])
    assert not_paused.value.reason == "TURN_NOT_PAUSED"

    paused = await run(client, sid, "/tool a\n/tool b")
    calls = only(paused, "client_tool_request").calls
    turn_id = paused[0].turn_id
    with pytest.raises(errors.InvalidArgument) as unknown:
        await run_continue(client, sid, turn_id, [{"call_id": "other", "output": "x"}])
    assert unknown.value.field_violations[0][0] == "continue_turn.tool_results"
    with pytest.raises(errors.InvalidArgument) as partial:
        await run_continue(client, sid, turn_id, [{"call_id": calls[0].call_id, "output": "x"}])
    assert "missing" in partial.value.field_violations[0][1]
    with pytest.raises(errors.InvalidArgument):
        await run_continue(client, sid, turn_id, [])
    # Nothing was stored by the refused continues.
    assert len(await history(client, sid)) == 4

    # A new message leaves the paused turn behind.
    await run(client, sid, "never mind")
    with pytest.raises(errors.FailedPrecondition) as superseded:
        await run_continue(client, sid, turn_id, [{"call_id": c.call_id, "output": "x"} for c in calls])
    assert superseded.value.reason == "TURN_NOT_PAUSED"


async def test_a_pause_from_before_a_clear_cannot_be_continued(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Clear (and the restore after it) close the session's open pause: the calls it asked for went with
    the old history, and results for them would dangle in the new one."""
    sid = await new_session(client, unique)
    paused = await run(client, sid, "/tool lookup")
    (call,) = only(paused, "client_tool_request").calls
    await client.clear_session(session_id=sid)
    restored = await client.restore_session(
        session_id=sid, messages=[{"role": "ROLE_USER", "parts": [{"text": {"text": "A"}}]}]
    )
    assert restored.restored
    with pytest.raises(errors.FailedPrecondition) as gone:
        await run_continue(client, sid, paused[0].turn_id, [{"call_id": call.call_id, "output": "x"}])
    assert gone.value.reason == "TURN_NOT_PAUSED"
    assert "cleared or restored" in gone.value.message
    assert [m.role for m in await history(client, sid)] == [Role.ROLE_USER]
    assert reason(await run(client, sid, "fresh start")) == STOP


async def test_a_turn_abandoned_after_a_restore_does_not_reopen_the_old_pause(
    client: AsyncSessionsClient, server: RunningServer, clock: ManualClock, unique: str
) -> None:
    """A turn that took the lease (closing the open pause), then had it ended by a restore before it
    stored its input, is abandoned; the pause it closed belongs to the old history and stays closed."""
    sid = await new_session(client, unique)
    paused = await run(client, sid, "/tool lookup")
    (call,) = only(paused, "client_tool_request").calls
    store = TurnStore(server.service.store)
    wall = datetime.now(UTC)
    taken = await store.acquire(
        TurnRequest(session_id=sid, kind=TurnKind.MESSAGE),
        turn_id=f"t-{unique}",
        owner=server.turns.owner,  # type: ignore[union-attr]
        lease_now=wall,
        lease_until=wall + timedelta(seconds=60),
        now=clock.now(),
    )
    assert isinstance(taken, Acquired)
    await client.clear_session(session_id=sid)
    await client.restore_session(
        session_id=sid, messages=[{"role": "ROLE_USER", "parts": [{"text": {"text": "A"}}]}]
    )
    await store.abandon(taken.turn)  # what the turn does once its input is refused (TURN_LOST)
    with pytest.raises(errors.FailedPrecondition) as closed:
        await run_continue(client, sid, paused[0].turn_id, [{"call_id": call.call_id, "output": "x"}])
    assert closed.value.reason == "TURN_NOT_PAUSED"
    assert [m.role for m in await history(client, sid)] == [Role.ROLE_USER]


async def test_bad_requests_are_invalid_argument(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    cases = [
        {"message": {"role": "ROLE_ASSISTANT", "parts": [{"text": {"text": "x"}}]}},
        {"message": {"parts": []}},
        {"trigger": {"name": ""}},
        {"continue_turn": {"turn_id": "", "tool_results": [{"call_id": "c"}]}},
        {"continue_turn": {"turn_id": "t", "tool_results": [{"call_id": "c"}, {"call_id": "c"}]}},
    ]
    for case in cases:
        with pytest.raises(errors.InvalidArgument):
            [e async for e in client.execute(session_id=sid, **case)]  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument):
        await run(client, sid, "x", multitask_strategy=99)
    assert await history(client, sid) == []


async def test_expired_ended_and_missing_sessions_are_refused(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    expired = await new_session(client, unique, "expired")
    ended = await new_session(client, unique, "ended")
    await client.end_session(session_id=ended)
    clock.advance(minutes=31)
    fresh = await new_session(client, unique, "fresh")
    await client.end_session(session_id=ended)
    with pytest.raises(errors.FailedPrecondition) as exp:
        await run(client, expired, "hi")
    assert exp.value.reason == "SESSION_EXPIRED"
    with pytest.raises(errors.FailedPrecondition) as end:
        await run(client, ended, "hi")
    assert end.value.reason == "SESSION_ENDED"
    with pytest.raises(errors.NotFound) as missing:
        await run(client, f"{unique}/nope", "hi")
    assert missing.value.reason == "SESSION_NOT_FOUND"
    assert await history(client, expired) == []
    assert reason(await run(client, fresh, "hi")) == STOP


# --- stop and disconnect ----------------------------------------------------------------------------------


async def test_stop_turn_from_another_client_keeps_partial_text(
    client: AsyncSessionsClient, target: str, unique: str
) -> None:
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang partial answer"))
    head = await reader.until(lambda e: text_of([e]) == "answer")
    turn_id = head[0].turn_id
    stats = await client.get_server_stats()
    assert stats.running_turns >= 1

    async with AsyncSessionsClient(target) as other:
        stopped = await other.stop_turn(session_id=sid)
        assert (stopped.stopped, stopped.turn_id) == (True, turn_id)
        tail = await reader.rest()
        assert reason(tail) == CANCELLED
        answer = only(tail, "message_completed").message
        assert (message_text(answer), answer.status) == ("partial answer", INTERRUPTED)
        again = await other.stop_turn(session_id=sid)
        assert again.stopped is False
        wrong = await other.stop_turn(session_id=sid, turn_id="some-other-turn")
        assert wrong.stopped is False
    stored = await history(client, sid)
    assert [(m.role, m.status) for m in stored] == [
        (Role.ROLE_USER, COMPLETE),
        (Role.ROLE_ASSISTANT, INTERRUPTED),
    ]
    with pytest.raises(errors.NotFound):
        await client.stop_turn(session_id=f"{unique}/nope")


async def test_stop_before_any_output_stores_no_assistant_message(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang"))
    await reader.until_kind("usage")
    await client.stop_turn(session_id=sid)
    tail = await reader.rest()
    assert reason(tail) == CANCELLED
    # "/hang" with no text echoes "(no text)" first, kept as the partial output
    assert message_text(only(tail, "message_completed").message) == "(no text)"


async def test_disconnect_cancels_the_turn_and_keeps_partial_text(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang cut off here"))
    head = await reader.until(lambda e: text_of([e]) == "here")
    reader.stream.cancel()
    # The next turn, enqueued, runs once the cancelled one has stored its partial output.
    after = await run(client, sid, "next", multitask_strategy="enqueue")
    assert reason(after) == STOP
    stored = await history(client, sid)
    assert [(m.role, m.status, message_text(m)) for m in stored] == [
        (Role.ROLE_USER, COMPLETE, "/hang cut off here"),
        (Role.ROLE_ASSISTANT, INTERRUPTED, "cut off here"),
        (Role.ROLE_USER, COMPLETE, "next"),
        (Role.ROLE_ASSISTANT, COMPLETE, "next"),
    ]
    assert stored[1].turn_id == head[0].turn_id


# --- multitask strategies ---------------------------------------------------------------------------------


async def test_reject_while_a_turn_runs(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang busy"))
    head = await reader.until_kind("text_delta")
    with pytest.raises(errors.Aborted) as rejected:
        await run(client, sid, "me too", multitask_strategy="reject")
    assert rejected.value.reason == "TURN_IN_PROGRESS"
    assert rejected.value.retry_delay is not None and rejected.value.retry_delay > 0
    assert rejected.value.metadata["turn_id"] == head[0].turn_id
    await client.stop_turn(session_id=sid)
    assert reason(await reader.rest()) == CANCELLED
    # Once the turn finished, reject has nothing to reject.
    assert reason(await run(client, sid, "now", multitask_strategy="reject")) == STOP
    assert [message_text(m) for m in await history(client, sid)] == ["/hang busy", "busy", "now", "now"]


async def test_interrupt_is_the_default(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    first = Reader(client.execute(session_id=sid, text="/hang first answer"))
    await first.until(lambda e: text_of([e]) == "answer")
    second, first_tail = await asyncio.gather(run(client, sid, "second"), first.rest())
    assert reason(first_tail) == CANCELLED
    assert only(first_tail, "message_completed").message.status == INTERRUPTED
    assert reason(second) == STOP
    stored = await history(client, sid)
    assert [(message_text(m), m.status) for m in stored] == [
        ("/hang first answer", COMPLETE),
        ("first answer", INTERRUPTED),
        ("second", COMPLETE),
        ("second", COMPLETE),
    ]


async def test_rollback_deletes_the_interrupted_turns_messages(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    assert reason(await run(client, sid, "kept")) == STOP
    first = Reader(client.execute(session_id=sid, text="/hang regret this"))
    await first.until(lambda e: text_of([e]) == "this")
    second, first_tail = await asyncio.gather(
        run(client, sid, "instead", multitask_strategy="rollback"), first.rest()
    )
    assert reason(first_tail) == CANCELLED
    assert "message_completed" not in kinds(first_tail)
    assert reason(second) == STOP
    stored = await history(client, sid)
    assert [message_text(m) for m in stored] == ["kept", "kept", "instead", "instead"]
    assert [m.sequence for m in stored] == [1, 2, 4, 5]  # numbers are never reused
    session = await client.get_session(session_id=sid)
    assert (session.message_count, session.last_sequence) == (4, 5)


async def test_enqueue_runs_each_turn_after_the_one_before(
    client: AsyncSessionsClient, server: RunningServer, unique: str
) -> None:
    sid = await new_session(client, unique)
    first = Reader(client.execute(session_id=sid, text="/hang one"))
    await first.until_kind("text_delta")
    queued = [
        asyncio.create_task(run(client, sid, text, multitask_strategy="enqueue")) for text in ("two", "three")
    ]
    assert server.turns is not None
    await server.turns.wait_for_waiting(sid, 2)
    assert not any(t.done() for t in queued)
    await client.stop_turn(session_id=sid)
    assert reason(await first.rest()) == CANCELLED
    results = await asyncio.gather(*queued)
    assert [reason(r) for r in results] == [STOP, STOP]
    stored = await history(client, sid)
    # Turns never overlap: each turn's messages are contiguous, user message first.
    turns = [m.turn_id for m in stored]
    assert len(stored) == 6
    assert all(turns[i] == turns[i + 1] for i in (0, 2, 4))
    assert [m.role for m in stored] == [Role.ROLE_USER, Role.ROLE_ASSISTANT] * 3
    assert sorted(message_text(m) for m in stored[2:]) == ["three", "three", "two", "two"]


async def test_concurrent_interrupts_never_overlap(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    first = Reader(client.execute(session_id=sid, text="/hang base"))
    await first.until_kind("text_delta")
    results = await asyncio.gather(*(run(client, sid, f"caller {i}") for i in range(4)), first.rest())
    assert reason(results[-1]) == CANCELLED
    assert {reason(r) for r in results[:-1]} <= {STOP, CANCELLED}
    assert any(reason(r) == STOP for r in results[:-1])  # the last one to start runs to its end
    stored = await history(client, sid)
    turns = [m.turn_id for m in stored]
    for turn_id in set(turns):
        positions = [i for i, t in enumerate(turns) if t == turn_id]
        assert positions == list(range(positions[0], positions[-1] + 1)), "turns overlapped"
        assert stored[positions[0]].role == Role.ROLE_USER


# --- idempotent retries -----------------------------------------------------------------------------------


async def test_request_id_replays_the_finished_turn(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    first = await run(client, sid, "only once please", request_id="req-1")
    retry = await run(client, sid, "only once please", request_id="req-1")
    assert {e.turn_id for e in retry} == {first[0].turn_id}
    assert text_of(retry) == text_of(first) == "only once please"
    assert kinds(retry) == ["turn_started", "text_delta", "usage", "message_completed", "turn_finished"]
    assert only(retry, "message_completed").message == only(first, "message_completed").message
    assert reason(retry) == STOP
    assert len(await history(client, sid)) == 2
    # Another request id is another turn.
    assert reason(await run(client, sid, "again", request_id="req-2")) == STOP
    assert len(await history(client, sid)) == 4


async def test_a_turn_never_starts_from_a_message_id_already_held(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Execute with a message id the session already holds (a retry without a request id, or a clash with
    another writer's message, an assistant's even) fails ALREADY_EXISTS / MESSAGE_ALREADY_EXISTS and
    changes nothing. Before, the idempotent append gave back the stored message, and a new turn answered
    it: a second answer to an old question, or an answer to the assistant's own message."""
    sid = await new_session(client, unique)
    await client.append_messages(
        session_id=sid,
        messages=[
            {"message_id": "a1", "role": "ROLE_ASSISTANT", "parts": [{"text": {"text": "said before"}}]}
        ],
    )

    async def execute(message_id: str, text: str) -> list:  # type: ignore[type-arg]
        message = {"message_id": message_id, "parts": [{"text": {"text": text}}]}
        return [e async for e in client.execute(session_id=sid, message=message)]

    assert reason(await execute("u1", "question")) == STOP
    for held in ("a1", "u1"):
        with pytest.raises(errors.AlreadyExists) as caught:
            await execute(held, "new text")
        assert caught.value.reason == "MESSAGE_ALREADY_EXISTS"
        assert caught.value.metadata["message_id"] == held
    assert [message_text(m) for m in await history(client, sid)] == ["said before", "question", "question"]
    # The session takes turns as before.
    assert reason(await run(client, sid, "next")) == STOP


async def test_request_id_joins_the_running_turn(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    original = Reader(client.execute(session_id=sid, text="/hang joined", request_id="req-j"))
    head = await original.until_kind("text_delta")
    joined = Reader(client.execute(session_id=sid, text="/hang joined", request_id="req-j"))
    joined_head = await joined.until_kind("text_delta")
    assert [e.SerializeToString() for e in joined_head] == [e.SerializeToString() for e in head]
    await client.stop_turn(session_id=sid)
    original_tail, joined_tail = await asyncio.gather(original.rest(), joined.rest())
    assert original_tail == joined_tail
    assert reason(joined_tail) == CANCELLED
    assert len(await history(client, sid)) == 2


# --- Connect ----------------------------------------------------------------------------------------------


async def test_connect_execute_stop_heartbeat_and_errors(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    conn = client.connect(session_id=sid)
    reader = Reader(conn)
    await conn.send_execute(text="/hang first words")
    first = await reader.until(lambda r: r.HasField("turn_event") and text_of([r.turn_event]) == "words")
    first_turn = first[-1].turn_event.turn_id

    # A new execute interrupts the previous turn; its events all come first.
    await conn.send_execute(text="second")
    frames = await reader.until(
        lambda r: (
            r.HasField("turn_event")
            and r.turn_event.turn_id != first_turn
            and r.turn_event.HasField("turn_finished")
        )
    )
    events = [f.turn_event for f in frames if f.HasField("turn_event")]
    old = [e for e in events if e.turn_id == first_turn]
    new = [e for e in events if e.turn_id != first_turn]
    assert reason(old) == CANCELLED
    assert events.index(old[-1]) < events.index(new[0])
    assert reason(new) == STOP and text_of(new) == "second"

    await conn.send_heartbeat()
    beat = await reader.until(lambda r: r.HasField("session"))
    assert beat[-1].session.session_id == sid

    # An error is a frame; the stream stays open.
    await conn.send_execute(message={"role": "ROLE_ASSISTANT", "parts": [{"text": {"text": "x"}}]})
    bad = await reader.until(lambda r: r.HasField("error"))
    err = errors.from_connect_error(bad[-1].error)
    assert isinstance(err, errors.InvalidArgument)
    # With the details a failed call's status carries: ErrorInfo and the field violations.
    assert err.domain == "agentsessions.v1" and err.reason == "INVALID_ARGUMENT"
    assert err.field_violations[0][0] == "message.role"

    await conn.send_execute(text="/hang third")
    third = await reader.until(lambda r: r.HasField("turn_event") and r.turn_event.HasField("text_delta"))
    await conn.send_stop()
    stopped = await reader.until(
        lambda r: r.HasField("turn_event") and r.turn_event.HasField("turn_finished")
    )
    assert reason([f.turn_event for f in stopped]) == CANCELLED
    assert stopped[-1].turn_event.turn_id == third[-1].turn_event.turn_id

    await conn.done_writing()
    assert [f for f in await reader.rest() if f.HasField("turn_event")] == []
    stored = await history(client, sid)
    assert [message_text(m) for m in stored] == [
        "/hang first words",
        "first words",
        "second",
        "second",
        "/hang third",
        "third",
    ]


@pytest.mark.parametrize("first_on_disconnect", ["cancel", "continue"])
async def test_connect_new_frame_interrupts_a_turn_still_starting_whatever_its_strategy(
    client: AsyncSessionsClient, unique: str, first_on_disconnect: str
) -> None:
    """Two execute frames back to back: the second comes while the first is still taking its lease. The
    stream's own turn never refuses the next frame (even under `reject`), and it does not run on (even
    with on_disconnect=continue); each frame's events come whole and in order."""
    sid = await new_session(client, unique)
    conn = client.connect(session_id=sid)
    reader = Reader(conn)
    await conn.send_execute(text="/hang first", on_disconnect=first_on_disconnect)
    await conn.send_execute(text="second", multitask_strategy="reject")
    frames = await reader.until(
        lambda r: r.HasField("error") or (r.HasField("turn_event") and "second" in text_of([r.turn_event]))
    )
    assert [f for f in frames if f.HasField("error")] == []
    frames += await reader.until(
        lambda r: r.HasField("turn_event") and r.turn_event.HasField("turn_finished")
    )
    events = [f.turn_event for f in frames if f.HasField("turn_event")]
    second = next(e for e in events if text_of([e]) == "second").turn_id
    new = [e for e in events if e.turn_id == second]
    old = [e for e in events if e.turn_id != second]
    assert reason(new) == STOP
    if old:  # the first turn stored its input: its events come whole, before the second's
        assert reason(old) == CANCELLED
        assert events.index(old[-1]) < events.index(new[0])
    await conn.done_writing()
    await reader.rest()
    stored = await history(client, sid)
    assert [message_text(m) for m in stored][-2:] == ["second", "second"]
    # Nothing of the first frame runs on: a turn that refuses to wait starts at once.
    assert reason(await run(client, sid, "third", multitask_strategy="reject")) == STOP


async def test_connect_frames_in_a_burst_end_with_the_last_one_running_alone(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Four frames sent at once: each interrupts the one before, even one cut off while it was still
    interrupting its own predecessor; only the last frame's turn runs, and nothing is left running."""
    sid = await new_session(client, unique)
    conn = client.connect(session_id=sid)
    reader = Reader(conn)
    for text in ("/hang one", "/hang two", "/hang three"):
        await conn.send_execute(text=text, on_disconnect="continue")
    await conn.send_execute(text="last", multitask_strategy="reject")
    frames = await reader.until(
        lambda r: r.HasField("error") or (r.HasField("turn_event") and text_of([r.turn_event]) == "last")
    )
    assert [f for f in frames if f.HasField("error")] == []
    await conn.done_writing()
    frames += await reader.rest()
    events = [f.turn_event for f in frames if f.HasField("turn_event")]
    last = next(e.turn_id for e in events if text_of([e]) == "last")
    finished = [e.turn_id for e in events if e.HasField("turn_finished")]
    assert finished[-1] == last and len(finished) == len(set(finished))  # each turn ends once, the last last
    by_turn = {t: [e for e in events if e.turn_id == t] for t in finished}
    assert reason(by_turn[last]) == STOP
    assert all(reason(evs) == CANCELLED for t, evs in by_turn.items() if t != last)
    assert reason(await run(client, sid, "after", multitask_strategy="reject")) == STOP


async def test_connect_disconnect_cancels_the_running_turn(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    conn = client.connect(session_id=sid)
    reader = Reader(conn)
    await conn.send_execute(text="/hang gone")
    await reader.until(lambda r: r.HasField("turn_event") and r.turn_event.HasField("text_delta"))
    conn.cancel()
    after = await run(client, sid, "later", multitask_strategy="enqueue")
    assert reason(after) == STOP
    stored = await history(client, sid)
    assert [(message_text(m), m.status) for m in stored][:2] == [
        ("/hang gone", COMPLETE),
        ("gone", INTERRUPTED),
    ]


async def test_connect_frames_after_the_stream_stopped_taking_them_raise_stream_closed(
    client: AsyncSessionsClient, unique: str
) -> None:
    """A frame sent after `done_writing()`, after the stream ended or after `cancel()` raises the client's
    FailedPrecondition / STREAM_CLOSED. Before, it raised grpc's bare asyncio.InvalidStateError, outside
    the client's exceptions."""
    sid = await new_session(client, unique)
    conn = client.connect(session_id=sid)
    await conn.send_heartbeat()
    await conn.done_writing()
    for send in (conn.send_heartbeat, conn.send_stop, lambda: conn.send_execute(text="late")):
        with pytest.raises(errors.FailedPrecondition) as half_closed:
            await send()
        assert half_closed.value.reason == errors.STREAM_CLOSED
    answers = await Reader(conn).rest()  # the server ends the stream once the caller is done
    assert [a.session.session_id for a in answers if a.HasField("session")] == [sid]
    with pytest.raises(errors.FailedPrecondition) as ended:
        await conn.send_heartbeat()
    assert ended.value.reason == errors.STREAM_CLOSED

    cancelled = client.connect(session_id=sid)
    await cancelled.send_heartbeat()
    cancelled.cancel()
    with pytest.raises(errors.FailedPrecondition) as after_cancel:
        await cancelled.send_heartbeat()
    assert after_cancel.value.reason == errors.STREAM_CLOSED


# --- the lease --------------------------------------------------------------------------------------------


async def test_a_crashed_owners_lease_runs_out(
    client: AsyncSessionsClient, server: RunningServer, clock: ManualClock, unique: str
) -> None:
    """A turn held by a process that no longer renews its lease blocks the session only until the lease
    runs out; a retry of that turn's request id learns that it was lost."""
    sid = await new_session(client, unique)
    store = TurnStore(server.service.store)
    wall = datetime.now(UTC)
    ghost = await store.acquire(
        TurnRequest(session_id=sid, kind=TurnKind.TRIGGER, request_id="ghost-req"),
        turn_id=f"ghost-{unique}",
        owner="ghost-process",
        lease_now=wall,
        lease_until=wall + timedelta(hours=1),
        now=clock.now(),
    )
    assert isinstance(ghost, Acquired)

    with pytest.raises(errors.Aborted) as busy:
        await run(client, sid, "blocked", multitask_strategy="reject")
    assert busy.value.metadata["turn_id"] == f"ghost-{unique}"
    # StopTurn reaches a turn of another process through its lease row.
    stop = await client.stop_turn(session_id=sid)
    assert (stop.stopped, stop.turn_id) == (True, f"ghost-{unique}")
    running = await store.running(sid)
    assert running is not None and running.stop_mode == 1

    # The ghost stops renewing: its lease runs out.
    await store.renew("ghost-process", [f"ghost-{unique}"], wall - timedelta(seconds=1))
    assert reason(await run(client, sid, "free again", multitask_strategy="reject")) == STOP
    replay = [e async for e in client.execute(session_id=sid, trigger={"name": "x"}, request_id="ghost-req")]
    assert only(replay, "error").reason == "TURN_LOST"
    assert reason(replay) == ERROR


async def test_server_stats_count_running_turns(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    before = (await client.get_server_stats()).running_turns
    reader = Reader(client.execute(session_id=sid, text="/hang counted"))
    await reader.until_kind("text_delta")
    assert (await client.get_server_stats()).running_turns == before + 1
    await client.stop_turn(session_id=sid)
    await reader.rest()
    assert (await client.get_server_stats()).running_turns == before


async def test_turn_events_reach_watchers(client: AsyncSessionsClient, unique: str) -> None:
    """Every turn event is published to the session's event bus (WatchSession relays it)."""
    sid = await new_session(client, unique)
    watch = client.watch_session(session_id=sid, after_event_id=0, include_deltas=True)
    watched = Reader(watch)
    # Any event received proves the watch subscribed (it does before reading storage): deltas are live
    # only, so the turn must start after that.
    await client.append_text(session_id=sid, role="user", text="ping")
    await watched.until(lambda e: e.HasField("messages_appended"))
    events = await run(client, sid, "watch me")
    seen = await watched.until(lambda e: e.HasField("turn") and e.turn.HasField("turn_finished"))
    watch.cancel()
    relayed = [e.turn for e in seen if e.HasField("turn")]
    assert [e.index for e in relayed] == [e.index for e in events]
    assert json_format.MessageToDict(relayed[-1]) == json_format.MessageToDict(events[-1])


async def test_one_turn_per_session_across_servers(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """Two servers on one database, as two replicas: the lease row keeps one turn running per session,
    and a stop or an interrupt from one replica reaches the turn the other one runs."""
    settings = make_settings(database, turn_lease_seconds=1.0)
    async with replica_clients(settings, clock) as (a, b):
        sid = await new_session(a, unique)
        running = Reader(a.execute(session_id=sid, text="/hang on replica one"))
        head = await running.until(lambda e: text_of([e]) == "one")
        with pytest.raises(errors.Aborted) as busy:
            await run(b, sid, "from two", multitask_strategy="reject")
        assert busy.value.metadata["turn_id"] == head[0].turn_id

        # StopTurn on replica two stops the turn replica one runs (at its next lease renewal).
        stopped = await b.stop_turn(session_id=sid)
        assert (stopped.stopped, stopped.turn_id) == (True, head[0].turn_id)
        tail = await running.rest()
        assert reason(tail) == CANCELLED
        assert message_text(only(tail, "message_completed").message) == "/hang on replica one"[6:]

        # Interrupt from replica two: replica one's turn ends first, then replica two's runs.
        running = Reader(a.execute(session_id=sid, text="/hang again"))
        await running.until_kind("text_delta")
        second_turn, tail = await asyncio.gather(run(b, sid, "took over"), running.rest())
        assert reason(tail) == CANCELLED
        assert reason(second_turn) == STOP
        stored = await history(a, sid)
        assert [message_text(m) for m in stored][-4:] == [
            "/hang again",
            "again",
            "took over",
            "took over",
        ]


def _sync_turns(target: str, sid: str) -> tuple[list[str], list[str], str]:
    with SessionsClient(target) as client:
        events = list(client.execute(session_id=sid, text="sync hello"))
        connection = client.connect(session_id=sid)
        connection.send_execute(text="/hang over the socket")
        frames = []
        for frame in connection:
            frames.append(frame)
            if frame.HasField("turn_event") and text_of([frame.turn_event]) == "socket":
                connection.send_stop()
            if frame.HasField("turn_event") and frame.turn_event.HasField("turn_finished"):
                connection.done_writing()
        stopped = client.stop_turn(session_id=sid)
        turn_events = [f.turn_event for f in frames if f.HasField("turn_event")]
        return kinds(events), kinds(turn_events), str(stopped.stopped)


async def test_sync_client_execute_and_connect(client: AsyncSessionsClient, target: str, unique: str) -> None:
    sid = await new_session(client, unique)
    executed, connected, stopped = await asyncio.to_thread(_sync_turns, target, sid)
    assert executed[0] == "turn_started" and executed[-1] == "turn_finished"
    assert connected[-2:] == ["message_completed", "turn_finished"]
    assert stopped == "False"
    stored = await history(client, sid)
    assert [(message_text(m), m.status) for m in stored][-2:] == [
        ("/hang over the socket", COMPLETE),
        ("over the socket", INTERRUPTED),
    ]


def _sync_frames_after_the_stream_stopped(target: str, sid: str) -> list[str]:
    """The reasons a sync Connection's sends raise after done_writing(), the stream's end and cancel()."""
    reasons = []
    with SessionsClient(target) as client:
        connection = client.connect(session_id=sid)
        connection.send_heartbeat()
        connection.done_writing()
        sends: list[Callable[[], None]] = [
            connection.send_heartbeat,
            connection.send_stop,
            lambda: connection.send_execute(text="late"),
        ]
        for send in sends:
            with pytest.raises(errors.FailedPrecondition) as half_closed:
                send()
            reasons.append(half_closed.value.reason)
        assert [f.session.session_id for f in connection if f.HasField("session")] == [sid]
        with pytest.raises(errors.FailedPrecondition) as ended:
            connection.send_heartbeat()
        reasons.append(ended.value.reason)

        cancelled = client.connect(session_id=sid)
        cancelled.send_heartbeat()
        next(cancelled)
        cancelled.cancel()
        with pytest.raises(errors.FailedPrecondition) as after_cancel:
            cancelled.send_heartbeat()
        reasons.append(after_cancel.value.reason)
    return reasons


async def test_sync_connect_frames_after_the_stream_stopped_taking_them_raise_stream_closed(
    client: AsyncSessionsClient, target: str, unique: str
) -> None:
    """As with the async Connection. Before, the sync one dropped such a frame without a word."""
    sid = await new_session(client, unique)
    reasons = await asyncio.to_thread(_sync_frames_after_the_stream_stopped, target, sid)
    assert reasons == [errors.STREAM_CLOSED] * 5


async def test_deleting_a_session_takes_its_turns_along(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    await run(client, sid, "one", request_id="r1")
    await run(client, sid, "/tool t")
    await client.delete_session(session_id=sid, force=True)
    # The id can be used again, with nothing of the old session's turns.
    await client.create_session(agent_id="echo", session_id=sid)
    events = await run(client, sid, "one", request_id="r1")
    assert events[0].turn_started.user_message.sequence == 1
    assert len(await history(client, sid)) == 2


# --- turns and what happens around them -------------------------------------------------------------------


async def test_an_execute_cancelled_while_taking_the_lease_leaves_no_lease(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """Two execute frames back to back: the second cancels the first's Execute while it takes the lease.
    The lease commits all the same; the turn it started gets the frame's on_disconnect (cancel), so the
    second turn runs at once. A lease left behind would hold it for the whole lease (two minutes here)."""
    server = await start_server(make_settings(database, turn_lease_seconds=120.0), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{server.port}") as client:
            sid = await new_session(client, unique)
            conn = client.connect(session_id=sid)
            reader = Reader(conn)
            await conn.send_execute(text="first")
            await conn.send_execute(text="second")
            second = ""

            def second_finished(frame: Any) -> bool:
                nonlocal second
                if not frame.HasField("turn_event"):
                    return False
                event = frame.turn_event
                if (
                    event.HasField("turn_started")
                    and message_text(event.turn_started.user_message) == "second"
                ):
                    second = event.turn_id
                return bool(event.HasField("turn_finished") and event.turn_id == second)

            finished = await asyncio.wait_for(reader.until(second_finished), 60)
            assert reason([finished[-1].turn_event]) == STOP
            await conn.done_writing()
            await reader.rest()

            assert await TurnStore(server.service.store).running(sid) is None
            assert reason(await run(client, sid, "free", multitask_strategy="reject")) == STOP
            stored = [message_text(m) for m in await history(client, sid)]
            assert stored[-4:] == ["second", "second", "free", "free"]
            # The first frame's turn never took the lease, or ran (cut short or not), or was cancelled at
            # once (its input stored, nothing else).
            assert stored[:-4] in ([], ["first"], ["first", "first"])
    finally:
        await server.stop(0)


async def test_renewal_keeps_only_the_leases_of_turns_running_here(
    client: AsyncSessionsClient, server: RunningServer, unique: str
) -> None:
    """A lease row of this process that no turn runs (what a lost start would leave) is not renewed
    with the others: it runs out like a crashed owner's."""
    assert server.turns is not None
    orphan_sid = await new_session(client, unique, "orphan")
    store = TurnStore(server.service.store)
    wall = datetime.now(UTC)
    orphan = await store.acquire(
        TurnRequest(session_id=orphan_sid, kind=TurnKind.TRIGGER),
        turn_id=f"orphan-{unique}",
        owner=server.turns.owner,
        lease_now=wall,
        lease_until=wall + timedelta(seconds=5),
        now=datetime.now(UTC),
    )
    assert isinstance(orphan, Acquired)
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang running here"))
    await reader.until_kind("text_delta")
    await server.turns.renew_leases()
    running = await store.running(sid)
    assert running is not None and running.lease_expire_time > wall + timedelta(seconds=10)
    left = await store.running(orphan_sid)
    assert left is not None and left.lease_expire_time == orphan.turn.lease_expire_time
    await client.stop_turn(session_id=sid)
    assert reason(await reader.rest()) == CANCELLED


async def test_ending_a_session_stops_its_turn(client: AsyncSessionsClient, unique: str) -> None:
    """An ended session takes no more output: its running turn is stopped at once (the agent need not run
    to its end for an answer that would be refused) and ends with SESSION_ENDED."""
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang never finished", on_disconnect="continue"))
    await reader.until(lambda e: text_of([e]) == "finished")
    await client.end_session(session_id=sid)
    tail = await reader.rest()
    assert only(tail, "error").reason == "SESSION_ENDED"
    assert reason(tail) == ERROR
    assert [m.role for m in await history(client, sid)] == [Role.ROLE_USER]
    assert (await client.get_session(session_id=sid)).status == SessionStatus.SESSION_STATUS_ENDED


async def test_an_end_whose_caller_went_away_still_publishes_and_stops_the_turn(
    client: AsyncSessionsClient, server: RunningServer, unique: str
) -> None:
    """A write commits even when its caller is cancelled meanwhile (a deadline, a disconnect): what must
    follow the commit (its events to watchers, stopping the session's turn) follows it all the same."""
    svc = server.service
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang long answer", on_disconnect="continue"))
    await reader.until(lambda e: text_of([e]) == "answer")
    with svc.bus.subscribe(sid) as watched:
        ending = asyncio.ensure_future(svc.end_session(session_id=sid))
        await asyncio.sleep(0)  # the write is on its way
        ending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ending
        tail = await reader.rest()  # the turn was stopped
        assert only(tail, "error").reason == "SESSION_ENDED"
        kinds_seen = []
        while (event := watched.get_nowait()) is not None:
            kinds_seen.append(event.WhichOneof("kind"))
    assert "ended" in kinds_seen
    assert (await client.get_session(session_id=sid)).status == SessionStatus.SESSION_STATUS_ENDED


async def test_deleting_a_session_stops_its_turn_which_writes_nothing_into_a_new_one(
    client: AsyncSessionsClient, unique: str
) -> None:
    """A turn that outlives DeleteSession (on_disconnect=continue) is stopped; a session created again
    under the id gets nothing of it: no message, no event, no stop."""
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang old answer", on_disconnect="continue"))
    await reader.until(lambda e: text_of([e]) == "answer")
    await client.delete_session(session_id=sid, force=True)
    await client.create_session(agent_id="echo", session_id=sid)
    tail = await reader.rest()
    assert only(tail, "error").reason == "SESSION_NOT_FOUND"
    assert "message_completed" not in kinds(tail)
    assert reason(tail) == ERROR

    stopped = await client.stop_turn(session_id=sid)
    assert (stopped.stopped, stopped.turn_id) == (False, "")
    session = await client.get_session(session_id=sid)
    assert (session.message_count, session.last_sequence, session.last_event_id) == (0, 0, 0)
    assert await history(client, sid) == []
    events = await run(client, sid, "fresh", multitask_strategy="reject")
    assert events[0].turn_started.user_message.sequence == 1
    assert [message_text(m) for m in await history(client, sid)] == ["fresh", "fresh"]


async def test_clear_stops_the_running_turn_and_restore_gets_none_of_it(
    client: AsyncSessionsClient, unique: str
) -> None:
    """ClearSession ends the running turn's lease in its own transaction and stops it: the turn stores
    nothing more, so the restored history is exactly what the caller restored. The turn's caller gets
    TurnError SESSION_CLEARED and TurnFinished(ERROR); a retry of its request id replays that."""
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang old answer", request_id="req-old"))
    head = await reader.until(lambda e: text_of([e]) == "answer")
    await client.clear_session(session_id=sid)
    tail = await reader.rest()
    error = only(tail, "error")
    assert (error.reason, error.retryable) == ("SESSION_CLEARED", False)
    assert "message_completed" not in kinds(tail)
    assert reason(tail) == ERROR

    restored = await client.restore_session(
        session_id=sid,
        messages=[
            {"role": "ROLE_USER", "parts": [{"text": {"text": "A"}}]},
            {"role": "ROLE_ASSISTANT", "parts": [{"text": {"text": "B"}}]},
        ],
    )
    assert restored.restored
    assert [message_text(m) for m in await history(client, sid)] == ["A", "B"]
    # The lease is free: the next turn starts at once, even under reject.
    assert reason(await run(client, sid, "next", multitask_strategy="reject")) == STOP
    assert [message_text(m) for m in await history(client, sid)] == ["A", "B", "next", "next"]

    replay = await run(client, sid, "/hang old answer", request_id="req-old")
    assert {e.turn_id for e in replay} == {head[0].turn_id}
    assert only(replay, "error").reason == "SESSION_CLEARED"
    assert reason(replay) == ERROR


async def test_restore_stops_a_turn_left_from_the_sessions_old_life(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    sid = f"{unique}/s"
    await client.create_session(agent_id="echo", session_id=sid, timeout_policy={"autoRenew": False})
    reader = Reader(client.execute(session_id=sid, text="/hang from the old life"))
    await reader.until(lambda e: text_of([e]) == "life")
    clock.advance(minutes=31)  # expired under the running turn
    restored = await client.restore_session(
        session_id=sid, messages=[{"role": "ROLE_USER", "parts": [{"text": {"text": "A"}}]}]
    )
    assert restored.restored
    tail = await reader.rest()
    assert only(tail, "error").reason == "SESSION_RESTORED"
    assert reason(tail) == ERROR
    assert [message_text(m) for m in await history(client, sid)] == ["A"]


async def test_a_session_change_on_another_replica_stops_the_turn(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """A delete (or a clear) through one replica stops the turn another replica runs, which writes
    nothing: at once where the bus carries the notice (PostgreSQL), else at its next lease renewal, its
    writes being tied to its lease and to the session row it started in."""
    settings = make_settings(database, turn_lease_seconds=1.0)
    async with replica_clients(settings, clock) as (a, b):
        sid = await new_session(a, unique)
        running = Reader(a.execute(session_id=sid, text="/hang on replica one", on_disconnect="continue"))
        await running.until(lambda e: text_of([e]) == "one")
        await b.delete_session(session_id=sid, force=True)
        await b.create_session(agent_id="echo", session_id=sid)
        tail = await running.rest()
        # The notice names the cause; without it the turn learns only that its lease is gone.
        expected = "SESSION_NOT_FOUND" if database.backend == "postgresql" else "TURN_LOST"
        assert only(tail, "error").reason == expected
        assert reason(tail) == ERROR
        assert await history(b, sid) == []
        assert (await a.stop_turn(session_id=sid)).stopped is False

        running = Reader(a.execute(session_id=sid, text="/hang again"))
        await running.until(lambda e: text_of([e]) == "again")
        await b.clear_session(session_id=sid)
        tail = await running.rest()
        expected = "SESSION_CLEARED" if database.backend == "postgresql" else "TURN_LOST"
        assert only(tail, "error").reason == expected
        assert reason(tail) == ERROR
        await b.restore_session(session_id=sid, messages=[])
        assert await history(b, sid) == []


async def test_a_request_that_cannot_start_leaves_the_running_turn_alone(
    client: AsyncSessionsClient, unique: str
) -> None:
    """A continue that is refused (no such turn, a turn not paused) is refused before its multitask
    strategy applies: the running turn is neither stopped nor rolled back, nor waited for."""
    sid = await new_session(client, unique)
    paused = await run(client, sid, "/tool lookup")
    calls = only(paused, "client_tool_request").calls
    results = [{"call_id": c.call_id, "output": "x"} for c in calls]
    reader = Reader(client.execute(session_id=sid, text="/hang still running"))
    head = await reader.until(lambda e: text_of([e]) == "running")

    for strategy in ("interrupt", "rollback", "enqueue"):
        with pytest.raises(errors.NotFound) as missing:
            [
                e
                async for e in client.execute(
                    session_id=sid,
                    continue_turn={"turn_id": "no-such-turn", "tool_results": results},
                    multitask_strategy=strategy,
                )
            ]
        assert missing.value.reason == "TURN_NOT_FOUND"
        # The running turn left the pause behind: continuing it is refused the same way.
        with pytest.raises(errors.FailedPrecondition) as superseded:
            [
                e
                async for e in client.execute(
                    session_id=sid,
                    continue_turn={"turn_id": paused[0].turn_id, "tool_results": results},
                    multitask_strategy=strategy,
                )
            ]
        assert superseded.value.reason == "TURN_NOT_PAUSED"

    stopped = await client.stop_turn(session_id=sid)
    assert (stopped.stopped, stopped.turn_id) == (True, head[0].turn_id)
    tail = await reader.rest()
    assert reason(tail) == CANCELLED
    assert message_text(only(tail, "message_completed").message) == "still running"
    assert [message_text(m) for m in await history(client, sid)][-2:] == [
        "/hang still running",
        "still running",
    ]


async def test_a_running_turn_is_activity(
    client: AsyncSessionsClient, server: RunningServer, clock: ManualClock, unique: str
) -> None:
    """A turn renews its session while it runs (auto-renew on), as heartbeats would: its lease renewal
    records it as activity, so a turn longer than the session's timeout keeps its session and answer."""
    assert server.turns is not None
    sid = await new_session(client, unique)
    reader = Reader(client.execute(session_id=sid, text="/hang a long answer"))
    await reader.until(lambda e: text_of([e]) == "answer")
    before = await client.get_session(session_id=sid)
    for _ in range(3):  # 60 minutes in all, twice the session's timeout
        clock.advance(minutes=20)
        await server.turns.renew_leases()
    session = await client.get_session(session_id=sid)
    assert session.status == SessionStatus.SESSION_STATUS_ACTIVE
    assert session.last_activity_time.ToDatetime(UTC) == clock.now()
    assert session.expire_time.ToDatetime(UTC) == clock.now() + timedelta(minutes=30)
    assert session.renewal_count == before.renewal_count + 3
    await server.turns.renew_leases()  # not due again at the same time: nothing changes
    assert (await client.get_session(session_id=sid)).etag == session.etag

    await client.stop_turn(session_id=sid)
    tail = await reader.rest()
    assert reason(tail) == CANCELLED
    assert only(tail, "message_completed").message.status == INTERRUPTED


async def test_a_turn_keeps_its_answer_when_its_session_expires_under_it(
    client: AsyncSessionsClient, server: RunningServer, clock: ManualClock, unique: str
) -> None:
    """Without auto-renew a turn does not extend its session, which may expire while the turn runs. The
    answer of a turn that started in an active session is stored all the same, and the session stays
    expired (a write of the turn's own does not bring it back)."""
    assert server.turns is not None
    sid = f"{unique}/s"
    await client.create_session(agent_id="echo", session_id=sid, timeout_policy={"autoRenew": False})
    reader = Reader(client.execute(session_id=sid, text="/hang kept anyway"))
    await reader.until(lambda e: text_of([e]) == "anyway")
    clock.advance(minutes=31)
    await server.turns.renew_leases()
    await client.stop_turn(session_id=sid)
    tail = await reader.rest()
    assert reason(tail) == CANCELLED
    answer = only(tail, "message_completed").message
    assert (message_text(answer), answer.status) == ("kept anyway", INTERRUPTED)
    session = await client.get_session(session_id=sid)
    assert session.status == SessionStatus.SESSION_STATUS_EXPIRED
    assert session.message_count == 2
    with pytest.raises(errors.FailedPrecondition) as expired:
        await client.append_text(session_id=sid, role="user", text="too late")
    assert expired.value.reason == "SESSION_EXPIRED"
