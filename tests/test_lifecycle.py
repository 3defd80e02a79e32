"""The session lifecycle through the published client: create, read, update, end, delete, clear, restore,
and what an expired or ended session still allows.

Timeout arithmetic (defaults, edges, renewal, the hard cap, precedence, ranges) is in test_timeouts.py.
Time only moves when a test moves the injected clock.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from assertions import raises, ts
from google.protobuf import json_format

from agentsessions import (
    AsyncSessionsClient,
    Message,
    Part,
    PolicySource,
    Role,
    Session,
    SessionStatus,
    TextPart,
    errors,
)
from sessiond.domain.clock import ManualClock
from sessiond.domain.validation import uuid7

ACTIVE = SessionStatus.SESSION_STATUS_ACTIVE
EXPIRED = SessionStatus.SESSION_STATUS_EXPIRED
ENDED = SessionStatus.SESSION_STATUS_ENDED
DEFAULT_TIMEOUT = timedelta(minutes=30)


def text_message(text: str, *, role: Role = Role.ROLE_USER, message_id: str = "") -> Message:
    return Message(message_id=message_id, role=role, parts=[Part(text=TextPart(text=text))])


async def texts(client: AsyncSessionsClient, session_id: str) -> list[str]:
    pager = await client.list_messages(session_id=session_id)
    return [m.parts[0].text.text async for m in pager]


async def expire(client: AsyncSessionsClient, clock: ManualClock, session_id: str) -> Session:
    """Moves the clock to the session's expire time and returns the (now expired) session."""
    session = await client.get_session(session_id=session_id)
    clock.set(ts(session.expire_time))
    return await client.get_session(session_id=session_id)


# --- create -------------------------------------------------------------------------------------------------


async def test_create_returns_a_fresh_active_session(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    now = clock.now()
    session = await client.create_session(agent_id="echo", session_id=f"{unique}/fresh", user_id="u-1")

    assert session.session_id == f"{unique}/fresh"
    assert session.agent_id == "echo"
    assert session.user_id == "u-1"
    assert session.status == ACTIVE
    assert not session.near_expiration
    assert ts(session.create_time) == ts(session.update_time) == ts(session.last_activity_time) == now
    assert ts(session.expire_time) == now + DEFAULT_TIMEOUT
    assert session.time_remaining.ToTimedelta() == DEFAULT_TIMEOUT
    assert not session.HasField("end_time")
    assert (session.renewal_count, session.message_count, session.last_sequence) == (0, 0, 0)
    assert session.etag
    assert await client.get_session(session_id=session.session_id) == session


async def test_generated_ids_are_time_ordered_uuid7(client: AsyncSessionsClient) -> None:
    ids = [(await client.create_session(agent_id="echo")).session_id for _ in range(5)]

    for session_id in ids:
        parsed = uuid.UUID(session_id)
        assert str(parsed) == session_id  # canonical lower-case form
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert (await client.get_session(session_id=session_id)).session_id == session_id
    assert len(set(ids)) == len(ids)
    # The first 48 bits are the Unix time in milliseconds: later sessions never sort before earlier ones.
    millis = [uuid.UUID(i).int >> 80 for i in ids]
    assert millis == sorted(millis)


def test_generated_ids_draw_fresh_random_bits_after_a_fork() -> None:
    """Ids draw their random bits from a pool of `os.urandom` bytes: a forked child must not hand out
    the bytes its parent would hand out next, or both would generate the same ids."""
    uuid7()  # the pool holds a page
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id's random bits, then out at once
        os.write(write, uuid.UUID(uuid7()).int.to_bytes(16, "big"))
        os._exit(0)
    os.close(write)
    got = os.read(read, 16)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and len(got) == 16  # the child made its id
    child = int.from_bytes(got, "big")
    parent = uuid.UUID(uuid7()).int
    random_part = (1 << 74) - 1 & ~(0b11 << 62)  # below the 48 time bits, less version and variant
    assert child & random_part != parent & random_part
    ids = {uuid7() for _ in range(2000)}  # several pages
    assert len(ids) == 2000


@pytest.mark.parametrize(
    "suffix",
    [
        "org-1/team-2/user-3",
        "user-42/conv-7",
        "a",
        "user@example.com/conv:2024.01_x",
        "/".join(f"level{i}" for i in range(10)),
    ],
)
async def test_caller_chosen_hierarchical_ids(client: AsyncSessionsClient, unique: str, suffix: str) -> None:
    session_id = f"{unique}/{suffix}"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    assert created.session_id == session_id
    assert (await client.get_session(session_id=session_id)).session_id == session_id


@pytest.mark.parametrize(
    "bad_id",
    ["org-1//user", "/org-1", "org-1/", "-leading-dash", "has space", "tab\there", "x" * 257, "ünïcode"],
)
async def test_malformed_session_ids_are_rejected(client: AsyncSessionsClient, bad_id: str) -> None:
    with raises(errors.InvalidArgument, "INVALID_ARGUMENT", field="session_id") as info:
        await client.create_session(agent_id="echo", session_id=bad_id)
    assert [f for f, _ in info.value.field_violations] == ["session_id"]


async def test_duplicate_session_id_is_already_exists(client: AsyncSessionsClient, unique: str) -> None:
    session_id = f"{unique}/dup"
    first = await client.create_session(agent_id="echo", session_id=session_id, user_id="first")

    # The client gives each call a fresh request_id, so this is a second, distinct create.
    with raises(errors.AlreadyExists, "SESSION_ALREADY_EXISTS", session_id=session_id):
        await client.create_session(agent_id="echo", session_id=session_id, user_id="second")

    assert await client.get_session(session_id=session_id) == first


async def test_concurrent_creates_answer_as_if_made_one_after_another(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Creates in flight together (on SQLite and PostgreSQL written in one group): one id taken once,
    one request id creating once, a missing agent failing alone, labels and shared state as for a
    create on its own."""
    await client.create_session(agent_id="echo", user_id=f"u-{unique}", variables={"user:seen": True})
    calls: list[Awaitable[Any]] = []
    calls += [client.create_session(agent_id="echo", session_id=f"{unique}/same") for _ in range(5)]
    calls += [
        client.create_session(agent_id="echo", session_id=f"{unique}/r{k}", request_id=f"req-{unique}")
        for k in range(5)
    ]
    calls += [client.create_session(agent_id=f"missing-{unique}") for _ in range(3)]
    calls += [
        client.create_session(
            agent_id="echo", user_id=f"u-{unique}", metadata={"batch": unique, "k": str(k)}, request_id=""
        )
        for k in range(10)
    ]
    calls += [client.create_session(agent_id="echo", user_id=f"u-{unique}", variables={"user:n": 1})]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    same, requested, missing, labelled, sharing = (
        outcomes[:5],
        outcomes[5:10],
        outcomes[10:13],
        outcomes[13:23],
        outcomes[23],
    )
    made = [o for o in same if not isinstance(o, BaseException)]
    assert len(made) == 1 and made[0].session_id == f"{unique}/same"
    for o in same:
        if isinstance(o, BaseException):
            assert isinstance(o, errors.AlreadyExists) and o.reason == "SESSION_ALREADY_EXISTS", o
    assert all(not isinstance(o, BaseException) for o in requested), requested
    assert len({o.session_id for o in requested}) == 1  # type: ignore[union-attr]
    assert len({o.create_time.ToMicroseconds() for o in requested}) == 1  # type: ignore[union-attr]
    for o in missing:
        assert isinstance(o, errors.NotFound) and o.reason == "AGENT_NOT_FOUND", o
    assert not isinstance(sharing, BaseException)
    assert json_format.MessageToDict(sharing.variables)["user:n"] == 1
    for o in labelled:
        assert not isinstance(o, BaseException), o
        # Every one of them comes back merged with its user's shared state.
        assert json_format.MessageToDict(o.variables).get("user:seen") is True, o
    listed = [s async for s in await client.list_sessions(metadata={"batch": unique})]
    assert sorted(s.metadata["k"] for s in listed) == sorted(str(k) for k in range(10))
    assert {s.session_id for s in listed} == {o.session_id for o in labelled}  # type: ignore[union-attr]


async def test_same_request_id_returns_the_first_session(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    request_id = f"req-{unique}"
    first = await client.create_session(
        agent_id="echo", session_id=f"{unique}/first", user_id="u", request_id=request_id
    )
    clock.advance(minutes=1)

    again = await client.create_session(
        agent_id="echo", session_id=f"{unique}/first", user_id="u", request_id=request_id
    )
    # A retry that names another session id still gets the session the first attempt created.
    other = await client.create_session(
        agent_id="echo", session_id=f"{unique}/second", user_id="other", request_id=request_id
    )

    for replay in (again, other):
        assert replay.session_id == first.session_id
        assert replay.create_time == first.create_time
        assert replay.etag == first.etag
        assert replay.user_id == "u"
    with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=f"{unique}/second"):
        await client.get_session(session_id=f"{unique}/second")


async def test_same_request_id_with_generated_ids_creates_one_session(
    client: AsyncSessionsClient, unique: str
) -> None:
    first = await client.create_session(agent_id="echo", request_id=f"req-{unique}")
    second = await client.create_session(agent_id="echo", request_id=f"req-{unique}")
    assert second.session_id == first.session_id

    distinct = await client.create_session(agent_id="echo", request_id=f"req-{unique}-b")
    assert distinct.session_id != first.session_id


async def test_unknown_agent_is_not_found(client: AsyncSessionsClient, unique: str) -> None:
    with raises(errors.NotFound, "AGENT_NOT_FOUND", agent_id=f"no-such-{unique}"):
        await client.create_session(agent_id=f"no-such-{unique}", session_id=f"{unique}/orphan")
    with raises(errors.NotFound, "SESSION_NOT_FOUND"):
        await client.get_session(session_id=f"{unique}/orphan")


async def test_missing_agent_id_is_invalid(client: AsyncSessionsClient) -> None:
    with raises(errors.InvalidArgument, "INVALID_ARGUMENT", field="session.agent_id"):
        await client.create_session(agent_id="")


async def test_metadata_variables_and_policy_round_trip(client: AsyncSessionsClient, unique: str) -> None:
    metadata = {"tenant": "org-1", "channel": "web", "trace.id": "abc:123", "empty": ""}
    variables: dict[str, Any] = {
        "name": "Ada",
        "count": 3,
        "ratio": 0.25,
        "flag": True,
        "nothing": None,
        "tags": ["a", "b", 1],
        "nested": {"deep": {"deeper": [{"k": "v"}]}},
        "unicode": "héllo ✓",
    }
    created = await client.create_session(
        agent_id="echo",
        session_id=f"{unique}/rt",
        metadata=metadata,
        variables=variables,
        timeout_policy={"timeoutMinutes": 60, "autoRenew": False},
    )
    got = await client.get_session(session_id=f"{unique}/rt")

    for session in (created, got):
        assert dict(session.metadata) == metadata
        assert json_format.MessageToDict(session.variables) == variables
        # The session tier reads back exactly as set: unset fields stay unset.
        assert session.timeout_policy.timeout_minutes == 60
        assert session.timeout_policy.HasField("auto_renew") and not session.timeout_policy.auto_renew
        assert not session.timeout_policy.HasField("max_duration_minutes")
        assert not session.timeout_policy.HasField("warning_threshold_minutes")


async def test_get_missing_session_is_not_found(client: AsyncSessionsClient, unique: str) -> None:
    with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=f"{unique}/nope"):
        await client.get_session(session_id=f"{unique}/nope")


# --- expired and ended sessions: readable, not writable -----------------------------------------------------

Write = Callable[[AsyncSessionsClient, str], Awaitable[object]]

WRITES: dict[str, Write] = {
    "append": lambda c, sid: c.append_text(session_id=sid, role="user", text="late"),
    "heartbeat": lambda c, sid: c.heartbeat(session_id=sid),
    "renew": lambda c, sid: c.renew_session(session_id=sid),
    "update_metadata": lambda c, sid: c.update_session(session_id=sid, metadata={"k": "v"}),
    "update_variables": lambda c, sid: c.update_session(session_id=sid, variables={"k": 1}),
    "update_policy": lambda c, sid: c.update_session(session_id=sid, timeout_policy={"timeoutMinutes": 60}),
    "delete_messages": lambda c, sid: c.delete_messages(session_id=sid, after_sequence=0),
}


async def _make_expired(client: AsyncSessionsClient, clock: ManualClock, session_id: str) -> None:
    await expire(client, clock, session_id)


async def _make_ended(client: AsyncSessionsClient, clock: ManualClock, session_id: str) -> None:
    await client.end_session(session_id=session_id)


async def _make_ended_then_past_expiry(
    client: AsyncSessionsClient, clock: ManualClock, session_id: str
) -> None:
    await client.end_session(session_id=session_id)
    clock.advance(hours=2)


async def _make_cleared(client: AsyncSessionsClient, clock: ManualClock, session_id: str) -> None:
    await client.clear_session(session_id=session_id)


STATES = {
    "expired": (_make_expired, EXPIRED, "SESSION_EXPIRED"),
    "cleared": (_make_cleared, EXPIRED, "SESSION_EXPIRED"),
    "ended": (_make_ended, ENDED, "SESSION_ENDED"),
    "ended_then_past_expiry": (_make_ended_then_past_expiry, ENDED, "SESSION_ENDED"),
}


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("write", list(WRITES))
async def test_writes_to_a_closed_session_fail(
    client: AsyncSessionsClient, clock: ManualClock, unique: str, state: str, write: str
) -> None:
    make, _, reason = STATES[state]
    session_id = f"{unique}/closed"
    await client.create_session(agent_id="echo", session_id=session_id, metadata={"keep": "me"})
    await client.append_text(session_id=session_id, role="user", text="hello")
    await make(client, clock, session_id)
    before = await client.get_session(session_id=session_id)

    with raises(errors.FailedPrecondition, reason, session_id=session_id):
        await WRITES[write](client, session_id)

    after = await client.get_session(session_id=session_id)
    assert after.etag == before.etag
    assert after.expire_time == before.expire_time
    assert dict(after.metadata) == {"keep": "me"}
    assert after.message_count == before.message_count


@pytest.mark.parametrize("state", list(STATES))
async def test_closed_sessions_stay_readable(
    client: AsyncSessionsClient, clock: ManualClock, unique: str, state: str
) -> None:
    make, status, _ = STATES[state]
    session_id = f"{unique}/readable"
    await client.create_session(agent_id="echo", session_id=session_id, metadata={"suite": unique})
    await client.append_text(session_id=session_id, role="user", text="hello")
    await make(client, clock, session_id)

    # Status is data, not an error, and reads keep working: GetSession, ListSessions, ListMessages.
    for _ in range(2):
        session = await client.get_session(session_id=session_id)
        assert session.status == status
        assert not session.near_expiration
        assert session.time_remaining.ToTimedelta() == timedelta(0)
    listed = [s async for s in await client.list_sessions(metadata={"suite": unique})]
    assert [(s.session_id, s.status) for s in listed] == [(session_id, status)]
    assert [s.session_id async for s in await client.list_sessions(metadata={"suite": unique}, status=status)]
    assert not [s async for s in await client.list_sessions(metadata={"suite": unique}, status="active")]
    expected = [] if state == "cleared" else ["hello"]
    assert await texts(client, session_id) == expected


async def test_expired_error_says_when(client: AsyncSessionsClient, clock: ManualClock, unique: str) -> None:
    session_id = f"{unique}/when"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    clock.advance(hours=1)
    with raises(errors.FailedPrecondition, "SESSION_EXPIRED", session_id=session_id) as info:
        await client.heartbeat(session_id=session_id)
    assert datetime.fromisoformat(info.value.metadata["expire_time"]) == ts(created.expire_time)


# --- EndSession ---------------------------------------------------------------------------------------------


async def test_end_session_is_idempotent(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/end"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    clock.advance(minutes=3)
    ended_at = clock.now()

    ended = await client.end_session(session_id=session_id)
    assert ended.status == ENDED
    assert ts(ended.end_time) == ended_at
    assert ended.etag != created.etag
    assert ended.time_remaining.ToTimedelta() == timedelta(0)

    clock.advance(minutes=3)
    again = await client.end_session(session_id=session_id)
    assert again.status == ENDED
    assert ts(again.end_time) == ended_at
    assert again.etag == ended.etag


async def test_end_an_expired_session(client: AsyncSessionsClient, clock: ManualClock, unique: str) -> None:
    session_id = f"{unique}/end-expired"
    await client.create_session(agent_id="echo", session_id=session_id)
    await expire(client, clock, session_id)
    ended = await client.end_session(session_id=session_id)
    assert ended.status == ENDED
    assert ts(ended.end_time) == clock.now()


async def test_end_missing_session_is_not_found(client: AsyncSessionsClient, unique: str) -> None:
    with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=f"{unique}/ghost"):
        await client.end_session(session_id=f"{unique}/ghost")


# --- DeleteSession ------------------------------------------------------------------------------------------


async def test_delete_active_session_needs_force(client: AsyncSessionsClient, unique: str) -> None:
    session_id = f"{unique}/del-active"
    await client.create_session(agent_id="echo", session_id=session_id)

    with raises(errors.FailedPrecondition, "SESSION_ACTIVE", session_id=session_id):
        await client.delete_session(session_id=session_id)
    assert (await client.get_session(session_id=session_id)).status == ACTIVE

    await client.delete_session(session_id=session_id, force=True)
    with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=session_id):
        await client.get_session(session_id=session_id)


@pytest.mark.parametrize("state", ["expired", "ended"])
async def test_delete_closed_session_without_force(
    client: AsyncSessionsClient, clock: ManualClock, unique: str, state: str
) -> None:
    session_id = f"{unique}/del-closed"
    await client.create_session(agent_id="echo", session_id=session_id)
    await STATES[state][0](client, clock, session_id)

    await client.delete_session(session_id=session_id)
    with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=session_id):
        await client.get_session(session_id=session_id)


async def test_deleted_session_is_gone_with_its_history(client: AsyncSessionsClient, unique: str) -> None:
    session_id = f"{unique}/del-history"
    await client.create_session(agent_id="echo", session_id=session_id)
    await client.append_text(session_id=session_id, role="user", text="secret")
    await client.delete_session(session_id=session_id, force=True)

    for read in (
        lambda: client.get_session(session_id=session_id),
        lambda: client.list_messages(session_id=session_id),
        lambda: client.end_session(session_id=session_id),
        lambda: client.heartbeat(session_id=session_id),
    ):
        with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=session_id):
            await read()
    # The id is free again, and the new session starts with an empty history.
    reborn = await client.create_session(agent_id="echo", session_id=session_id)
    assert (reborn.message_count, reborn.last_sequence) == (0, 0)
    assert await texts(client, session_id) == []


async def test_delete_missing_session(client: AsyncSessionsClient, unique: str) -> None:
    with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=f"{unique}/ghost"):
        await client.delete_session(session_id=f"{unique}/ghost", force=True)
    await client.delete_session(session_id=f"{unique}/ghost", allow_missing=True)


async def test_delete_twice_with_allow_missing(client: AsyncSessionsClient, unique: str) -> None:
    session_id = f"{unique}/twice"
    await client.create_session(agent_id="echo", session_id=session_id)
    await client.delete_session(session_id=session_id, force=True, allow_missing=True)
    await client.delete_session(session_id=session_id, force=True, allow_missing=True)
    with raises(errors.NotFound, "SESSION_NOT_FOUND"):
        await client.get_session(session_id=session_id)


async def test_delete_checks_the_etag(client: AsyncSessionsClient, unique: str) -> None:
    session_id = f"{unique}/del-etag"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    updated = await client.update_session(session_id=session_id, metadata={"v": "2"})

    with raises(errors.Aborted, "ETAG_MISMATCH", etag=updated.etag):
        await client.delete_session(session_id=session_id, force=True, etag=created.etag)
    assert (await client.get_session(session_id=session_id)).etag == updated.etag

    await client.delete_session(session_id=session_id, force=True, etag=updated.etag)
    with raises(errors.NotFound, "SESSION_NOT_FOUND"):
        await client.get_session(session_id=session_id)


async def test_delete_and_update_on_one_etag_never_both_succeed(
    client: AsyncSessionsClient, unique: str
) -> None:
    """The delete's etag check holds against a concurrent update (PostgreSQL locks the row it checks):
    before, 13 of 60 such races acknowledged the update and then deleted the session on the stale etag."""
    for trial in range(30):
        session_id = f"{unique}/race-{trial}"
        etag = (await client.create_session(agent_id="echo", session_id=session_id)).etag
        update, delete = await asyncio.gather(
            client.update_session(session_id=session_id, metadata={"t": str(trial)}, etag=etag),
            client.delete_session(session_id=session_id, force=True, etag=etag),
            return_exceptions=True,
        )
        if isinstance(update, BaseException):  # the delete went first
            assert isinstance(update, errors.NotFound), update
            assert delete is None
        else:  # the update went first: the delete's etag is stale
            assert isinstance(delete, errors.Aborted) and delete.reason == "ETAG_MISMATCH", delete
            assert (await client.get_session(session_id=session_id)).etag == update.etag


# --- UpdateSession ------------------------------------------------------------------------------------------


async def test_update_metadata_and_variables(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/upd"
    created = await client.create_session(
        agent_id="echo", session_id=session_id, metadata={"a": "1", "b": "2"}, variables={"x": 1}
    )
    clock.advance(minutes=2)

    meta = await client.update_session(session_id=session_id, metadata={"c": "3"})
    assert dict(meta.metadata) == {"c": "3"}  # replaced whole
    assert json_format.MessageToDict(meta.variables) == {"x": 1}  # not in the mask: untouched
    assert meta.etag != created.etag
    assert ts(meta.update_time) == clock.now()
    # An update is not activity: it neither renews nor touches the activity time.
    assert meta.last_activity_time == created.last_activity_time
    assert meta.expire_time == created.expire_time
    assert meta.renewal_count == 0

    var = await client.update_session(session_id=session_id, variables={"y": {"z": [1, 2]}})
    assert json_format.MessageToDict(var.variables) == {"y": {"z": [1, 2]}}
    assert dict(var.metadata) == {"c": "3"}
    assert var.etag not in (created.etag, meta.etag)
    assert await client.get_session(session_id=session_id) == var


async def test_update_with_explicit_mask(client: AsyncSessionsClient, unique: str) -> None:
    session_id = f"{unique}/mask"
    await client.create_session(
        agent_id="echo", session_id=session_id, metadata={"a": "1"}, variables={"x": 1}
    )

    # Only masked fields change, even when the request carries others.
    only_vars = await client.update_session(
        session_id=session_id, metadata={"ignored": "yes"}, variables={"x": 2}, update_mask=["variables"]
    )
    assert dict(only_vars.metadata) == {"a": "1"}
    assert json_format.MessageToDict(only_vars.variables) == {"x": 2}

    # A masked field left empty is cleared.
    cleared = await client.update_session(session_id=session_id, update_mask=["metadata", "variables"])
    assert dict(cleared.metadata) == {}
    assert json_format.MessageToDict(cleared.variables) == {}

    # "*" replaces every updatable field: what the request leaves out is cleared.
    await client.update_session(session_id=session_id, timeout_policy={"timeoutMinutes": 60})
    full = await client.update_session(session_id=session_id, metadata={"only": "this"}, update_mask=["*"])
    assert dict(full.metadata) == {"only": "this"}
    assert json_format.MessageToDict(full.variables) == {}
    assert not full.timeout_policy.ListFields()
    assert full.effective_timeout_policy.timeout_minutes == 30


async def test_update_checks_the_etag(client: AsyncSessionsClient, unique: str) -> None:
    session_id = f"{unique}/upd-etag"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    first = await client.update_session(session_id=session_id, metadata={"n": "1"}, etag=created.etag)
    assert dict(first.metadata) == {"n": "1"}

    with raises(errors.Aborted, "ETAG_MISMATCH", etag=first.etag):
        await client.update_session(session_id=session_id, metadata={"n": "2"}, etag=created.etag)
    assert dict((await client.get_session(session_id=session_id)).metadata) == {"n": "1"}


async def test_an_etag_belongs_to_one_session(client: AsyncSessionsClient, unique: str) -> None:
    """Two sessions at the same version, and a session deleted and created again under its name (at the
    same instant of the injected clock), do not share etags: an etag read from one is refused by the other."""
    first = await client.create_session(agent_id="echo", session_id=f"{unique}/etag-a")
    other = await client.create_session(agent_id="echo", session_id=f"{unique}/etag-b")
    assert first.etag != other.etag
    with raises(errors.Aborted, "ETAG_MISMATCH", etag=other.etag):
        await client.update_session(session_id=other.session_id, metadata={"n": "1"}, etag=first.etag)

    await client.delete_session(session_id=first.session_id, force=True)
    again = await client.create_session(agent_id="echo", session_id=first.session_id)
    assert again.etag != first.etag
    with raises(errors.Aborted, "ETAG_MISMATCH", etag=again.etag):
        await client.delete_session(session_id=first.session_id, force=True, etag=first.etag)
    assert (await client.get_session(session_id=first.session_id)).etag == again.etag


async def test_an_etag_of_the_newest_session_deleted_is_refused_by_its_successor(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Found by test_model_based.py: SQLite hands a row created right after the deletion of the newest one
    the same pk, and at the same instant the create time was the same too, so the new session showed the
    deleted one's etag and took it (an update meant for the old session landed on the new one)."""
    session_id = f"{unique}/reborn"
    first = await client.create_session(agent_id="echo", session_id=session_id)
    await client.delete_session(session_id=session_id, force=True)
    again = await client.create_session(agent_id="echo", session_id=session_id)
    assert again.etag != first.etag
    with raises(errors.Aborted, "ETAG_MISMATCH", etag=again.etag):
        await client.update_session(session_id=session_id, metadata={"n": "1"}, etag=first.etag)
    assert (await client.get_session(session_id=session_id)).etag == again.etag


async def test_every_write_changes_the_etag(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/etags"
    seen = [(await client.create_session(agent_id="echo", session_id=session_id)).etag]
    clock.advance(minutes=1)
    seen.append((await client.heartbeat(session_id=session_id)).etag)
    clock.advance(minutes=1)
    seen.append(
        (await client.append_messages(session_id=session_id, messages=[text_message("hi")])).session.etag
    )
    clock.advance(minutes=1)
    seen.append((await client.renew_session(session_id=session_id)).etag)
    seen.append((await client.update_session(session_id=session_id, metadata={"k": "v"})).etag)
    seen.append((await client.end_session(session_id=session_id)).etag)
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize(
    "mask",
    [
        ["agent_id"],
        ["user_id"],
        ["status"],
        ["expire_time"],
        ["timeout_policy.nonsense"],
        ["metadata", "etag"],
    ],
)
async def test_update_unknown_or_immutable_path_is_invalid(
    client: AsyncSessionsClient, unique: str, mask: list[str]
) -> None:
    session_id = f"{unique}/bad-mask"
    created = await client.create_session(agent_id="echo", session_id=session_id, metadata={"a": "1"})
    with raises(errors.InvalidArgument, "INVALID_ARGUMENT", field="update_mask") as info:
        await client.update_session(session_id=session_id, metadata={"b": "2"}, update_mask=mask)
    assert [f for f, _ in info.value.field_violations] == ["update_mask"]
    assert await client.get_session(session_id=session_id) == created


async def test_update_missing_session_is_not_found(client: AsyncSessionsClient, unique: str) -> None:
    with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=f"{unique}/ghost"):
        await client.update_session(session_id=f"{unique}/ghost", metadata={"a": "b"})


async def test_update_policy_recomputes_expiry_from_the_last_renewal(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/policy"
    created = await client.create_session(agent_id="echo", session_id=session_id)
    start = ts(created.create_time)
    clock.advance(minutes=10)
    renewed_at = clock.now()
    await client.heartbeat(session_id=session_id)
    clock.advance(minutes=5)

    longer = await client.update_session(session_id=session_id, timeout_policy={"timeoutMinutes": 60})
    assert ts(longer.expire_time) == renewed_at + timedelta(minutes=60)
    assert longer.effective_timeout_policy.timeout_minutes == 60
    assert longer.effective_timeout_policy.timeout_minutes_source == PolicySource.POLICY_SOURCE_SESSION
    assert longer.timeout_policy.timeout_minutes == 60
    assert longer.renewal_count == 1  # a policy change is not a renewal

    # A lower cap applies from the start of the session's life.
    capped = await client.update_session(session_id=session_id, timeout_policy={"maxDurationMinutes": 40})
    assert ts(capped.max_expire_time) == start + timedelta(minutes=40)
    assert ts(capped.expire_time) == start + timedelta(minutes=40)
    assert capped.effective_timeout_policy.timeout_minutes == 60  # patched field by field

    # Clearing a masked policy field falls back to the next tier.
    reset = await client.update_session(
        session_id=session_id, timeout_policy={}, update_mask=["timeout_policy.timeout_minutes"]
    )
    assert reset.effective_timeout_policy.timeout_minutes == 30
    assert reset.effective_timeout_policy.timeout_minutes_source == PolicySource.POLICY_SOURCE_GLOBAL
    assert reset.effective_timeout_policy.max_duration_minutes == 40
    assert ts(reset.expire_time) == renewed_at + timedelta(minutes=30)

    # An empty policy resets the whole session tier.
    whole = await client.update_session(session_id=session_id, timeout_policy={})
    assert not whole.timeout_policy.ListFields()
    eff = whole.effective_timeout_policy
    assert (eff.timeout_minutes, eff.auto_renew, eff.max_duration_minutes, eff.warning_threshold_minutes) == (
        30,
        True,
        720,
        5,
    )
    assert ts(whole.max_expire_time) == start + timedelta(minutes=720)


# --- ClearSession -------------------------------------------------------------------------------------------


async def test_clear_deletes_history_and_expires(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/clear"
    await client.create_session(agent_id="echo", session_id=session_id)
    await client.append_messages(session_id=session_id, messages=[text_message("one"), text_message("two")])
    clock.advance(minutes=1)

    cleared = await client.clear_session(session_id=session_id)
    assert cleared.status == EXPIRED
    assert cleared.message_count == 0
    assert cleared.last_sequence == 2  # sequence numbers are never reused
    assert ts(cleared.expire_time) == clock.now()
    assert await texts(client, session_id) == []
    assert (await client.get_session(session_id=session_id)).status == EXPIRED

    clock.advance(minutes=1)
    again = await client.clear_session(session_id=session_id)
    assert again.status == EXPIRED
    assert again.message_count == 0
    assert again.etag == cleared.etag
    assert again.expire_time == cleared.expire_time


async def test_clear_an_expired_session(client: AsyncSessionsClient, clock: ManualClock, unique: str) -> None:
    session_id = f"{unique}/clear-expired"
    await client.create_session(agent_id="echo", session_id=session_id)
    await client.append_text(session_id=session_id, role="user", text="old")
    expired = await expire(client, clock, session_id)
    clock.advance(minutes=10)

    cleared = await client.clear_session(session_id=session_id)
    assert cleared.status == EXPIRED
    assert cleared.message_count == 0
    assert cleared.expire_time == expired.expire_time  # already in the past: stays when it was
    assert await texts(client, session_id) == []


@pytest.mark.parametrize("state", ["ended", "ended_then_past_expiry"])
async def test_clear_ended_session_fails(
    client: AsyncSessionsClient, clock: ManualClock, unique: str, state: str
) -> None:
    # ENDED is read-only, history included: clearing would destroy what the end kept (delete it instead).
    session_id = f"{unique}/clear-ended"
    await client.create_session(agent_id="echo", session_id=session_id)
    await client.append_text(session_id=session_id, role="user", text="kept")
    await STATES[state][0](client, clock, session_id)
    before = await client.get_session(session_id=session_id)

    with raises(errors.FailedPrecondition, "SESSION_ENDED", session_id=session_id):
        await client.clear_session(session_id=session_id)
    assert await client.get_session(session_id=session_id) == before
    assert await texts(client, session_id) == ["kept"]


async def test_clear_missing_session_is_not_found(client: AsyncSessionsClient, unique: str) -> None:
    with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=f"{unique}/ghost"):
        await client.clear_session(session_id=f"{unique}/ghost")


# --- RestoreSession -----------------------------------------------------------------------------------------

HISTORY = [
    text_message("restored question", message_id="m-1"),
    text_message("restored answer", role=Role.ROLE_ASSISTANT, message_id="m-2"),
    text_message("no id given"),
]


async def test_restore_active_session_changes_nothing(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/restore-active"
    await client.create_session(agent_id="echo", session_id=session_id)
    await client.append_text(session_id=session_id, role="user", text="live")
    before = await client.get_session(session_id=session_id)
    clock.advance(minutes=1)

    response = await client.restore_session(session_id=session_id, messages=HISTORY)
    assert not response.restored
    assert response.session.status == ACTIVE
    assert response.session.etag == before.etag
    assert response.session.expire_time == before.expire_time
    assert await client.get_session(session_id=session_id) == response.session
    assert await texts(client, session_id) == ["live"]


async def test_restore_cleared_session_brings_the_history_back(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/restore-cleared"
    await client.create_session(agent_id="echo", session_id=session_id)
    kept = await client.append_messages(
        session_id=session_id, messages=[text_message("restored question", message_id="m-1")]
    )
    await client.clear_session(session_id=session_id)
    clock.advance(minutes=7)
    now = clock.now()

    response = await client.restore_session(session_id=session_id, messages=HISTORY)
    session = response.session
    assert response.restored
    assert session.status == ACTIVE
    assert ts(session.expire_time) == now + DEFAULT_TIMEOUT
    assert ts(session.max_expire_time) == now + timedelta(minutes=720)
    assert ts(session.last_activity_time) == now
    assert session.message_count == len(HISTORY)

    pager = await client.list_messages(session_id=session_id)
    restored = [m async for m in pager]
    assert [m.parts[0].text.text for m in restored] == [
        "restored question",
        "restored answer",
        "no id given",
    ]
    assert [m.role for m in restored] == [Role.ROLE_USER, Role.ROLE_ASSISTANT, Role.ROLE_USER]
    assert [m.message_id for m in restored[:2]] == ["m-1", "m-2"]
    assert restored[2].message_id
    # Sequence numbers keep counting past the cleared ones.
    assert [m.sequence for m in restored] == [2, 3, 4]
    assert kept.messages[0].sequence == 1
    assert session.last_sequence == 4

    # Alive again: writes work.
    appended = await client.append_text(session_id=session_id, role="user", text="after restore")
    assert appended.sequence == 5


async def test_restore_expired_session_replaces_the_history(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/restore-expired"
    await client.create_session(agent_id="echo", session_id=session_id)
    await client.append_text(session_id=session_id, role="user", text="stale")
    await expire(client, clock, session_id)
    clock.advance(hours=3)

    response = await client.restore_session(session_id=session_id, messages=HISTORY[:2])
    assert response.restored
    assert response.session.status == ACTIVE
    assert ts(response.session.expire_time) == clock.now() + DEFAULT_TIMEOUT
    assert response.session.message_count == 2
    assert await texts(client, session_id) == ["restored question", "restored answer"]


async def test_restore_with_no_history(client: AsyncSessionsClient, clock: ManualClock, unique: str) -> None:
    session_id = f"{unique}/restore-empty"
    await client.create_session(agent_id="echo", session_id=session_id)
    await client.append_text(session_id=session_id, role="user", text="gone")
    await client.clear_session(session_id=session_id)

    response = await client.restore_session(session_id=session_id, messages=[])
    assert response.restored
    assert response.session.status == ACTIVE
    assert response.session.message_count == 0
    assert await texts(client, session_id) == []


async def test_restore_after_max_duration_starts_a_new_life(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    session_id = f"{unique}/restore-capped"
    await client.create_session(
        agent_id="echo",
        session_id=session_id,
        timeout_policy={"timeoutMinutes": 30, "maxDurationMinutes": 30},
    )
    with raises(errors.FailedPrecondition, "MAX_DURATION_REACHED", session_id=session_id):
        await client.renew_session(session_id=session_id)
    clock.advance(minutes=30)

    response = await client.restore_session(session_id=session_id, messages=HISTORY[:1])
    assert response.restored
    assert ts(response.session.max_expire_time) == clock.now() + timedelta(minutes=30)
    assert response.session.status == ACTIVE


@pytest.mark.parametrize("state", ["ended", "ended_then_past_expiry"])
async def test_restore_ended_session_fails(
    client: AsyncSessionsClient, clock: ManualClock, unique: str, state: str
) -> None:
    session_id = f"{unique}/restore-ended"
    await client.create_session(agent_id="echo", session_id=session_id)
    await client.append_text(session_id=session_id, role="user", text="kept")
    await STATES[state][0](client, clock, session_id)

    with raises(errors.FailedPrecondition, "SESSION_ENDED", session_id=session_id):
        await client.restore_session(session_id=session_id, messages=HISTORY)
    assert (await client.get_session(session_id=session_id)).status == ENDED
    assert await texts(client, session_id) == ["kept"]


async def test_restore_missing_session_is_not_found(client: AsyncSessionsClient, unique: str) -> None:
    with raises(errors.NotFound, "SESSION_NOT_FOUND", session_id=f"{unique}/ghost"):
        await client.restore_session(session_id=f"{unique}/ghost", messages=HISTORY)
