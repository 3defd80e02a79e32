"""MessageService through the published client: atomic, idempotent, gap-free appends; paging in both
directions with opaque tokens; the UI and full views; tool calls kept with their results; deletes."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import grpc
import pytest
from assertions import nested_json
from conftest import DatabaseTarget, make_settings
from google.protobuf import json_format, struct_pb2

from agentsessions import (
    AsyncSessionsClient,
    DataPart,
    FilePart,
    Message,
    MessageOrder,
    MessageStatus,
    MessageView,
    Part,
    ReasoningPart,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    errors,
)
from agentsessions.v1 import message_service_pb2_grpc
from agentsessions.v1.message_service_pb2 import ListMessagesRequest
from sessiond.domain.clock import ManualClock
from sessiond.server import start_server

DOMAIN = "agentsessions.v1"
ASC = MessageOrder.MESSAGE_ORDER_ASCENDING
DESC = MessageOrder.MESSAGE_ORDER_DESCENDING
UI = MessageView.MESSAGE_VIEW_UI
FULL = MessageView.MESSAGE_VIEW_FULL


# --- helpers ------------------------------------------------------------------------------------------


def text_message(
    text: str, *, role: Role = Role.ROLE_USER, message_id: str = "", hidden: bool = False
) -> Message:
    return Message(message_id=message_id, role=role, hidden=hidden, parts=[Part(text=TextPart(text=text))])


def call_message(*call_ids: str, text: str = "") -> Message:
    parts = [Part(text=TextPart(text=text))] if text else []
    parts += [Part(tool_call=ToolCallPart(call_id=c, name="lookup", arguments='{"q": 1}')) for c in call_ids]
    return Message(role=Role.ROLE_ASSISTANT, parts=parts)


def result_message(call_id: str) -> Message:
    return Message(
        role=Role.ROLE_TOOL,
        parts=[Part(tool_result=ToolResultPart(call_id=call_id, name="lookup", output='{"ok": true}'))],
    )


def assert_invalid(err: errors.AgentSessionsError, field: str) -> None:
    assert isinstance(err, errors.InvalidArgument), err
    assert err.domain == DOMAIN
    assert err.reason
    fields = [f for f, _ in err.field_violations]
    assert field in fields, f"expected a violation of {field!r}, got {fields}"


async def new_session(client: AsyncSessionsClient, unique: str, name: str = "s") -> str:
    session = await client.create_session(agent_id="echo", session_id=f"{unique}/{name}", user_id="u")
    return session.session_id


async def all_messages(client: AsyncSessionsClient, session_id: str, **kwargs: object) -> list[Message]:
    pager = await client.list_messages(session_id=session_id, **kwargs)  # type: ignore[arg-type]
    return [m async for m in pager]


async def page_sequences(client: AsyncSessionsClient, session_id: str, **kwargs: object) -> list[list[int]]:
    pager = await client.list_messages(session_id=session_id, **kwargs)  # type: ignore[arg-type]
    pages: list[list[int]] = []
    async for page in pager.pages:
        pages.append([m.sequence for m in page.messages])
        assert len(pages) < 1000, "paging does not end"
    return pages


@asynccontextmanager
async def limited_client(
    database: DatabaseTarget, clock: ManualClock, **overrides: object
) -> AsyncIterator[AsyncSessionsClient]:
    """A second server on the same database with other limits."""
    running = await start_server(make_settings(database, **overrides), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            yield client
    finally:
        await running.stop(0)


# --- appends ------------------------------------------------------------------------------------------


async def test_sequences_start_at_one_and_are_gap_free(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    first = await client.append_text(session_id=sid, role="user", text="hello")
    assert first.sequence == 1
    batch = await client.append_messages(
        session_id=sid, messages=[text_message(f"m{i}", role=Role.ROLE_ASSISTANT) for i in range(5)]
    )
    assert [m.sequence for m in batch.messages] == [2, 3, 4, 5, 6]
    assert batch.session.message_count == 6
    assert batch.session.last_sequence == 6
    assert all(m.session_id == sid and m.message_id for m in batch.messages)
    assert len({m.message_id for m in batch.messages} | {first.message_id}) == 6
    stored = await all_messages(client, sid)
    assert [m.sequence for m in stored] == [1, 2, 3, 4, 5, 6]
    assert [m.parts[0].text.text for m in stored] == ["hello", "m0", "m1", "m2", "m3", "m4"]


async def test_output_only_fields_of_appended_messages_are_ignored(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    sent = text_message("x")
    sent.sequence = 999
    sent.session_id = "someone/else"
    sent.turn_id = "turn-forged"
    stored = (await client.append_messages(session_id=sid, messages=[sent])).messages[0]
    assert stored.sequence == 1
    assert stored.session_id == sid
    assert stored.turn_id == ""
    assert stored.status == MessageStatus.MESSAGE_STATUS_COMPLETE


async def test_batch_with_one_invalid_message_stores_nothing(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    await client.append_text(session_id=sid, role="user", text="before")
    batch = [text_message("ok 1"), text_message("ok 2"), Message(role=Role.ROLE_USER), text_message("ok 3")]
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(session_id=sid, messages=batch)
    assert_invalid(info.value, "messages[2].parts")
    # A role left unspecified is invalid too, wherever it sits in the batch.
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(
            session_id=sid, messages=[text_message("ok"), Message(parts=[Part(text=TextPart(text="x"))])]
        )
    assert_invalid(info.value, "messages[1].role")
    session = await client.get_session(session_id=sid)
    assert session.message_count == 1
    assert session.last_sequence == 1
    assert [m.parts[0].text.text for m in await all_messages(client, sid)] == ["before"]
    # The numbering goes on as if the failed batches had never been sent.
    after = await client.append_text(session_id=sid, role="user", text="after")
    assert after.sequence == 2


async def test_caller_ids_make_a_retried_append_idempotent(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    batch = [
        text_message("q", message_id="msg-1"),
        text_message("a", role=Role.ROLE_ASSISTANT, message_id="msg-2"),
    ]
    first = await client.append_messages(session_id=sid, messages=batch)
    assert [(m.message_id, m.sequence) for m in first.messages] == [("msg-1", 1), ("msg-2", 2)]
    retried = await client.append_messages(session_id=sid, messages=batch)
    assert retried == first
    session = await client.get_session(session_id=sid)
    assert session.message_count == 2
    assert session.last_sequence == 2
    # A retry that carries one more message appends only that one and returns all three as stored.
    grown = await client.append_messages(
        session_id=sid, messages=[*batch, text_message("q2", message_id="msg-3")]
    )
    assert [(m.message_id, m.sequence) for m in grown.messages] == [("msg-1", 1), ("msg-2", 2), ("msg-3", 3)]
    assert list(grown.messages[:2]) == list(first.messages)
    assert grown.session.message_count == 3
    # One message on its own, retried through append_text: the stored one comes back.
    again = await client.append_text(session_id=sid, role="user", text="different text", message_id="msg-1")
    assert again == first.messages[0]
    stored = await all_messages(client, sid)
    assert [m.message_id for m in stored] == ["msg-1", "msg-2", "msg-3"]
    assert (await client.get_session(session_id=sid)).message_count == 3


async def test_concurrent_retries_of_one_append_store_it_once(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    batch = [text_message(f"t{i}", message_id=f"{unique}-m{i}") for i in range(3)]
    responses = await asyncio.gather(
        *(client.append_messages(session_id=sid, messages=batch) for _ in range(8))
    )
    expected = [(f"{unique}-m{i}", i + 1) for i in range(3)]
    for response in responses:
        assert [(m.message_id, m.sequence) for m in response.messages] == expected
    session = await client.get_session(session_id=sid)
    assert session.message_count == 3
    assert session.last_sequence == 3


async def test_duplicate_message_id_within_one_request_is_rejected(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(
            session_id=sid,
            messages=[
                text_message("a", message_id="dup"),
                text_message("b"),
                text_message("c", message_id="dup"),
            ],
        )
    assert_invalid(info.value, "messages[2].message_id")
    assert (await client.get_session(session_id=sid)).message_count == 0


async def test_batch_size_limit(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(session_id=sid, messages=[text_message(str(i)) for i in range(101)])
    assert_invalid(info.value, "messages")
    assert info.value.metadata.get("limit") == "100"
    assert (await client.get_session(session_id=sid)).message_count == 0
    full = await client.append_messages(session_id=sid, messages=[text_message(str(i)) for i in range(100)])
    assert [m.sequence for m in full.messages] == list(range(1, 101))
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(session_id=sid, messages=[])
    assert_invalid(info.value, "messages")


async def test_content_over_the_default_size_limit_is_rejected(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    big = "x" * (1024 * 1024 + 1)
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(session_id=sid, messages=[text_message("small"), text_message(big)])
    assert_invalid(info.value, "messages[1].parts")
    assert (await client.get_session(session_id=sid)).message_count == 0


async def test_configured_message_size_limit(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    async with limited_client(database, clock, max_message_bytes=2048) as client:
        sid = await new_session(client, unique)
        ok = await client.append_text(session_id=sid, role="user", text="y" * 1500)
        assert ok.sequence == 1
        with pytest.raises(errors.InvalidArgument) as info:
            await client.append_text(session_id=sid, role="user", text="y" * 2100)
        assert_invalid(info.value, "messages[0].parts")
        # The limit is on the whole content, however it is split into parts.
        split = Message(role=Role.ROLE_USER, parts=[Part(text=TextPart(text="z" * 700)) for _ in range(4)])
        with pytest.raises(errors.InvalidArgument) as info:
            await client.append_messages(session_id=sid, messages=[split])
        assert_invalid(info.value, "messages[0].parts")
        assert (await client.get_session(session_id=sid)).message_count == 1


async def test_message_metadata_limits(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    too_many = text_message("x")
    too_many.metadata.update({f"k{i}": "v" for i in range(65)})
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(session_id=sid, messages=[too_many])
    assert_invalid(info.value, "messages[0].metadata")

    long_value = text_message("x")
    long_value.metadata["k"] = "v" * 1025
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(session_id=sid, messages=[text_message("fine"), long_value])
    assert_invalid(info.value, "messages[1].metadata['k']")

    bad_key = text_message("x")
    bad_key.metadata["bad key!"] = "v"
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(session_id=sid, messages=[bad_key])
    assert info.value.field_violations[0][0].startswith("messages[0].metadata[")
    assert (await client.get_session(session_id=sid)).message_count == 0

    at_limit = text_message("x")
    at_limit.metadata.update({f"k{i}": "v" * 1024 for i in range(64)})
    stored = (await client.append_messages(session_id=sid, messages=[at_limit])).messages[0]
    assert dict(stored.metadata) == dict(at_limit.metadata)


async def test_concurrent_appends_are_gap_free(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)

    async def writer(w: int) -> list[int]:
        sequences = []
        for i in range(10):
            stored = await client.append_text(session_id=sid, role="user", text=f"w{w}-{i}")
            sequences.append(stored.sequence)
        return sequences

    per_writer = await asyncio.gather(*(writer(w) for w in range(16)))
    for sequences in per_writer:
        assert sequences == sorted(sequences), "one writer's appends must keep their order"
    assigned = [s for sequences in per_writer for s in sequences]
    assert sorted(assigned) == list(range(1, 161))

    stored = await all_messages(client, sid, page_size=37)
    assert [m.sequence for m in stored] == list(range(1, 161))
    assert len({m.message_id for m in stored}) == 160
    texts = [m.parts[0].text.text for m in stored]
    assert sorted(texts) == sorted(f"w{w}-{i}" for w in range(16) for i in range(10))
    for w in range(16):
        mine = [t for t in texts if t.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{i}" for i in range(10)]
    session = await client.get_session(session_id=sid)
    assert session.message_count == 160
    assert session.last_sequence == 160


async def test_appends_see_what_another_connection_committed(
    client: AsyncSessionsClient, database: DatabaseTarget, unique: str
) -> None:
    """The SQLite writer keeps session rows between its transactions; a change committed by another
    connection (another process, an operator's sqlite3 shell) must reach the next append."""
    sid = await new_session(client, unique)
    assert (await client.append_text(session_id=sid, role="user", text="one")).sequence == 1
    sql = "UPDATE sessions SET last_sequence = last_sequence + 5 WHERE session_id = "
    if database.backend == "sqlite":
        with sqlite3.connect(database.url.removeprefix("sqlite:///"), timeout=30) as conn:
            conn.execute(sql + "?", (sid,))
    else:
        conn = await asyncpg.connect(database.url, server_settings={"search_path": database.schema or ""})
        try:
            await conn.execute(sql + "$1", sid)
        finally:
            await conn.close()
    assert (await client.append_text(session_id=sid, role="user", text="two")).sequence == 7


async def test_appends_racing_an_end_never_land_after_it(client: AsyncSessionsClient, unique: str) -> None:
    """Writers append while the session is ended under them (on SQLite the end often shares a group
    commit with appends): every append acknowledged is stored, and none is acknowledged after the end."""
    sid = await new_session(client, unique)
    acknowledged: list[int] = []
    enough = asyncio.Event()

    async def writer(w: int) -> None:
        for i in range(1000):
            try:
                stored = await client.append_text(session_id=sid, role="user", text=f"w{w}-{i}")
            except errors.FailedPrecondition as exc:
                assert exc.reason == "SESSION_ENDED"
                return
            acknowledged.append(stored.sequence)
            if len(acknowledged) >= 40:
                enough.set()
        raise AssertionError("the session never ended")

    async def end() -> int:
        await enough.wait()
        return (await client.end_session(session_id=sid)).message_count

    *_, count_at_end = await asyncio.gather(*(writer(w) for w in range(16)), end())
    assert sorted(acknowledged) == list(range(1, len(acknowledged) + 1))
    assert count_at_end == len(acknowledged)
    session = await client.get_session(session_id=sid)
    assert session.message_count == len(acknowledged) == session.last_sequence
    assert [m.sequence for m in await all_messages(client, sid)] == sorted(acknowledged)
    with pytest.raises(errors.FailedPrecondition) as info:
        await client.append_text(session_id=sid, role="user", text="late")
    assert info.value.reason == "SESSION_ENDED"


async def test_concurrent_batches_are_contiguous(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)

    async def batch(b: int) -> list[int]:
        response = await client.append_messages(
            session_id=sid, messages=[text_message(f"b{b}-{i}") for i in range(5)]
        )
        return [m.sequence for m in response.messages]

    results = await asyncio.gather(*(batch(b) for b in range(12)))
    for sequences in results:
        assert sequences == list(range(sequences[0], sequences[0] + 5)), "a batch is stored in one piece"
    assert sorted(s for r in results for s in r) == list(range(1, 61))
    assert (await client.get_session(session_id=sid)).message_count == 60


# --- listing ------------------------------------------------------------------------------------------


async def fill(client: AsyncSessionsClient, session_id: str, n: int) -> None:
    for start in range(0, n, 100):
        await client.append_messages(
            session_id=session_id,
            messages=[text_message(f"m{i + 1}") for i in range(start, min(n, start + 100))],
        )


async def test_paging_both_ways_over_the_whole_history(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    await fill(client, sid, 57)
    for size in (1, 2, 7, 10, 56, 57, 58, 1000):
        pages = await page_sequences(client, sid, page_size=size)
        assert [s for p in pages for s in p] == list(range(1, 58)), size
        assert all(0 < len(p) <= size for p in pages)
        assert len(pages) == -(-57 // size)
        pages = await page_sequences(client, sid, page_size=size, order=DESC)
        assert [s for p in pages for s in p] == list(range(57, 0, -1)), size
        assert all(0 < len(p) <= size for p in pages)
    # The default page size is 50.
    pager = await client.list_messages(session_id=sid)
    assert len(pager.first_page.messages) == 50
    assert pager.first_page.next_page_token
    # The texts follow the sequence.
    assert [
        m.parts[0].text.text for m in await all_messages(client, sid, order="descending", page_size=9)
    ] == [f"m{i}" for i in range(57, 0, -1)]


async def test_paging_sees_messages_appended_meanwhile(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    await fill(client, sid, 4)
    pager = await client.list_messages(session_id=sid, page_size=3)
    seen: list[int] = []
    async for page in pager.pages:
        seen += [m.sequence for m in page.messages]
        if len(seen) == 3:
            await client.append_text(session_id=sid, role="user", text="late")
    assert seen == [1, 2, 3, 4, 5]


async def test_last_messages(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    assert await client.last_messages(session_id=sid, n=5) == []
    await fill(client, sid, 30)
    last = await client.last_messages(session_id=sid, n=4)
    assert [m.sequence for m in last] == [27, 28, 29, 30]
    assert [m.parts[0].text.text for m in last] == ["m27", "m28", "m29", "m30"]
    assert [m.sequence for m in await client.last_messages(session_id=sid, n=1)] == [30]
    assert [m.sequence for m in await client.last_messages(session_id=sid, n=100)] == list(range(1, 31))
    assert await client.last_messages(session_id=sid, n=0) == []  # none, not the server's default page


async def test_list_messages_can_bring_the_session_along(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    await client.update_session(
        session_id=sid, variables={"user:lang": "fr", "topic": "tides"}, update_mask=["variables"]
    )
    await fill(client, sid, 7)

    # Without the flag, no session; with it, the session exactly as GetSession shows it (shared state
    # merged), beside the same page.
    plain = await client.list_messages(session_id=sid, order=DESC, page_size=3)
    assert not plain.first_page.HasField("session")
    pager = await client.list_messages(session_id=sid, order=DESC, page_size=3, include_session=True)
    session = await client.get_session(session_id=sid)
    assert pager.first_page.session == session
    assert pager.first_page.session.message_count == 7
    assert pager.first_page.session.variables["user:lang"] == "fr"
    assert [m.sequence for m in pager.first_page.messages] == [7, 6, 5]
    assert [m.sequence for m in plain.first_page.messages] == [7, 6, 5]
    # The flag is not part of the listing: every page carries the session, and the pages are the same.
    pages = [page async for page in pager.pages]
    assert [[m.sequence for m in p.messages] for p in pages] == [[7, 6, 5], [4, 3, 2], [1]]
    assert all(p.session.session_id == sid for p in pages)
    plain_tail = await client.list_messages(
        session_id=sid, order=DESC, page_size=3, page_token=plain.first_page.next_page_token
    )
    assert [m.sequence for m in plain_tail.first_page.messages] == [4, 3, 2]

    # An empty history still brings the session; a missing session is NOT_FOUND as without the flag.
    empty = await new_session(client, unique, "empty")
    pager = await client.list_messages(session_id=empty, include_session=True)
    assert pager.first_page.session.session_id == empty and list(pager.first_page.messages) == []
    with pytest.raises(errors.NotFound) as info:
        await client.list_messages(session_id=f"{unique}/missing", include_session=True)
    assert info.value.reason == "SESSION_NOT_FOUND"


async def test_sequence_bounds(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    await fill(client, sid, 12)

    async def seqs(**kwargs: object) -> list[int]:
        return [m.sequence for m in await all_messages(client, sid, **kwargs)]

    assert await seqs(after_sequence=3, before_sequence=8) == [4, 5, 6, 7]
    assert await seqs(after_sequence=3, before_sequence=8, order=DESC) == [7, 6, 5, 4]
    assert await seqs(after_sequence=3, before_sequence=8, page_size=2) == [4, 5, 6, 7]
    assert await seqs(after_sequence=3, before_sequence=8, page_size=3, order=DESC) == [7, 6, 5, 4]
    assert await seqs(after_sequence=10) == [11, 12]
    assert await seqs(before_sequence=3, order=DESC) == [2, 1]
    assert await seqs(after_sequence=12) == []
    assert await seqs(after_sequence=5, before_sequence=6) == []
    assert await seqs(after_sequence=8, before_sequence=3) == []
    assert await seqs(before_sequence=1) == []
    assert await seqs(after_sequence=10_000_000_000) == []
    pages = await page_sequences(client, sid, after_sequence=2, before_sequence=11, page_size=4, order=DESC)
    assert pages == [[10, 9, 8, 7], [6, 5, 4, 3]]
    for name in ("after_sequence", "before_sequence"):
        with pytest.raises(errors.InvalidArgument) as info:
            await client.list_messages(session_id=sid, **{name: -1})  # type: ignore[arg-type]
        assert_invalid(info.value, name)


async def test_page_token_rules(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    other = await new_session(client, unique, "other")
    await fill(client, sid, 10)
    await fill(client, other, 10)
    first = (await client.list_messages(session_id=sid, page_size=3)).first_page
    token = first.next_page_token
    assert token
    # The token continues the request it came from.
    again = (await client.list_messages(session_id=sid, page_size=3, page_token=token)).first_page
    assert [m.sequence for m in again.messages] == [4, 5, 6]
    changed: list[dict[str, object]] = [
        {"session_id": other},
        {"session_id": sid, "order": DESC},
        {"session_id": sid, "view": UI},
        {"session_id": sid, "after_sequence": 1},
        {"session_id": sid, "before_sequence": 9},
    ]
    for params in changed:
        with pytest.raises(errors.InvalidArgument) as info:
            await client.list_messages(page_size=3, page_token=token, **params)  # type: ignore[arg-type]
        assert_invalid(info.value, "page_token")

    sessions_token = (await client.list_sessions(page_size=1)).first_page.next_page_token
    forged = base64.urlsafe_b64encode(json.dumps({"p": 0, "f": "x"}).encode()).decode()
    for garbage in ("garbage", "!!!", "e30", forged, "a" * 500, sessions_token or "zzz", token[:-3]):
        with pytest.raises(errors.InvalidArgument) as info:
            await client.list_messages(session_id=sid, page_size=3, page_token=garbage)
        assert_invalid(info.value, "page_token")


async def test_page_size_limits(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    await fill(client, sid, 3)
    for size in (1001, 5000, -1):
        with pytest.raises(errors.InvalidArgument) as info:
            await client.list_messages(session_id=sid, page_size=size)
        assert_invalid(info.value, "page_size")
    page = (await client.list_messages(session_id=sid, page_size=1000)).first_page
    assert [m.sequence for m in page.messages] == [1, 2, 3]
    assert page.next_page_token == ""


async def test_list_messages_of_missing_session(client: AsyncSessionsClient, unique: str) -> None:
    with pytest.raises(errors.NotFound) as info:
        await client.list_messages(session_id=f"{unique}/missing")
    assert info.value.reason == "SESSION_NOT_FOUND"
    assert info.value.domain == DOMAIN


async def test_ui_view_leaves_out_hidden_messages_and_parts(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    mixed = Message(
        role=Role.ROLE_ASSISTANT,
        parts=[
            Part(reasoning=ReasoningPart(text="thinking..."), hidden=True),
            Part(text=TextPart(text="visible answer")),
            Part(data=DataPart(type="debug", value=struct_pb2.Value(string_value="x")), hidden=True),
        ],
    )
    history = [
        text_message("system prompt", role=Role.ROLE_SYSTEM, hidden=True),
        text_message("hi"),
        mixed,
        text_message("internal note", role=Role.ROLE_ASSISTANT, hidden=True),
        text_message("bye"),
    ]
    await client.append_messages(session_id=sid, messages=history)

    full = await all_messages(client, sid, view=FULL)
    assert [m.sequence for m in full] == [1, 2, 3, 4, 5]
    assert [m.hidden for m in full] == [True, False, False, True, False]
    assert list(full[2].parts) == list(mixed.parts)
    # Unspecified is the full view.
    assert await all_messages(client, sid, view=MessageView.MESSAGE_VIEW_UNSPECIFIED) == full

    ui = await all_messages(client, sid, view=UI)
    assert [m.sequence for m in ui] == [2, 3, 5]
    assert [p.WhichOneof("kind") for p in ui[1].parts] == ["text"]
    assert ui[1].parts[0].text.text == "visible answer"
    assert not any(p.hidden for m in ui for p in m.parts)
    # Paged one at a time, in both orders, the UI view still holds each visible message once.
    assert [s for p in await page_sequences(client, sid, view=UI, page_size=1) for s in p] == [2, 3, 5]
    assert [s for p in await page_sequences(client, sid, view=UI, page_size=2, order=DESC) for s in p] == [
        5,
        3,
        2,
    ]
    assert [m.sequence for m in await client.last_messages(session_id=sid, n=2, view="ui")] == [3, 5]
    assert [m.sequence for m in await client.last_messages(session_id=sid, n=2, view="full")] == [4, 5]


async def test_unknown_view_or_order_is_rejected(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    with pytest.raises(errors.InvalidArgument) as info:
        await client.list_messages(session_id=sid, view=MessageView.ValueType(7))
    assert_invalid(info.value, "view")
    with pytest.raises(errors.InvalidArgument) as info:
        await client.list_messages(session_id=sid, order=MessageOrder.ValueType(9))
    assert_invalid(info.value, "order")


# --- tool calls stay with their results --------------------------------------------------------------


async def test_paging_never_separates_a_tool_call_from_its_result(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    # Appended in batches of different shapes, so results are tied to calls in the same batch and to
    # calls stored by an earlier one.
    batches: list[list[Message]] = [
        [text_message("q1"), call_message("A")],  # 1, 2
        [result_message("A")],  # 3
        [
            text_message("a1", role=Role.ROLE_ASSISTANT),  # 4
            text_message("q2"),  # 5
            call_message("B", "C"),  # 6
            result_message("B"),  # 7
            result_message("C"),  # 8
            text_message("a2", role=Role.ROLE_ASSISTANT),  # 9
        ],
        [call_message("D", text="let me look")],  # 10
        [result_message("D"), call_message("E")],  # 11, 12
        [result_message("E"), text_message("q3")],  # 13, 14
        [
            call_message("F", "G", "H"),  # 15
            result_message("F"),  # 16
            result_message("G"),  # 17
            result_message("H"),  # 18
            text_message("done", role=Role.ROLE_ASSISTANT),  # 19
        ],
    ]
    for batch in batches:
        await client.append_messages(session_id=sid, messages=batch)
    groups = [{2, 3}, {6, 7, 8}, {10, 11}, {12, 13}, {15, 16, 17, 18}]
    total = 19

    for order, expected in ((ASC, list(range(1, total + 1))), (DESC, list(range(total, 0, -1)))):
        for size in range(1, total + 2):
            pages = await page_sequences(client, sid, page_size=size, order=order)
            assert [s for p in pages for s in p] == expected, (order, size, pages)
            # Larger than asked for only to hold one group whole: nothing smaller keeps it together.
            assert all(0 < len(p) <= size or set(p) in groups for p in pages), (order, size, pages)
            for group in groups:
                holding = [i for i, p in enumerate(pages) if group & set(p)]
                assert len(holding) == 1, f"group {sorted(group)} split by page size {size}: {pages}"

    # "The last N" never starts in the middle of a group either.
    for n in range(1, total + 1):
        last = [m.sequence for m in await client.last_messages(session_id=sid, n=n)]
        assert last == list(range(total - len(last) + 1, total + 1))
        assert 0 < len(last) <= n or set(last) in groups
        for group in groups:
            if group & set(last):
                assert group <= set(last), f"last_messages({n}) = {last} splits {sorted(group)}"


async def test_ui_view_paging_with_hidden_tool_messages(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    hidden_result = result_message("R1")
    hidden_result.hidden = True
    hidden_call = call_message("R2")
    hidden_call.hidden = True
    history = [
        text_message("q1"),  # 1
        call_message("R1", text="checking"),  # 2, its result is hidden
        hidden_result,  # 3
        text_message("a1", role=Role.ROLE_ASSISTANT),  # 4
        hidden_call,  # 5, its result is visible
        result_message("R2"),  # 6
        text_message("a2", role=Role.ROLE_ASSISTANT),  # 7
    ]
    await client.append_messages(session_id=sid, messages=history)
    visible = [1, 2, 4, 6, 7]
    for size in range(1, 8):
        for order, expected in ((ASC, visible), (DESC, visible[::-1])):
            pages = await page_sequences(client, sid, view=UI, page_size=size, order=order)
            assert [s for p in pages for s in p] == expected, (size, order, pages)
            assert all(0 < len(p) <= size for p in pages)


def assert_pairs_together(
    pages: list[list[int]], pairs: list[tuple[int, int]], room: dict[tuple[int, int], int]
) -> None:
    """Each (call, result) pair is on one page whenever the page size leaves room for it: `room[pair]` is
    how many messages of the view it spans, call and result included."""
    size = max(len(p) for p in pages)
    for pair in pairs:
        if room[pair] > size:
            continue
        holding = [i for i, page in enumerate(pages) for seq in page if seq in pair]
        assert len(set(holding)) == 1, (pair, pages)


async def test_ui_view_keeps_visible_calls_with_results_when_hidden_group_members_sit_at_the_edge(
    client: AsyncSessionsClient, unique: str
) -> None:
    """A group whose last member is hidden ends, in the UI view, before the page does: it must not make
    the page look as if it spilled over (which used to send the page back untrimmed, call and result
    split)."""
    hidden_result = result_message("A")
    hidden_result.hidden = True
    ascending = await new_session(client, unique, "asc")
    # 1 call A | 2 result A (hidden) | 3 call B | 4 text | 5 result B
    history = [call_message("A"), hidden_result, call_message("B"), text_message("t"), result_message("B")]
    await client.append_messages(session_id=ascending, messages=history)
    assert await page_sequences(client, ascending, view=UI, page_size=3, order=ASC) == [[1], [3, 4, 5]]

    hidden_call = call_message("A")
    hidden_call.hidden = True
    descending = await new_session(client, unique, "desc")
    # 1 text | 2 call B | 3 text | 4 result B | 5 call A (hidden) | 6 result A
    history = [text_message("t"), call_message("B"), text_message("t"), result_message("B")]
    await client.append_messages(session_id=descending, messages=[*history, hidden_call, result_message("A")])
    assert await page_sequences(client, descending, view=UI, page_size=3, order=DESC) == [[6], [4, 3, 2], [1]]

    for size in range(1, 7):
        for order in (ASC, DESC):
            pages = await page_sequences(client, ascending, view=UI, page_size=size, order=order)
            assert_pairs_together(pages, [(3, 5)], {(3, 5): 3})
            pages = await page_sequences(client, descending, view=UI, page_size=size, order=order)
            assert_pairs_together(pages, [(2, 4)], {(2, 4): 3})


async def test_a_call_id_used_again_links_results_to_the_newest_call(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Models that number calls per turn reuse ids (`call_0`): each result belongs with the call before it."""
    sid = await new_session(client, unique)
    turn = [text_message("q"), call_message("call_0"), result_message("call_0")]
    await client.append_messages(session_id=sid, messages=turn)  # 1, 2, 3
    await client.append_messages(session_id=sid, messages=turn)  # 4, 5, 6: a later append
    # 7, 8, 9 and 10, 11, 12: one append holding the id twice
    await client.append_messages(session_id=sid, messages=[*turn, *turn, text_message("a")])  # ... 13
    pairs = [(2, 3), (5, 6), (8, 9), (11, 12)]
    for size in range(2, 8):
        for order in (ASC, DESC):
            pages = await page_sequences(client, sid, page_size=size, order=order)
            assert sorted(s for p in pages for s in p) == list(range(1, 14))
            assert_pairs_together(pages, pairs, dict.fromkeys(pairs, 2))
    assert [m.sequence for m in await client.last_messages(session_id=sid, n=3)] == [11, 12, 13]
    assert [m.sequence for m in await client.last_messages(session_id=sid, n=2)] == [13]


async def test_large_messages_come_back_in_pages_any_default_client_can_receive(
    client: AsyncSessionsClient, target: str, unique: str
) -> None:
    """Five messages of almost 1 MiB each: the published client's append gets its whole answer back, and
    a default gRPC channel (4 MiB receive limit, as grpcurl and other languages have) reads the history at
    the default page size, in pages that stop short of the limit, in both orders."""
    sid = await new_session(client, unique)
    big = [text_message(f"{i}" + "x" * 1_000_000) for i in range(5)]
    appended = await client.append_messages(session_id=sid, messages=big)
    assert [m.sequence for m in appended.messages] == [1, 2, 3, 4, 5]
    async with grpc.aio.insecure_channel(target) as channel:  # default options
        stub = message_service_pb2_grpc.MessageServiceStub(channel)
        for order, expected in ((ASC, [1, 2, 3, 4, 5]), (DESC, [5, 4, 3, 2, 1])):
            seen: list[int] = []
            token = ""
            while True:
                page = await stub.ListMessages(
                    ListMessagesRequest(session_id=sid, order=order, page_token=token, include_session=True)
                )
                assert page.ByteSize() < 4 * 1024 * 1024 and page.messages
                seen += [m.sequence for m in page.messages]
                token = page.next_page_token
                if not token:
                    break
            assert seen == expected
    assert [m.parts[0].text.text[:1] for m in await all_messages(client, sid)] == ["0", "1", "2", "3", "4"]


async def test_a_group_larger_than_the_page_comes_whole_never_outputs_without_their_call(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Parallel calls A and B in one message, then their two outputs: a page of one or two holds the
    group whole (more than asked for), never an output without its call, in both orders and both views."""
    sid = await new_session(client, unique)
    history = [text_message("q"), call_message("A", "B"), result_message("A"), result_message("B")]
    await client.append_messages(session_id=sid, messages=[*history, text_message("done")])  # 1 .. 5
    for view in (FULL, UI):
        for size in (1, 2):
            descending = await page_sequences(client, sid, page_size=size, order=DESC, view=view)
            assert descending == [[5], [4, 3, 2], [1]]
            ascending = await page_sequences(client, sid, page_size=size, order=ASC, view=view)
            assert ascending == [[1], [2, 3, 4], [5]]
    # "Last N" that would start inside the group takes the group whole.
    without_last = await new_session(client, unique, "tail")
    await client.append_messages(session_id=without_last, messages=history)  # 1 .. 4
    for n in (1, 2, 3):
        assert [m.sequence for m in await client.last_messages(session_id=without_last, n=n)] == [2, 3, 4]
    # A request's own bounds still hold.
    pages = await page_sequences(client, sid, page_size=1, order=DESC, after_sequence=2)
    assert pages == [[5], [4, 3]]


async def test_calls_in_messages_of_their_own_come_whole_with_their_outputs(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Parallel calls each in a message of its own (as the OpenAI Agents SDK stores them), answered after
    all of them: the groups overlap, and a page that grows to hold one group grows on for the groups its
    new messages belong to. Before, it grew once: a page of one held call A with call B and output A,
    and output B came on the next page, without its call; "last 1" gave outputs without their calls."""
    sid = await new_session(client, unique)
    calls = [call_message("A"), call_message("B"), call_message("C")]  # 2, 3, 4
    outputs = [result_message("A"), result_message("B"), result_message("C")]  # 5, 6, 7
    await client.append_messages(session_id=sid, messages=[text_message("q"), *calls, *outputs])
    await client.append_text(session_id=sid, role="assistant", text="done")  # 8
    for view in (FULL, UI):
        for size in (1, 2, 3):
            ascending = await page_sequences(client, sid, page_size=size, order=ASC, view=view)
            assert [2, 3, 4, 5, 6, 7] in ascending, ascending
            descending = await page_sequences(client, sid, page_size=size, order=DESC, view=view)
            assert [7, 6, 5, 4, 3, 2] in descending, descending
    # "Last N" leaves out a group it would cut (fewer than N), or takes it whole when it is all there is.
    for n in (1, 2, 5):
        assert [m.sequence for m in await client.last_messages(session_id=sid, n=n)] == [8]
    tail = await new_session(client, unique, "tail")
    await client.append_messages(session_id=tail, messages=[text_message("q"), *calls, *outputs])  # 1 .. 7
    for n in (1, 2, 3):
        assert [m.sequence for m in await client.last_messages(session_id=tail, n=n)] == [2, 3, 4, 5, 6, 7]
    # A chain: each output is followed by the next call, and the calls' outputs come last.
    chain = await new_session(client, unique, "chain")
    await client.append_messages(
        session_id=chain,
        messages=[
            *[call_message("A"), call_message("B"), result_message("A"), call_message("C")],
            *[result_message("B"), result_message("C")],  # groups 1..3, 2..5, 4..6
        ],
    )
    await client.append_text(session_id=chain, role="user", text="next")  # 7
    for size in (1, 2):
        assert await page_sequences(client, chain, page_size=size, order=ASC) == [[1, 2, 3, 4, 5, 6], [7]]
        assert await page_sequences(client, chain, page_size=size, order=DESC) == [[7], [6, 5, 4, 3, 2, 1]]
    assert [m.sequence for m in await client.last_messages(session_id=chain, n=2)] == [7]


# --- deletes ------------------------------------------------------------------------------------------


async def test_delete_one_message(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    await client.append_messages(
        session_id=sid, messages=[text_message(f"t{i}", message_id=f"m{i}") for i in range(1, 6)]
    )
    deleted = await client.delete_messages(session_id=sid, message_id="m3")
    assert deleted.deleted_count == 1
    assert deleted.session.message_count == 4
    assert deleted.session.last_sequence == 5
    assert [m.message_id for m in await all_messages(client, sid)] == ["m1", "m2", "m4", "m5"]
    with pytest.raises(errors.NotFound) as info:
        await client.delete_messages(session_id=sid, message_id="m3")
    assert info.value.reason == "MESSAGE_NOT_FOUND"
    assert info.value.domain == DOMAIN
    assert info.value.metadata["message_id"] == "m3"
    assert (await client.get_session(session_id=sid)).message_count == 4
    # The freed number is never handed out again.
    assert (await client.append_text(session_id=sid, role="user", text="next")).sequence == 6


async def test_delete_after_a_sequence_rewinds_without_reusing_numbers(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    await fill(client, sid, 8)
    rewound = await client.delete_messages(session_id=sid, after_sequence=5)
    assert rewound.deleted_count == 3
    assert rewound.session.message_count == 5
    assert rewound.session.last_sequence == 8
    assert [m.sequence for m in await all_messages(client, sid)] == [1, 2, 3, 4, 5]
    nothing = await client.delete_messages(session_id=sid, after_sequence=5)
    assert nothing.deleted_count == 0
    assert nothing.session.message_count == 5

    appended = await client.append_messages(session_id=sid, messages=[text_message("x"), text_message("y")])
    assert [m.sequence for m in appended.messages] == [9, 10]
    assert appended.session.message_count == 7
    assert appended.session.last_sequence == 10

    everything = await client.delete_messages(session_id=sid, after_sequence=0)
    assert everything.deleted_count == 7
    assert everything.session.message_count == 0
    assert await all_messages(client, sid) == []
    assert (await client.append_text(session_id=sid, role="user", text="z")).sequence == 11
    session = await client.get_session(session_id=sid)
    assert (session.message_count, session.last_sequence) == (1, 11)


async def test_delete_messages_errors(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    with pytest.raises(errors.InvalidArgument) as info:
        await client.delete_messages(session_id=sid, after_sequence=-1)
    assert_invalid(info.value, "after_sequence")
    with pytest.raises(errors.NotFound) as info:
        await client.delete_messages(session_id=sid, message_id="nope")
    assert info.value.reason == "MESSAGE_NOT_FOUND"
    with pytest.raises(errors.NotFound) as info:
        await client.delete_messages(session_id=f"{unique}/missing", after_sequence=0)
    assert info.value.reason == "SESSION_NOT_FOUND"


async def test_rewind_before_a_tool_result_then_append_a_new_one(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    await client.append_messages(
        session_id=sid,
        messages=[text_message("q"), call_message("K"), result_message("K"), text_message("a")],
    )
    await client.delete_messages(session_id=sid, after_sequence=2)
    await client.append_messages(session_id=sid, messages=[result_message("K"), text_message("a2")])
    # 1 q, 2 call K, 5 result K, 6 a2: the new result is tied to the call that is still stored.
    for size in (2, 3):
        for order in (ASC, DESC):
            pages = await page_sequences(client, sid, page_size=size, order=order)
            assert sorted(s for p in pages for s in p) == [1, 2, 5, 6]
            assert any({2, 5} <= set(p) for p in pages), (size, order, pages)


async def test_clear_and_restore_never_reuse_sequence_numbers(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    await fill(client, sid, 3)
    cleared = await client.clear_session(session_id=sid)
    assert (cleared.message_count, cleared.last_sequence) == (0, 3)
    assert await all_messages(client, sid) == []
    restored = await client.restore_session(
        session_id=sid,
        messages=[text_message("old q", message_id="r1"), call_message("Z"), result_message("Z")],
    )
    assert restored.restored
    assert (restored.session.message_count, restored.session.last_sequence) == (3, 6)
    history = await all_messages(client, sid)
    assert (history[0].sequence, history[0].message_id) == (4, "r1")
    assert [m.sequence for m in history] == [4, 5, 6]
    # The restored tool call keeps its result on its page.
    assert await page_sequences(client, sid, page_size=2) == [[4], [5, 6]]
    assert (await client.append_text(session_id=sid, role="user", text="new")).sequence == 7


async def test_repeated_call_ids_do_not_break_appends_or_paging(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await new_session(client, unique)
    twice_in_one = Message(
        role=Role.ROLE_ASSISTANT,
        parts=[
            Part(tool_call=ToolCallPart(call_id="X", name="f")),
            Part(tool_call=ToolCallPart(call_id="X", name="f")),
        ],
    )
    await client.append_messages(
        session_id=sid, messages=[twice_in_one, call_message("X"), result_message("X")]
    )
    await client.append_messages(session_id=sid, messages=[call_message("X"), result_message("X")])
    await client.append_messages(
        session_id=sid, messages=[result_message("never-called"), text_message("end")]
    )
    for size in range(1, 9):
        for order, expected in ((ASC, list(range(1, 8))), (DESC, list(range(7, 0, -1)))):
            pages = await page_sequences(client, sid, page_size=size, order=order)
            assert [s for p in pages for s in p] == expected, (size, order, pages)
            assert all(0 < len(p) <= max(size, 3) for p in pages)  # 1-3 and 4-5 are groups


# --- content ------------------------------------------------------------------------------------------


async def test_every_part_kind_round_trips(client: AsyncSessionsClient, unique: str) -> None:
    sid = await new_session(client, unique)
    value = json_format.ParseDict(
        {"type": "item", "n": 3.5, "ok": True, "none": None, "list": [1, "two", {"three": [3]}], "obj": {}},
        struct_pb2.Value(),
    )
    parts = [
        Part(text=TextPart(text="héllo ✓ \U0001f600\nnew line")),
        Part(reasoning=ReasoningPart(text="because"), hidden=True),
        Part(
            tool_call=ToolCallPart(call_id="call-1", name="search", arguments='{"q": "x"}', client_side=True)
        ),
        Part(tool_result=ToolResultPart(call_id="call-1", name="search", output="[1, 2]", is_error=True)),
        Part(
            file=FilePart(
                uri="s3://bucket/key.pdf", mime_type="application/pdf", name="key.pdf", size_bytes=2**40
            )
        ),
        Part(data=DataPart(type="openai.agents.item", value=value)),
        Part(data=DataPart(type="scalar", value=struct_pb2.Value(number_value=-0.25))),
        Part(data=DataPart(type="empty")),
    ]
    sent = Message(
        message_id="rich-1",
        role=Role.ROLE_ASSISTANT,
        parts=parts,
        metadata={"model": "m-1", "trace": "abc"},
        status=MessageStatus.MESSAGE_STATUS_INTERRUPTED,
    )
    appended = (await client.append_messages(session_id=sid, messages=[sent])).messages[0]
    (listed,) = await all_messages(client, sid)
    for stored in (appended, listed):
        assert list(stored.parts) == parts
        assert stored.role == Role.ROLE_ASSISTANT
        assert stored.status == MessageStatus.MESSAGE_STATUS_INTERRUPTED
        assert dict(stored.metadata) == {"model": "m-1", "trace": "abc"}
        assert stored.message_id == "rich-1"
        assert stored.HasField("create_time")
    assert json_format.MessageToDict(listed.parts[5].data.value)["list"][2] == {"three": [3]}
    (ui,) = await all_messages(client, sid, view=UI)
    assert [p.WhichOneof("kind") for p in ui.parts] == [
        "text",
        "tool_call",
        "tool_result",
        "file",
        "data",
        "data",
        "data",
    ]

    for role in (Role.ROLE_USER, Role.ROLE_SYSTEM, Role.ROLE_TOOL):
        m = await client.append_text(session_id=sid, role=role, text=Role.Name(role))
        assert m.role == role
    error = Message(role=Role.ROLE_ASSISTANT, status=MessageStatus.MESSAGE_STATUS_ERROR, parts=parts[:1])
    assert (await client.append_messages(session_id=sid, messages=[error])).messages[0].status == (
        MessageStatus.MESSAGE_STATUS_ERROR
    )


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (Message(role=Role.ROLE_USER, parts=[Part()]), "messages[0].parts[0]"),
        (Message(role=Role.ValueType(42), parts=[Part(text=TextPart(text="x"))]), "messages[0].role"),
        (
            Message(
                role=Role.ROLE_USER, status=MessageStatus.ValueType(9), parts=[Part(text=TextPart(text="x"))]
            ),
            "messages[0].status",
        ),
        (
            Message(role=Role.ROLE_USER, message_id="bad id!", parts=[Part(text=TextPart(text="x"))]),
            "messages[0].message_id",
        ),
        (
            Message(role=Role.ROLE_USER, message_id="m" * 129, parts=[Part(text=TextPart(text="x"))]),
            "messages[0].message_id",
        ),
        (
            Message(role=Role.ROLE_ASSISTANT, parts=[Part(tool_call=ToolCallPart(name="f"))]),
            "messages[0].parts[0].tool_call.call_id",
        ),
        (
            Message(role=Role.ROLE_ASSISTANT, parts=[Part(tool_call=ToolCallPart(call_id="c"))]),
            "messages[0].parts[0].tool_call.name",
        ),
        (
            Message(role=Role.ROLE_TOOL, parts=[Part(tool_result=ToolResultPart(output="x"))]),
            "messages[0].parts[0].tool_result.call_id",
        ),
        (
            Message(role=Role.ROLE_USER, parts=[Part(file=FilePart(name="f.txt"))]),
            "messages[0].parts[0].file.uri",
        ),
        (
            Message(role=Role.ROLE_USER, parts=[Part(text=TextPart(text="x")) for _ in range(257)]),
            "messages[0].parts",
        ),
    ],
)
async def test_invalid_messages(
    client: AsyncSessionsClient, unique: str, message: Message, field: str
) -> None:
    sid = await new_session(client, unique)
    with pytest.raises(errors.InvalidArgument) as info:
        await client.append_messages(session_id=sid, messages=[message])
    assert_invalid(info.value, field)
    assert (await client.get_session(session_id=sid)).message_count == 0


async def test_appends_to_missing_ended_or_expired_sessions(
    client: AsyncSessionsClient, clock: ManualClock, unique: str
) -> None:
    with pytest.raises(errors.NotFound) as info:
        await client.append_text(session_id=f"{unique}/missing", role="user", text="x")
    assert info.value.reason == "SESSION_NOT_FOUND"

    ended = await new_session(client, unique, "ended")
    await client.end_session(session_id=ended)
    with pytest.raises(errors.FailedPrecondition) as info:
        await client.append_text(session_id=ended, role="user", text="x")
    assert info.value.reason == "SESSION_ENDED"

    expired = await new_session(client, unique, "expired")
    kept = await client.append_text(session_id=expired, role="user", text="x", message_id="keep")
    clock.advance(hours=2)
    with pytest.raises(errors.FailedPrecondition) as info:
        await client.append_text(session_id=expired, role="user", text="y")
    assert info.value.reason == "SESSION_EXPIRED"
    # A retry of an append that went through still answers with what was stored.
    assert await client.append_text(session_id=expired, role="user", text="x", message_id="keep") == kept
    # History stays readable.
    assert [m.message_id for m in await all_messages(client, expired)] == ["keep"]


async def test_the_deepest_accepted_json_stays_readable_everywhere(
    client: AsyncSessionsClient, unique: str
) -> None:
    """JSON nested to the limit (32 levels) is accepted, and every form it travels in afterwards decodes:
    the history, the session, and the events that wrap them a few levels deeper (replayed and live).
    One level more is refused up front."""
    sid = f"{unique}/deep"
    await client.create_session(agent_id="echo", session_id=sid)
    deepest = nested_json(32)
    variables = struct_pb2.Struct()
    variables.fields["v"].list_value.values.append(nested_json(30))  # the object, a list, then 31 levels
    await client.append_messages(
        session_id=sid,
        messages=[Message(role=Role.ROLE_USER, parts=[Part(data=DataPart(value=deepest))])],
        set_variables=json_format.MessageToDict(variables),
    )
    page = await client.list_messages(session_id=sid)
    assert page.first_page.messages[0].parts[0].data.value == deepest
    assert (await client.get_session(session_id=sid)).variables == variables
    stream = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    kinds = []
    async for event in stream:
        kinds.append(event.WhichOneof("kind"))
        if len(kinds) == 2:
            break
    stream.cancel()
    assert kinds == ["messages_appended", "updated"]
    with pytest.raises(errors.InvalidArgument) as refused:
        await client.append_messages(
            session_id=sid,
            messages=[Message(role=Role.ROLE_USER, parts=[Part(data=DataPart(value=nested_json(33)))])],
        )
    assert refused.value.field_violations[0][0] == "messages[0].parts[0].data.value"
