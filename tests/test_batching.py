"""BatchAppendMessages, and the async client's append batching that uses it.

The server applies each entry of a batch as the AppendMessages call it stands for, with its own outcome.
The client sends an append at once while no other is under way, and holds the ones made meanwhile for
one batch: each caller still gets its own answer or its own exception, and retries on its own.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from conftest import DatabaseTarget, make_settings, serving

from agentsessions import AppendBatching, AsyncSessionsClient, Message, Part, Role, TextPart, errors
from agentsessions.v1 import message_service_pb2, message_service_pb2_grpc
from sessiond.api.servicers import MessageServicer
from sessiond.domain.clock import ManualClock

MESSAGES = "/agentsessions.v1.MessageService/"


def text(value: str, message_id: str = "") -> Message:
    return Message(message_id=message_id, role=Role.ROLE_USER, parts=[Part(text=TextPart(text=value))])


def entry(session_id: str, *messages: Message) -> message_service_pb2.AppendMessagesRequest:
    return message_service_pb2.AppendMessagesRequest(session_id=session_id, messages=messages)


async def new_sessions(client: AsyncSessionsClient, prefix: str, count: int) -> list[str]:
    """The ids of `count` new sessions, `{prefix}0` to `{prefix}{count - 1}`."""
    return [
        (await client.create_session(agent_id="echo", session_id=f"{prefix}{i}")).session_id
        for i in range(count)
    ]


class Calls(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the unary calls a channel makes, by method name."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else method
        self.count[name.removeprefix(MESSAGES)] += 1
        return await continuation(client_call_details, request)


@pytest.fixture
async def counted(target: str) -> AsyncIterator[tuple[AsyncSessionsClient, Calls]]:
    calls = Calls()
    channel = grpc.aio.insecure_channel(target, interceptors=[calls])
    async with AsyncSessionsClient(channel=channel) as client:
        yield client, calls
    await channel.close()


# --- the RPC -------------------------------------------------------------------------------------------


async def test_each_entry_gets_its_own_outcome(client: AsyncSessionsClient, unique: str) -> None:
    ok = await client.create_session(agent_id="echo", session_id=f"{unique}/ok")
    ended = await client.create_session(agent_id="echo", session_id=f"{unique}/ended")
    await client.end_session(session_id=ended.session_id)
    stub = message_service_pb2_grpc.MessageServiceStub(client.channel)
    response = await stub.BatchAppendMessages(
        message_service_pb2.BatchAppendMessagesRequest(
            requests=[
                entry(ok.session_id, text("one"), text("two")),
                entry(f"{unique}/missing", text("lost")),
                entry(ok.session_id, Message(parts=[Part(text=TextPart(text="no role"))])),
                entry(ended.session_id, text("late")),
                entry(ok.session_id, text("three")),
            ]
        )
    )
    kinds = [o.WhichOneof("outcome") for o in response.outcomes]
    assert kinds == ["response", "error", "error", "error", "response"]
    first, missing, invalid, late, last = response.outcomes
    # The answers are AppendMessages' own: the messages as stored, and the session after them.
    assert [m.sequence for m in first.response.messages] == [1, 2]
    assert [m.sequence for m in last.response.messages] == [3]
    assert last.response.session.message_count == 3
    # The errors carry what the call's status would: code, reason, field violations.
    not_found = errors.from_connect_error(missing.error)
    assert isinstance(not_found, errors.NotFound) and not_found.reason == "SESSION_NOT_FOUND"
    bad = errors.from_connect_error(invalid.error)
    assert isinstance(bad, errors.InvalidArgument)
    assert [f for f, _ in bad.field_violations] == ["messages[0].role"]
    assert invalid.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    refused = errors.from_connect_error(late.error)
    assert isinstance(refused, errors.FailedPrecondition) and refused.reason == "SESSION_ENDED"
    # Failed entries stored nothing; the others everything.
    page = await client.list_messages(session_id=ok.session_id)
    assert [m.parts[0].text.text async for m in page] == ["one", "two", "three"]
    assert (await client.get_session(session_id=ended.session_id)).message_count == 0


async def test_an_entry_whose_answer_fails_fails_alone(
    client: AsyncSessionsClient, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure while building one entry's answer (a bug in a conversion, forced here) is that entry's
    INTERNAL error: the other entries keep their answers, and the call itself succeeds."""
    sids = await new_sessions(client, f"{unique}/s", 3)
    answer = MessageServicer._answer

    def failing(self: MessageServicer, out: Any, session: Any, stored: Any, live: Any) -> Any:
        if session.session_id == sids[1]:
            raise RuntimeError("a conversion bug")
        return answer(self, out, session, stored, live)

    monkeypatch.setattr(MessageServicer, "_answer", failing)
    stub = message_service_pb2_grpc.MessageServiceStub(client.channel)
    response = await stub.BatchAppendMessages(
        message_service_pb2.BatchAppendMessagesRequest(requests=[entry(sid, text(sid)) for sid in sids])
    )
    assert [o.WhichOneof("outcome") for o in response.outcomes] == ["response", "error", "response"]
    assert response.outcomes[1].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert [o.response.messages[0].parts[0].text.text for o in response.outcomes[::2]] == sids[::2]
    # Its messages were stored all the same (the answer failed, not the write).
    assert (await client.get_session(session_id=sids[1])).message_count == 1


async def test_a_retried_batch_stores_nothing_twice(client: AsyncSessionsClient, unique: str) -> None:
    a = await client.create_session(agent_id="echo", session_id=f"{unique}/a")
    b = await client.create_session(agent_id="echo", session_id=f"{unique}/b")
    stub = message_service_pb2_grpc.MessageServiceStub(client.channel)
    request = message_service_pb2.BatchAppendMessagesRequest(
        requests=[entry(a.session_id, text("x", "m1")), entry(b.session_id, text("y", "m1"), text("z", "m2"))]
    )
    first = await stub.BatchAppendMessages(request)
    again = await stub.BatchAppendMessages(request)
    assert [[m.sequence for m in o.response.messages] for o in again.outcomes] == [[1], [1, 2]]
    assert [o.response.messages for o in again.outcomes] == [o.response.messages for o in first.outcomes]
    assert (await client.get_session(session_id=b.session_id)).message_count == 2


# --- the client's batching ------------------------------------------------------------------------------


async def test_overlapping_appends_share_calls_and_each_lands_in_order(
    counted: tuple[AsyncSessionsClient, Calls], unique: str
) -> None:
    client, calls = counted
    writers, each = 8, 15
    ids = await new_sessions(client, f"{unique}/w", writers)
    calls.count.clear()

    async def writer(session_id: str) -> list[int]:
        sequences = []
        for i in range(each):
            response = await client.append_messages(session_id=session_id, messages=[text(f"{i}", f"m{i}")])
            sequences.append(response.messages[0].sequence)
        return sequences

    answered = await asyncio.gather(*(writer(s) for s in ids))
    # Each caller got its own answer, in its own order; nothing lost, nothing twice.
    assert answered == [list(range(1, each + 1))] * writers
    for session_id in ids:
        page = await client.list_messages(session_id=session_id, page_size=100)
        assert [m.parts[0].text.text async for m in page] == [f"{i}" for i in range(each)]
    # ...in fewer calls than appends: the ones made while another was under way went together.
    assert calls.count["BatchAppendMessages"] > 0
    assert calls.count["AppendMessages"] + calls.count["BatchAppendMessages"] < writers * each


async def test_callers_answered_by_one_batch_send_their_next_appends_together(
    counted: tuple[AsyncSessionsClient, Calls], unique: str
) -> None:
    """The appends held behind a call leave one turn of the loop after it ends, so the callers it
    answered join them: writers appending in turn share one call per round, not a lone call for the
    first of them and a batch for the others."""
    client, calls = counted
    writers, rounds = 8, 12
    ids = await new_sessions(client, f"{unique}/t", writers)
    calls.count.clear()

    async def writer(session_id: str) -> None:
        for i in range(rounds):
            await client.append_messages(session_id=session_id, messages=[text(f"{i}", f"m{i}")])

    await asyncio.gather(*(writer(s) for s in ids))
    for session_id in ids:
        assert (await client.get_session(session_id=session_id)).message_count == rounds
    # The first append alone, then a call per round (the first writer a round ahead of the others).
    assert calls.count["AppendMessages"] == 1
    assert calls.count["BatchAppendMessages"] <= rounds + 1


async def test_a_failed_append_in_a_batch_raises_in_its_caller_only(
    counted: tuple[AsyncSessionsClient, Calls], unique: str
) -> None:
    client, calls = counted
    ids = await new_sessions(client, f"{unique}/s", 4)
    calls.count.clear()
    targets = [*ids, f"{unique}/missing", *ids]
    results = await asyncio.gather(
        *(client.append_messages(session_id=s, messages=[text("x", f"m{i}")]) for i, s in enumerate(targets)),
        return_exceptions=True,
    )
    assert calls.count["BatchAppendMessages"] >= 1
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and results.index(failed[0]) == 4
    assert isinstance(failed[0], errors.NotFound) and failed[0].reason == "SESSION_NOT_FOUND"
    for session_id in ids:
        assert (await client.get_session(session_id=session_id)).message_count == 2


async def test_batching_off_sends_one_call_per_append(target: str, unique: str) -> None:
    calls = Calls()
    channel = grpc.aio.insecure_channel(target, interceptors=[calls])
    try:
        async with AsyncSessionsClient(channel=channel, append_batching=None) as client:
            session = await client.create_session(agent_id="echo", session_id=f"{unique}/solo")
            await asyncio.gather(
                *(
                    client.append_messages(session_id=session.session_id, messages=[text("x", f"m{i}")])
                    for i in range(6)
                )
            )
            assert (await client.get_session(session_id=session.session_id)).message_count == 6
    finally:
        await channel.close()
    assert calls.count["AppendMessages"] == 6 and calls.count["BatchAppendMessages"] == 0


async def test_appends_without_ids_are_never_batched(
    counted: tuple[AsyncSessionsClient, Calls], unique: str
) -> None:
    """A batch whose answer is lost is sent again entry by entry: only appends with ids are safe to."""
    client, calls = counted
    session = await client.create_session(agent_id="echo", session_id=f"{unique}/no-ids")
    calls.count.clear()
    await asyncio.gather(
        *(client.append_messages(session_id=session.session_id, messages=[text("x")]) for _ in range(8))
    )
    assert calls.count == {"AppendMessages": 8}
    assert (await client.get_session(session_id=session.session_id)).message_count == 8


async def test_a_low_server_batch_size_does_not_fail_batches(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """SESSIOND_MAX_BATCH_MESSAGES bounds the messages of each entry, not the entries of a batch: lowered
    below the client's 64 entries, batches still go through."""
    async with serving(make_settings(database, max_batch_messages=2), clock) as running:
        calls = Calls()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", interceptors=[calls])
        async with AsyncSessionsClient(channel=channel) as client:
            ids = await new_sessions(client, f"{unique}/", 30)
            await asyncio.gather(
                *(client.append_messages(session_id=s, messages=[text("x", "m1")]) for s in ids)
            )
            for session_id in ids:
                assert (await client.get_session(session_id=session_id)).message_count == 1
        await channel.close()
    assert calls.count["BatchAppendMessages"] >= 1


def test_batching_options_are_checked() -> None:
    with pytest.raises(ValueError):
        AppendBatching(max_in_flight=0)
    with pytest.raises(ValueError):
        AppendBatching(max_entries=0)


CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")


class HeldServer:
    """A fake MessageService: AppendMessages waits for `release`; BatchAppendMessages answers with
    `batch_code` when given (UNIMPLEMENTED, RESOURCE_EXHAUSTED) and otherwise applies every entry.
    Records the session id of every append it applies, and the caller each call was sent for (the
    `caller` metadata a client interceptor adds from the sender's context)."""

    def __init__(
        self, *, batch_code: grpc.StatusCode | None = None, free: frozenset[str] = frozenset()
    ) -> None:
        self.release = asyncio.Event()
        self.free = free  # sessions whose appends are answered without waiting for `release`
        self.appended: list[str] = []
        self.batch_calls = 0
        self.batch_code = batch_code
        self.callers: list[tuple[str, str]] = []

    def _caller(self, method: str, context: Any) -> None:
        caller = dict(context.invocation_metadata()).get("caller", "")
        self.callers.append((method, caller))

    async def append(self, request: message_service_pb2.AppendMessagesRequest, context: Any) -> Any:
        self._caller("AppendMessages", context)
        if request.session_id not in self.free:
            await self.release.wait()
        self.appended.append(request.session_id)
        return message_service_pb2.AppendMessagesResponse(messages=request.messages)

    async def batch(self, request: message_service_pb2.BatchAppendMessagesRequest, context: Any) -> Any:
        self.batch_calls += 1
        self._caller("BatchAppendMessages", context)
        if self.batch_code is not None:
            await context.abort(self.batch_code, "refused")
        self.appended.extend(r.session_id for r in request.requests)
        return message_service_pb2.BatchAppendMessagesResponse(
            outcomes=[
                message_service_pb2.AppendOutcome(
                    response=message_service_pb2.AppendMessagesResponse(messages=r.messages)
                )
                for r in request.requests
            ]
        )

    async def start(self) -> tuple[grpc.aio.Server, str]:
        server = grpc.aio.server()
        handlers = {
            "AppendMessages": grpc.unary_unary_rpc_method_handler(
                self.append,
                request_deserializer=message_service_pb2.AppendMessagesRequest.FromString,
                response_serializer=message_service_pb2.AppendMessagesResponse.SerializeToString,
            ),
            "BatchAppendMessages": grpc.unary_unary_rpc_method_handler(
                self.batch,
                request_deserializer=message_service_pb2.BatchAppendMessagesRequest.FromString,
                response_serializer=message_service_pb2.BatchAppendMessagesResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("agentsessions.v1.MessageService", handlers)]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, f"127.0.0.1:{port}"


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def test_an_append_given_up_before_its_batch_leaves_is_never_sent() -> None:
    fake = HeldServer()
    server, target = await fake.start()
    try:
        async with AsyncSessionsClient(target) as client:
            first = asyncio.create_task(
                client.append_messages(session_id="first", messages=[text("a", "m-a")])
            )
            await _until(lambda: client._batcher is not None and client._batcher._in_flight == 1)
            held = [
                asyncio.create_task(client.append_messages(session_id=s, messages=[text("b", "m-b")]))
                for s in ("gone", "kept-1", "kept-2")
            ]
            await _until(lambda: client._batcher is not None and len(client._batcher._held) == 3)
            held[0].cancel()
            fake.release.set()
            await first
            kept = await asyncio.gather(*held[1:])
            assert [r.messages[0].parts[0].text.text for r in kept] == ["b", "b"]
            with pytest.raises(asyncio.CancelledError):
                await held[0]
    finally:
        await server.stop(0)
    assert fake.appended == ["first", "kept-1", "kept-2"]
    assert fake.batch_calls == 1


async def test_a_server_without_batches_gets_appends_one_by_one() -> None:
    fake = HeldServer(batch_code=grpc.StatusCode.UNIMPLEMENTED)
    server, target = await fake.start()
    try:
        async with AsyncSessionsClient(target) as client:
            first = asyncio.create_task(client.append_messages(session_id="s0", messages=[text("a", "m-a")]))
            await _until(lambda: client._batcher is not None and client._batcher._in_flight == 1)
            rest = [
                asyncio.create_task(client.append_messages(session_id=f"s{i}", messages=[text("a", "m-a")]))
                for i in range(1, 4)
            ]
            await _until(lambda: client._batcher is not None and len(client._batcher._held) == 3)
            fake.release.set()
            await asyncio.gather(first, *rest)
            # Remembered: later overlapping appends go one by one without asking again.
            await asyncio.gather(
                *(client.append_messages(session_id=f"t{i}", messages=[text("a", "m-a")]) for i in range(3))
            )
    finally:
        await server.stop(0)
    assert sorted(fake.appended) == ["s0", "s1", "s2", "s3", "t0", "t1", "t2"]
    assert fake.batch_calls == 1


async def test_appends_held_when_the_client_closes_fail_at_once() -> None:
    fake = HeldServer()
    server, target = await fake.start()
    try:
        client = AsyncSessionsClient(target)
        first = asyncio.create_task(client.append_messages(session_id="first", messages=[text("a", "m-a")]))
        await _until(lambda: client._batcher is not None and client._batcher._in_flight == 1)
        held = [
            asyncio.create_task(client.append_messages(session_id=f"h{i}", messages=[text("b", "m-b")]))
            for i in range(2)
        ]
        await _until(lambda: client._batcher is not None and len(client._batcher._held) == 2)
        await client.close()
        outcomes = await asyncio.wait_for(asyncio.gather(first, *held, return_exceptions=True), 10)
        assert all(isinstance(o, errors.Cancelled) for o in outcomes), outcomes
        assert all(o.reason == errors.CLIENT_CLOSED for o in outcomes if isinstance(o, errors.Cancelled))
    finally:
        fake.release.set()
        await server.stop(0)


class CallerMetadata(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends the sender's `CALLER` context variable as metadata (as a tracing interceptor sends its span)."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        details = client_call_details._replace(metadata=[("caller", CALLER.get())])
        return await continuation(details, request)


async def _held_behind_first(client: AsyncSessionsClient, held: list[str]) -> list[asyncio.Task[Any]]:
    """Starts an append to "first", which the fake server holds, then appends to `held` (each with the
    caller context variable set to its session id), which the client holds behind it."""

    async def append(session_id: str) -> Any:
        CALLER.set(session_id)
        return await client.append_messages(session_id=session_id, messages=[text("a", "m-a")])

    first = asyncio.create_task(append("first"))
    await _until(lambda: client._batcher is not None and client._batcher._in_flight == 1)
    tasks = [asyncio.create_task(append(s)) for s in held]
    await _until(lambda: client._batcher is not None and len(client._batcher._held) == len(held))
    return [first, *tasks]


async def test_a_batch_is_sent_in_no_callers_context_and_a_lone_append_in_its_own() -> None:
    fake = HeldServer(batch_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    server, target = await fake.start()
    channel = grpc.aio.insecure_channel(target, interceptors=[CallerMetadata()])
    try:
        async with AsyncSessionsClient(channel=channel) as client:
            tasks = await _held_behind_first(client, ["b", "c"])
            fake.release.set()
            await asyncio.gather(*tasks)
    finally:
        await channel.close()
        await server.stop(0)
    # The batch belongs to b and c: it carries neither first's context nor theirs. Refused as too large
    # an answer, its entries went again one by one, each in its own caller's context.
    assert fake.callers[0] == ("AppendMessages", "first")
    assert fake.callers[1] == ("BatchAppendMessages", "")
    assert sorted(fake.callers[2:]) == [("AppendMessages", "b"), ("AppendMessages", "c")]
    assert sorted(fake.appended) == ["b", "c", "first"]


async def test_a_lone_writer_sends_each_append_from_its_own_task() -> None:
    """One caller appending in turn never has its appends held: each goes from the caller's own task, so
    cancelling one cancels its call, and the next leaves at once instead of waiting behind the call
    given up."""
    fake = HeldServer(free=frozenset({"one", "three"}))
    server, target = await fake.start()
    channel = grpc.aio.insecure_channel(target, interceptors=[CallerMetadata()])

    async def append(session_id: str) -> Any:
        return await client.append_messages(session_id=session_id, messages=[text("a", f"m-{session_id}")])

    async def writer() -> None:
        CALLER.set("lone")
        await append("one")
        await append("two")  # right after the first is answered, as a caller writing in turn does

    try:
        async with AsyncSessionsClient(channel=channel, timeout=None) as client:
            given_up = asyncio.create_task(writer())
            await _until(lambda: len(fake.callers) == 2)
            given_up.cancel()
            with pytest.raises(asyncio.CancelledError):
                await given_up
            CALLER.set("lone")
            await asyncio.wait_for(append("three"), 10)  # not held behind the call given up
    finally:
        await channel.close()
        await server.stop(0)
    assert fake.callers == [("AppendMessages", "lone")] * 3
    assert fake.appended == ["one", "three"]  # the call given up was cancelled on the server too
    assert client._batcher is not None and client._batcher._in_flight == 0


async def test_a_borrowed_channel_client_closed_fails_held_appends() -> None:
    fake = HeldServer()
    server, target = await fake.start()
    channel = grpc.aio.insecure_channel(target)
    try:
        client = AsyncSessionsClient(channel=channel)
        tasks = await _held_behind_first(client, ["b", "c"])
        await client.close()  # the channel stays open: the first append goes on
        with pytest.raises(errors.Cancelled):
            await client.append_messages(session_id="d", messages=[text("a", "m-a")])
        fake.release.set()
        first, *held = await asyncio.gather(*tasks, return_exceptions=True)
        assert not isinstance(first, BaseException)  # under way before the close: it finished
        assert all(isinstance(h, errors.Cancelled) and h.reason == errors.CLIENT_CLOSED for h in held), held
    finally:
        await channel.close()
        await server.stop(0)
    assert "b" not in fake.appended and "c" not in fake.appended
