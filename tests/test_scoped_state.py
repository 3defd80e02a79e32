"""Scoped state: `user:` keys shared by a user's sessions of an agent, `app:` keys by all of an agent's
sessions, `temp:` keys never stored; read merged into each session, written by prefix (docs/design.md)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.protobuf import json_format

from agentsessions import AsyncSessionsClient, Session, errors


def _vars(session: Session) -> dict[str, Any]:
    return json_format.MessageToDict(session.variables)


@pytest.fixture
async def agent(client: AsyncSessionsClient, unique: str) -> str:
    agent_id = f"app-{unique}"
    await client.create_agent(agent={"agent_id": agent_id, "echo": {}})
    return agent_id


async def test_create_routes_keys_by_prefix_and_reads_merge_them(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    created = await client.create_session(
        agent_id=agent,
        session_id=f"{unique}/s1",
        user_id="alice",
        variables={"topic": "tea", "user:lang": "fr", "app:model": "m1", "temp:scratch": 1},
    )
    assert _vars(created) == {"topic": "tea", "user:lang": "fr", "app:model": "m1"}  # temp: is not stored
    assert _vars(await client.get_session(session_id=f"{unique}/s1")) == _vars(created)

    # Another session of alice with the agent shares both scopes; its own keys are its own.
    mine = await client.create_session(agent_id=agent, session_id=f"{unique}/s2", user_id="alice")
    assert _vars(mine) == {"user:lang": "fr", "app:model": "m1"}
    # Bob shares the agent's scope only; another agent shares nothing.
    bob = await client.create_session(agent_id=agent, session_id=f"{unique}/s3", user_id="bob")
    assert _vars(bob) == {"app:model": "m1"}
    other = await client.create_session(agent_id="echo", session_id=f"{unique}/s4", user_id="alice")
    assert _vars(other) == {}


async def test_updating_variables_replaces_own_keys_and_only_sets_shared_ones(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    a = f"{unique}/a"
    await client.create_session(
        agent_id=agent, session_id=a, user_id="u", variables={"x": 1, "y": 2, "user:k1": "a", "user:k2": "b"}
    )
    updated = await client.update_session(
        session_id=a, variables={"x": 10, "user:k1": "A", "app:mode": "fast", "temp:t": True}
    )
    # y is gone (own keys are replaced); user:k2 stays (shared keys are written key by key).
    assert _vars(updated) == {"x": 10, "user:k1": "A", "user:k2": "b", "app:mode": "fast"}
    assert _vars(await client.get_session(session_id=a)) == _vars(updated)


async def test_key_paths_set_and_remove_single_variables(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    a, b = f"{unique}/a", f"{unique}/b"
    await client.create_session(
        agent_id=agent, session_id=a, user_id="u", variables={"keep": 1, "drop": 2, "user:theme": "dark"}
    )
    await client.create_session(agent_id=agent, session_id=b, user_id="u")
    updated = await client.update_session(
        session_id=a,
        variables={"new": [1, {"n": None}], "app:limit": 5, "temp:x": 1},
        update_mask=[
            "variables.new",
            "variables.drop",  # absent from the request: removed
            "variables.`user:theme`",  # removed from alice's user scope, for every session
            "variables.`app:limit`",
            "variables.temp:x",  # never stored, quoted or not
        ],
    )
    assert _vars(updated) == {"keep": 1, "new": [1, {"n": None}], "app:limit": 5}
    assert _vars(await client.get_session(session_id=b)) == {"app:limit": 5}


async def test_a_change_of_shared_keys_alone_keeps_the_etag(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    created = await client.create_session(agent_id=agent, session_id=f"{unique}/e", user_id="u")
    updated = await client.update_session(
        session_id=created.session_id, variables={"user:seen": True}, update_mask=["variables.`user:seen`"]
    )
    assert updated.etag == created.etag
    assert _vars(updated) == {"user:seen": True}
    own = await client.update_session(
        session_id=created.session_id, variables={"mine": True}, update_mask=["variables.mine"]
    )
    assert own.etag != created.etag


async def test_list_sessions_shows_each_session_merged(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    for user in ("u1", "u2"):
        await client.create_session(
            agent_id=agent,
            session_id=f"{unique}/{user}",
            user_id=user,
            variables={"user:name": user, "n": 1},
        )
    await client.update_session(
        session_id=f"{unique}/u1", variables={"app:v": 2}, update_mask=["variables.`app:v`"]
    )
    listed = {s.session_id: _vars(s) async for s in await client.list_sessions(agent_id=agent)}
    assert listed == {
        f"{unique}/u1": {"n": 1, "user:name": "u1", "app:v": 2},
        f"{unique}/u2": {"n": 1, "user:name": "u2", "app:v": 2},
    }


async def test_bad_masks_and_oversized_scopes_are_rejected(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    sid = f"{unique}/bad"
    await client.create_session(agent_id=agent, session_id=sid, user_id="u")
    with pytest.raises(errors.InvalidArgument) as caught:
        await client.update_session(
            session_id=sid, variables={"a": 1}, update_mask=["variables", "variables.a"]
        )
    assert caught.value.field_violations[0][0] == "update_mask"
    with pytest.raises(errors.InvalidArgument):
        await client.update_session(session_id=sid, variables={}, update_mask=["variables."])
    # Each scope is a variables object of its own, under the same size limit (64 KiB by default).
    big = "x" * 40_000
    await client.update_session(session_id=sid, variables={"user:a": big}, update_mask=["variables.`user:a`"])
    with pytest.raises(errors.InvalidArgument) as caught:
        await client.update_session(
            session_id=sid, variables={"user:b": big}, update_mask=["variables.`user:b`"]
        )
    assert "user:" in caught.value.field_violations[0][0]  # session.variables (user: keys)
    assert _vars(await client.get_session(session_id=sid)) == {"user:a": big}  # nothing half-written


async def test_a_create_whose_shared_keys_break_a_limit_creates_nothing(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    """The scope's limit applies to what it holds once merged, which only the store can check: a create
    refused by it leaves no session behind, so that a retry (fixed or not) is not told ALREADY_EXISTS."""
    await client.create_session(
        agent_id=agent, session_id=f"{unique}/first", user_id="u", variables={"user:a": "x" * 40_000}
    )
    sid = f"{unique}/refused"
    for request_id in ("", f"{unique}-req"):  # with a request id too: the retry must not find a session
        with pytest.raises(errors.InvalidArgument) as caught:
            await client.create_session(
                agent_id=agent,
                session_id=sid,
                user_id="u",
                request_id=request_id,
                variables={"own": 1, "user:b": "y" * 40_000},
            )
        assert "user:" in caught.value.field_violations[0][0]
        with pytest.raises(errors.NotFound):
            await client.get_session(session_id=sid)
    listed = [s.session_id async for s in await client.list_sessions(agent_id=agent)]
    assert listed == [f"{unique}/first"]
    # The same create within the limit succeeds, with the id the refused one asked for.
    created = await client.create_session(
        agent_id=agent, session_id=sid, user_id="u", request_id=f"{unique}-req", variables={"user:b": "y"}
    )
    assert _vars(created) == {"user:a": "x" * 40_000, "user:b": "y"}


async def test_an_ended_session_cannot_write_shared_state(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    sid = f"{unique}/ended"
    await client.create_session(agent_id=agent, session_id=sid, user_id="u")
    await client.end_session(session_id=sid)
    with pytest.raises(errors.FailedPrecondition) as caught:
        await client.update_session(session_id=sid, variables={"app:x": 1}, update_mask=["variables.`app:x`"])
    assert caught.value.reason == "SESSION_ENDED"
    other = await client.create_session(agent_id=agent, session_id=f"{unique}/other", user_id="u")
    assert _vars(other) == {}


async def test_concurrent_writers_of_one_scope_lose_nothing(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    ids = [f"{unique}/c{i}" for i in range(8)]
    for sid in ids:
        await client.create_session(agent_id=agent, session_id=sid, user_id="shared-user")
    await asyncio.gather(
        *(
            client.update_session(
                session_id=sid,
                variables={f"user:k{i}": i, f"app:k{i}": i},
                update_mask=[f"variables.`user:k{i}`", f"variables.`app:k{i}`"],
            )
            for i, sid in enumerate(ids)
        )
    )
    merged = _vars(await client.get_session(session_id=ids[0]))
    assert merged == {**{f"user:k{i}": i for i in range(8)}, **{f"app:k{i}": i for i in range(8)}}


async def test_deleting_the_agent_deletes_its_shared_state(client: AsyncSessionsClient, unique: str) -> None:
    agent_id = f"gone-{unique}"
    await client.create_agent(agent={"agent_id": agent_id, "echo": {}})
    sid = f"{unique}/gone"
    await client.create_session(
        agent_id=agent_id, session_id=sid, user_id="u", variables={"app:a": 1, "user:b": 2}
    )
    await client.delete_session(session_id=sid, force=True)
    await client.delete_agent(agent_id=agent_id)
    await client.create_agent(agent={"agent_id": agent_id, "echo": {}})
    again = await client.create_session(agent_id=agent_id, session_id=sid, user_id="u")
    assert _vars(again) == {}


def _text(text: str, message_id: str) -> dict[str, Any]:
    return {"message_id": message_id, "role": "ROLE_USER", "parts": [{"text": {"text": text}}]}


async def test_an_append_sets_variables_with_its_messages_in_one_transaction(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    sid = f"{unique}/append"
    created = await client.create_session(
        agent_id=agent, session_id=sid, user_id="u", variables={"keep": 1, "topic": "old"}
    )
    sent = {"topic": "tides", "user:lang": "fr", "app:tier": "gold", "temp:scratch": True}
    reply = await client.append_messages(
        session_id=sid, messages=[_text("hello", f"{unique}-m1")], set_variables=sent
    )
    expected = {"keep": 1, "topic": "tides", "user:lang": "fr", "app:tier": "gold"}  # temp: is not stored
    # The answer shows the session's own keys, as every AppendMessages answer does; reads merge.
    assert _vars(reply.session) == {"keep": 1, "topic": "tides"}
    stored = await client.get_session(session_id=sid)
    assert _vars(stored) == expected
    assert stored.message_count == 1
    # One write: the append and the change of own variables each make an event, hence two versions.
    assert stored.etag == reply.session.etag
    assert _version(stored.etag) == _version(created.etag) + 2
    sibling = await client.create_session(agent_id=agent, session_id=f"{unique}/sibling", user_id="u")
    assert _vars(sibling) == {"user:lang": "fr", "app:tier": "gold"}

    # A retry that finds its message stored sets nothing, even with other values.
    again = await client.append_messages(
        session_id=sid,
        messages=[_text("hello", f"{unique}-m1")],
        set_variables={"topic": "other", "user:lang": "de"},
    )
    assert [m.sequence for m in again.messages] == [1]
    after_retry = await client.get_session(session_id=sid)
    assert _vars(after_retry) == expected
    assert after_retry.etag == stored.etag

    # The same values again change nothing but the append's own counters; shared keys alone keep the
    # etag, as with UpdateSession.
    await client.append_messages(
        session_id=sid, messages=[_text("more", f"{unique}-m2")], set_variables={"topic": "tides"}
    )
    assert _vars(await client.get_session(session_id=sid)) == expected
    shared_only = await client.append_messages(
        session_id=sid, messages=[_text("shared", f"{unique}-m3")], set_variables={"user:lang": "es"}
    )
    final = await client.get_session(session_id=sid)
    assert _vars(final) == {**expected, "user:lang": "es"}
    assert final.etag == shared_only.session.etag
    assert _version(final.etag) == _version(after_retry.etag) + 2  # two appends


def _version(etag: str) -> int:
    """The row version an etag carries (`v7.<digest>`); the format is the server's, tested here."""
    return int(etag[1:].split(".")[0])


async def test_a_refused_append_sets_no_variable(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    sid = f"{unique}/refused"
    await client.create_session(agent_id=agent, session_id=sid, user_id="u", variables={"a": 1})
    # Oversized: INVALID_ARGUMENT on the field, nothing stored.
    with pytest.raises(errors.InvalidArgument) as caught:
        await client.append_messages(
            session_id=sid, messages=[_text("x", f"{unique}-big")], set_variables={"b": "x" * 70_000}
        )
    assert caught.value.field_violations[0][0] == "set_variables"
    # A shared scope pushed over its limit fails the whole write: the message is not stored either.
    await client.update_session(
        session_id=sid, variables={"user:a": "y" * 40_000}, update_mask=["variables.`user:a`"]
    )
    with pytest.raises(errors.InvalidArgument):
        await client.append_messages(
            session_id=sid, messages=[_text("x", f"{unique}-over")], set_variables={"user:b": "y" * 40_000}
        )
    # An ended session refuses both.
    await client.end_session(session_id=sid)
    with pytest.raises(errors.FailedPrecondition) as ended:
        await client.append_messages(
            session_id=sid, messages=[_text("x", f"{unique}-late")], set_variables={"app:x": 1}
        )
    assert ended.value.reason == "SESSION_ENDED"
    session = await client.get_session(session_id=sid)
    assert session.message_count == 0
    assert _vars(session) == {"a": 1, "user:a": "y" * 40_000}
    with pytest.raises(errors.NotFound):
        await client.append_messages(
            session_id=f"{unique}/missing", messages=[_text("x", f"{unique}-m")], set_variables={"a": 2}
        )


async def test_concurrent_appends_with_variables_lose_nothing(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    """Appends that set variables run beside plain ones in the same groups: sequences stay gap-free, every
    variable lands, and the event log is contiguous, each change in it once."""
    sid = f"{unique}/mixed"
    await client.create_session(agent_id=agent, session_id=sid, user_id="u")

    async def append(i: int) -> None:
        await client.append_messages(
            session_id=sid,
            messages=[_text(f"m{i}", f"{unique}-{i}")],
            set_variables={f"k{i}": i, f"user:u{i}": i} if i % 2 else None,
        )

    await asyncio.gather(*(append(i) for i in range(16)))
    session = await client.get_session(session_id=sid)
    assert session.message_count == 16 and session.last_sequence == 16
    odd = [i for i in range(16) if i % 2]
    assert _vars(session) == {**{f"k{i}": i for i in odd}, **{f"user:u{i}": i for i in odd}}
    pager = await client.list_messages(session_id=sid, page_size=100)
    assert [m.sequence for m in pager.first_page.messages] == list(range(1, 17))

    stream = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    events = []
    async for event in stream:
        events.append(event)
        if len(events) == 16 + len(odd):
            break
    stream.cancel()
    assert [e.event_id for e in events] == list(range(1, 16 + len(odd) + 1))
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds.count("messages_appended") == 16 and kinds.count("updated") == len(odd)
    # Each change of variables follows its own append.
    for i, k in enumerate(kinds):
        if k == "updated":
            assert kinds[i - 1] == "messages_appended"
            assert _version(events[i].session.etag) == _version(events[i - 1].session.etag) + 1


async def test_keys_set_one_by_one_cannot_grow_variables_past_the_limit(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    """Each call's own keys are within the limit; so must be what they add up to, by UpdateSession key
    paths and by appends that set variables alike. A refused call changes nothing."""
    sid = f"{unique}/grow"
    await client.create_session(agent_id=agent, session_id=sid, user_id="u", variables={"a": "x" * 40_000})
    with pytest.raises(errors.InvalidArgument) as by_update:
        await client.update_session(
            session_id=sid, variables={"b": "y" * 40_000}, update_mask=["variables.b"]
        )
    assert by_update.value.field_violations[0][0] == "session.variables"
    with pytest.raises(errors.InvalidArgument) as by_append:
        await client.append_messages(
            session_id=sid, messages=[_text("x", f"{unique}-grow")], set_variables={"b": "y" * 40_000}
        )
    assert by_append.value.field_violations[0][0] == "set_variables"
    session = await client.get_session(session_id=sid)
    assert session.message_count == 0 and _vars(session) == {"a": "x" * 40_000}
    # Replacing a key with a smaller value, or removing one, is fine.
    await client.append_messages(
        session_id=sid, messages=[_text("x", f"{unique}-shrink")], set_variables={"a": "z", "b": "y" * 40_000}
    )
    assert _vars(await client.get_session(session_id=sid)) == {"a": "z", "b": "y" * 40_000}


async def test_a_refused_append_in_a_concurrent_group_fails_alone(
    client: AsyncSessionsClient, agent: str, unique: str
) -> None:
    """Appends that arrive together are written together; one whose variables break a limit is refused
    on its own, with nothing of it stored (no message, no scope half-written), and the others land."""
    sid = f"{unique}/group"
    await client.create_session(agent_id=agent, session_id=sid, user_id="u")
    await client.update_session(
        session_id=sid, variables={"user:big": "y" * 40_000}, update_mask=["variables.`user:big`"]
    )

    async def append(i: int) -> None:
        # Odd appends set an app: key and one own key; append 5 also pushes the user: scope over its limit.
        changes: dict[str, Any] | None = {f"app:a{i}": i, f"k{i}": i} if i % 2 else None
        if i == 5 and changes is not None:
            changes["user:more"] = "z" * 40_000
        await client.append_messages(
            session_id=sid, messages=[_text(f"m{i}", f"{unique}-{i}")], set_variables=changes
        )

    results = await asyncio.gather(*(append(i) for i in range(12)), return_exceptions=True)
    refused = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert refused == [5] and isinstance(results[5], errors.InvalidArgument)
    session = await client.get_session(session_id=sid)
    assert session.message_count == 11 and session.last_sequence == 11
    stored = [
        m.message_id for m in (await client.list_messages(session_id=sid, page_size=50)).first_page.messages
    ]
    assert sorted(stored) == sorted(f"{unique}-{i}" for i in range(12) if i != 5)
    odd = (1, 3, 7, 9, 11)
    expected = {**{f"k{i}": i for i in odd}, **{f"app:a{i}": i for i in odd}, "user:big": "y" * 40_000}
    assert _vars(session) == expected
