"""The agent backends through the published client against a real server: a remote agent written with
the client package's helper (`agentsessions.agent`), an OpenAI-compatible endpoint served by a local HTTP
server speaking the real streaming wire format, and agents declared in the config file."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import DatabaseTarget, make_settings
from turn_support import (
    CANCELLED,
    CLIENT_TOOL_CALLS,
    ERROR,
    LENGTH,
    STOP,
    ChatCompletionsServer,
    Reader,
    Reply,
    chunk,
    kinds,
    message_text,
    only,
    reason,
    text_of,
    usage_chunk,
)

from agentsessions import AgentOrigin, AsyncSessionsClient, MessageStatus, Role, SessionStatus, errors
from agentsessions.agent import client_tool, serve_agent
from agentsessions.agent import text_of as request_text
from agentsessions.v1 import agent_service_pb2, events_pb2, message_pb2
from sessiond.agents_file import ConfigError
from sessiond.domain.clock import ManualClock
from sessiond.server import RunningServer, start_server

RespondRequest = agent_service_pb2.RespondRequest


async def history(client: AsyncSessionsClient, session_id: str) -> list[message_pb2.Message]:
    return [m async for m in await client.list_messages(session_id=session_id)]


async def session_of(client: AsyncSessionsClient, agent: dict[str, Any], unique: str, name: str) -> str:
    agent_id = f"{unique}-{name}"
    await client.create_agent(agent={**agent, "agent_id": agent_id})
    session = await client.create_session(agent_id=agent_id, session_id=f"{unique}/{name}")
    return session.session_id


async def run(client: AsyncSessionsClient, session_id: str, **kwargs: Any) -> list[events_pb2.TurnEvent]:
    return [e async for e in client.execute(session_id=session_id, **kwargs)]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- remote agents ----------------------------------------------------------------------------------------


async def test_remote_agent_relays_every_kind_of_event(client: AsyncSessionsClient, unique: str) -> None:
    seen: list[RespondRequest] = []

    async def agent(request: RespondRequest) -> AsyncIterator[Any]:
        seen.append(request)
        yield events_pb2.ReasoningDelta(text="Let me look. ")
        yield events_pb2.ToolCallEvent(
            call=message_pb2.ToolCallPart(
                call_id=f"lookup-{request.turn_id}", name="lookup", arguments='{"q":1}'
            ),
            result=message_pb2.ToolResultPart(output="42"),
        )
        for word in request_text(request.message).split():
            yield word.upper() + " "
        yield events_pb2.Usage(input_tokens=7, output_tokens=2, total_tokens=9)

    async with await serve_agent(agent) as server:
        sid = await session_of(
            client, {"remote": {"target": server.target}, "history_window": 3}, unique, "remote"
        )
        for text in ("one", "two"):
            await client.append_text(session_id=sid, role="user", text=text)
        events = await run(client, sid, text="hello there")

    assert kinds(events) == [
        "turn_started",
        "reasoning_delta",
        "tool_call",
        "text_delta",
        "text_delta",
        "usage",
        "message_completed",
        "turn_finished",
    ]
    assert text_of(events) == "HELLO THERE "
    assert only(events, "tool_call").result.call_id == f"lookup-{events[0].turn_id}"
    assert only(events, "usage").total_tokens == 9
    assert reason(events) == STOP
    stored = only(events, "message_completed").message
    assert [p.WhichOneof("kind") for p in stored.parts] == ["reasoning", "tool_call", "tool_result", "text"]

    (request,) = seen
    assert request.turn_id == events[0].turn_id
    assert request.session.session_id == sid
    assert request.message.message_id == events[0].turn_started.user_message.message_id
    # The history window: the agent's last 3 messages, oldest first, the new user message last.
    assert [message_text(m) for m in request.history] == ["one", "two", "hello there"]


async def test_remote_client_tool_request_and_continue(client: AsyncSessionsClient, unique: str) -> None:
    async def agent(request: RespondRequest) -> AsyncIterator[Any]:
        if request.HasField("continue_turn"):
            yield f"it is {request.continue_turn.tool_results[0].output}"
            return
        yield "Let me check. "
        yield client_tool("get_time", {"tz": "UTC"}, call_id=f"time-{request.turn_id}")

    async with await serve_agent(agent) as server:
        sid = await session_of(client, {"remote": {"target": server.target}}, unique, "tools")
        first = await run(client, sid, text="what time is it?")
        assert reason(first) == CLIENT_TOOL_CALLS
        (call,) = only(first, "client_tool_request").calls
        assert (call.name, json.loads(call.arguments), call.client_side) == ("get_time", {"tz": "UTC"}, True)
        result = {"call_id": call.call_id, "name": call.name, "output": "noon"}
        second = await run(client, sid, continue_turn={"turn_id": first[0].turn_id, "tool_results": [result]})
    assert text_of(second) == "it is noon"
    assert reason(second) == STOP


async def test_remote_agent_failure_mid_stream(client: AsyncSessionsClient, unique: str) -> None:
    async def agent(request: RespondRequest) -> AsyncIterator[Any]:
        yield "half an "
        yield "answer"
        raise RuntimeError("the model crashed")

    async with await serve_agent(agent) as server:
        sid = await session_of(client, {"remote": {"target": server.target}}, unique, "crash")
        events = await run(client, sid, text="go")
    error = only(events, "error")
    assert error.reason == "AGENT_UNAVAILABLE"
    assert error.retryable is False
    assert "the model crashed" in error.message
    answer = only(events, "message_completed").message
    assert (message_text(answer), answer.status) == ("half an answer", MessageStatus.MESSAGE_STATUS_ERROR)
    assert reason(events) == ERROR
    assert kinds(events).index("error") < kinds(events).index("message_completed")


ToolCallPart = message_pb2.ToolCallPart


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        (
            client_tool("lookup", call_id="c" * 200),
            "calls[0].call_id: must be at most 128 characters, got 200",
        ),
        (
            client_tool("lookup", call_id="call\x00id"),
            "calls[0].call_id: must not contain control characters",
        ),
        (
            events_pb2.ClientToolRequest(
                calls=[ToolCallPart(call_id="ok", name="lookup"), ToolCallPart(call_id="unnamed")]
            ),
            "client_tool_request.calls[1].name: is required",
        ),
        (
            events_pb2.ToolCallEvent(
                call=ToolCallPart(call_id="c" * 129, name="lookup"),
                result=message_pb2.ToolResultPart(output="42"),
            ),
            "tool_call.call.call_id: must be at most 128 characters, got 129",
        ),
        (
            events_pb2.ToolCallEvent(
                call=ToolCallPart(call_id="ok", name="lookup"),
                result=message_pb2.ToolResultPart(call_id="r\n1", output="42"),
            ),
            "tool_call.result.call_id: must not contain control characters",
        ),
        (
            events_pb2.ClientToolRequest(
                calls=[ToolCallPart(call_id="d1", name="a"), ToolCallPart(call_id="d1", name="b")]
            ),
            "client_tool_request.calls[1].call_id: 'd1' names another call of this turn",
        ),
    ],
    ids=[
        "call-id-too-long",
        "call-id-with-nul",
        "call-without-name",
        "server-call-id",
        "result-call-id",
        "call-id-twice-in-a-request",
    ],
)
async def test_an_invalid_tool_call_from_the_agent_ends_the_turn_and_keeps_its_output(
    client: AsyncSessionsClient, unique: str, output: Any, problem: str
) -> None:
    """A tool call the message store or a continue would refuse from a caller ends the turn as an agent
    failure: the output before it is stored, nothing of the bad call is, and the session goes on."""

    async def agent(request: RespondRequest) -> AsyncIterator[Any]:
        if request_text(request.message) != "go":
            yield "fine"
            return
        yield "partial answer "
        yield output
        yield "never relayed"

    async with await serve_agent(agent) as server:
        sid = await session_of(client, {"remote": {"target": server.target}}, unique, "badcall")
        events = await run(client, sid, text="go")
        assert kinds(events) == ["turn_started", "text_delta", "error", "message_completed", "turn_finished"]
        error = only(events, "error")
        assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", False)
        assert "invalid tool call" in error.message and problem in error.message, error.message
        assert reason(events) == ERROR
        answer = only(events, "message_completed").message
        assert [p.WhichOneof("kind") for p in answer.parts] == ["text"]
        assert (message_text(answer), answer.status) == (
            "partial answer ",
            MessageStatus.MESSAGE_STATUS_ERROR,
        )

        after = await run(client, sid, text="again", multitask_strategy="reject")
    assert (text_of(after), reason(after)) == ("fine", STOP)
    stored = await history(client, sid)
    assert [(m.role, message_text(m), m.status) for m in stored] == [
        (Role.ROLE_USER, "go", MessageStatus.MESSAGE_STATUS_COMPLETE),
        (Role.ROLE_ASSISTANT, "partial answer ", MessageStatus.MESSAGE_STATUS_ERROR),
        (Role.ROLE_USER, "again", MessageStatus.MESSAGE_STATUS_COMPLETE),
        (Role.ROLE_ASSISTANT, "fine", MessageStatus.MESSAGE_STATUS_COMPLETE),
    ]


async def test_an_answer_is_cut_at_the_message_size_limit(database: DatabaseTarget, unique: str) -> None:
    """An agent's answer may not outgrow the message a caller may append: past the limit the agent is
    stopped and the turn finishes LENGTH with what came before, and the session's history and later
    turns stay readable."""

    async def agent(request: RespondRequest) -> AsyncIterator[Any]:
        if request_text(request.message) != "go":
            yield "short"
            return
        for letter in "abcdefgh":
            yield letter * 1000

    running = await start_server(make_settings(database, max_message_bytes=4096))
    try:
        async with (
            AsyncSessionsClient(f"127.0.0.1:{running.port}") as client,
            await serve_agent(agent) as server,
        ):
            sid = await session_of(client, {"remote": {"target": server.target}}, unique, "big")
            events = await run(client, sid, text="go")
            assert reason(events) == LENGTH
            assert text_of(events) == "a" * 1000 + "b" * 1000 + "c" * 1000 + "d" * 1000
            stored = await history(client, sid)
            assert message_text(stored[-1]) == text_of(events)
            assert len(stored[-1].SerializeToString()) <= 4096 + 200  # the parts alone are under 4096
            after = await run(client, sid, text="again")
            assert (text_of(after), reason(after)) == ("short", STOP)
    finally:
        await running.stop(0)


async def test_a_frame_that_does_not_decode_ends_the_turn_as_an_agent_failure(
    client: AsyncSessionsClient, unique: str
) -> None:
    """grpc.aio hands over a frame it cannot decode as None: the turn ends as a malformed stream does
    (not retryable), keeping what came before."""
    good = agent_service_pb2.RespondResponse(text_delta=events_pb2.TextDelta(text="before "))
    frame = good.SerializeToString()

    async def respond(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield frame
        yield b"\x0a\x04\x12\x02\xff\xfe"  # a text delta whose text is not UTF-8
        yield frame

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "agentsessions.v1.AgentService", {"Respond": grpc.unary_stream_rpc_method_handler(respond)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        sid = await session_of(client, {"remote": {"target": f"127.0.0.1:{port}"}}, unique, "garbled")
        events = await run(client, sid, text="go")
    finally:
        await server.stop(0)
    error = only(events, "error")
    assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", False)
    assert "does not decode" in error.message
    assert reason(events) == ERROR
    assert message_text(only(events, "message_completed").message) == "before "


async def test_unreachable_agent_is_retryable_and_keeps_the_user_message(
    client: AsyncSessionsClient, unique: str
) -> None:
    sid = await session_of(client, {"remote": {"target": f"127.0.0.1:{closed_port()}"}}, unique, "gone")
    events = await run(client, sid, text="anyone there?")
    assert kinds(events) == ["turn_started", "error", "turn_finished"]
    error = only(events, "error")
    assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", True)
    assert reason(events) == ERROR
    stored = await history(client, sid)
    assert [(m.role, message_text(m)) for m in stored] == [(Role.ROLE_USER, "anyone there?")]
    session = await client.get_session(session_id=sid)
    assert session.status == SessionStatus.SESSION_STATUS_ACTIVE
    assert session.message_count == 1


async def test_stopping_a_turn_cancels_the_remote_call(client: AsyncSessionsClient, unique: str) -> None:
    cancelled = asyncio.Event()

    async def agent(request: RespondRequest) -> AsyncIterator[Any]:
        yield "working "
        try:
            await asyncio.Event().wait()
            yield "never"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with await serve_agent(agent) as server:
        sid = await session_of(client, {"remote": {"target": server.target}}, unique, "stop")
        reader = Reader(client.execute(session_id=sid, text="go"))
        await reader.until_kind("text_delta")
        await client.stop_turn(session_id=sid)
        tail = await reader.rest()
        await cancelled.wait()
    assert reason(tail) == CANCELLED
    answer = only(tail, "message_completed").message
    assert (message_text(answer), answer.status) == ("working ", MessageStatus.MESSAGE_STATUS_INTERRUPTED)


async def test_on_disconnect_continue_lets_the_turn_finish(client: AsyncSessionsClient, unique: str) -> None:
    gate = asyncio.Event()

    async def agent(request: RespondRequest) -> AsyncIterator[Any]:
        text = request_text(request.message)
        if text == "slow":
            yield "first "
            await gate.wait()
            yield "second"
        else:
            yield text

    async with await serve_agent(agent) as server:
        sid = await session_of(client, {"remote": {"target": server.target}}, unique, "continue")
        reader = Reader(client.execute(session_id=sid, text="slow", on_disconnect="continue"))
        await reader.until_kind("text_delta")
        reader.stream.cancel()
        gate.set()
        after = await run(client, sid, text="next", multitask_strategy="enqueue")
    assert reason(after) == STOP
    stored = await history(client, sid)
    assert [(message_text(m), m.status) for m in stored] == [
        ("slow", MessageStatus.MESSAGE_STATUS_COMPLETE),
        ("first second", MessageStatus.MESSAGE_STATUS_COMPLETE),
        ("next", MessageStatus.MESSAGE_STATUS_COMPLETE),
        ("next", MessageStatus.MESSAGE_STATUS_COMPLETE),
    ]


# --- OpenAI-compatible chat completions -------------------------------------------------------------------


@pytest.fixture
async def endpoint() -> AsyncIterator[ChatCompletionsServer]:
    async with ChatCompletionsServer() as server:
        yield server


def openai_agent(endpoint: ChatCompletionsServer, **settings: Any) -> dict[str, Any]:
    return {"openai_chat": {"base_url": endpoint.base_url, "model": "test-model", **settings}}


async def test_openai_chat_streams_text_reasoning_and_usage(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test-123")
    agent = openai_agent(
        endpoint, api_key_env="TEST_LLM_KEY", system_prompt="Be brief.", max_tokens=64, timeout_seconds=30
    )
    sid = await session_of(client, agent, unique, "oai")
    endpoint.replies.append(
        Reply(
            chunks=[
                chunk(role="assistant", content=""),
                chunk(reasoning="The user greets. "),
                chunk(content="Hello"),
                chunk(content=", world!"),
                chunk(finish="stop"),
                usage_chunk(12, 4),
            ]
        )
    )
    events = await run(client, sid, text="Hi!")
    assert kinds(events) == [
        "turn_started",
        "reasoning_delta",
        "text_delta",
        "text_delta",
        "usage",
        "message_completed",
        "turn_finished",
    ]
    assert text_of(events) == "Hello, world!"
    assert text_of(events, "reasoning_delta") == "The user greets. "
    usage = only(events, "usage")
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (12, 4, 16)
    assert reason(events) == STOP

    (request,) = endpoint.received
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-test-123"
    assert request.body["model"] == "test-model"
    assert request.body["stream"] is True
    assert request.body["max_tokens"] == 64
    assert request.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
    ]


async def test_openai_chat_tool_calls_become_client_tool_requests(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    sid = await session_of(client, openai_agent(endpoint, tools=tools), unique, "oaitools")
    call_id = f"call_{unique}"
    endpoint.replies.append(
        Reply(
            chunks=[
                chunk(role="assistant", content=None),
                chunk(
                    tool_calls=[
                        {
                            "index": 0,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                ),
                chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
                chunk(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
                chunk(finish="tool_calls"),
                usage_chunk(30, 9),
            ]
        )
    )
    first = await run(client, sid, text="Weather in Paris?")
    assert reason(first) == CLIENT_TOOL_CALLS
    (call,) = only(first, "client_tool_request").calls
    assert (call.call_id, call.name, call.arguments, call.client_side) == (
        call_id,
        "get_weather",
        '{"city": "Paris"}',
        True,
    )
    assert endpoint.received[0].body["tools"] == tools

    endpoint.replies.append(Reply(chunks=[chunk(content="Sunny in Paris."), chunk(finish="stop")]))
    result = {"call_id": call_id, "name": "get_weather", "output": '{"sky": "sunny"}'}
    second = await run(client, sid, continue_turn={"turn_id": first[0].turn_id, "tool_results": [result]})
    assert text_of(second) == "Sunny in Paris."
    assert reason(second) == STOP
    assert endpoint.received[1].body["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"sky": "sunny"}'},
    ]


async def test_openai_chat_length_and_unanswered_calls(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    sid = await session_of(client, openai_agent(endpoint), unique, "oailen")
    endpoint.replies.append(
        Reply(
            chunks=[
                chunk(tool_calls=[{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]),
                chunk(finish="tool_calls"),
            ]
        )
    )
    assert reason(await run(client, sid, text="first")) == CLIENT_TOOL_CALLS
    # Not continued: the next request leaves the unanswered call out (endpoints refuse it), and the two
    # user messages then in a row go as one (templates that want the roles to alternate refuse them).
    endpoint.replies.append(Reply(chunks=[chunk(content="and so"), chunk(finish="length")]))
    events = await run(client, sid, text="second")
    assert reason(events) == LENGTH
    assert only(events, "message_completed").message.status == MessageStatus.MESSAGE_STATUS_COMPLETE
    assert endpoint.received[1].body["messages"] == [{"role": "user", "content": "first\n\nsecond"}]


@pytest.mark.parametrize(
    ("reply", "retryable"),
    [
        (Reply(status=503, body={"error": {"message": "overloaded", "type": "server_error"}}), True),
        (Reply(status=429, body={"error": {"message": "rate limited"}}), True),
        (Reply(status=400, body={"error": {"message": "bad request: context too long"}}), False),
        (Reply(chunks=[chunk(content="Hel")], done=False), True),  # cut short
        (Reply(chunks=[chunk(content="Hel")], done=False, drop=True), True),  # the connection dropped
        (Reply(chunks=[chunk(content="Hel"), {"error": {"message": "backend died"}}]), False),
    ],
)
async def test_openai_chat_failures(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str, reply: Reply, retryable: bool
) -> None:
    sid = await session_of(client, openai_agent(endpoint), unique, "oaierr")
    endpoint.replies.append(reply)
    events = await run(client, sid, text="hello?")
    error = only(events, "error")
    assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", retryable)
    assert reason(events) == ERROR
    if reply.status != 200:
        assert str(reply.status) in error.message
    stored = await history(client, sid)
    assert stored[0].role == Role.ROLE_USER and message_text(stored[0]) == "hello?"
    if reply.chunks:
        assert (message_text(stored[1]), stored[1].status) == ("Hel", MessageStatus.MESSAGE_STATUS_ERROR)
    assert (await client.get_session(session_id=sid)).status == SessionStatus.SESSION_STATUS_ACTIVE


async def test_openai_chat_connection_dropped_after_the_finish_reason_keeps_the_answer(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    """A proxy or server that closes the connection once the answer's finish_reason is out, before
    `[DONE]` (and before a trailing usage chunk): the answer is whole, so the turn finishes as it says,
    not as a retryable error that would pay for the same answer again."""
    sid = await session_of(client, openai_agent(endpoint), unique, "oaidrop")
    endpoint.replies.append(
        Reply(
            chunks=[chunk(content="Hello"), chunk(content=" there"), chunk(finish="stop")],
            done=False,
            drop=True,
        )
    )
    events = await run(client, sid, text="hi")
    assert kinds(events) == ["turn_started", "text_delta", "text_delta", "message_completed", "turn_finished"]
    assert reason(events) == STOP
    answer = (await history(client, sid))[1]
    assert (message_text(answer), answer.status) == ("Hello there", MessageStatus.MESSAGE_STATUS_COMPLETE)


async def test_openai_chat_sends_user_messages_in_a_row_as_one(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    """Mistral's and Gemma's chat templates (as vLLM and llama.cpp run them) refuse a request whose roles do
    not alternate; a history with user messages in a row (appended by the caller, or left by a turn that
    failed before it answered) goes with them joined."""
    sid = await session_of(client, openai_agent(endpoint, system_prompt="Be brief."), unique, "oaialt")

    def said(role: str, text: str) -> dict[str, Any]:
        return {"role": role, "parts": [{"text": {"text": text}}]}

    await client.append_messages(
        session_id=sid,
        messages=[said("ROLE_USER", "a"), said("ROLE_ASSISTANT", "x"), said("ROLE_USER", "b")],
    )
    endpoint.replies.append(Reply(status=503, body={"error": {"message": "loading"}}))
    assert only(await run(client, sid, text="c"), "error").retryable
    endpoint.replies.append(Reply(chunks=[chunk(content="ok"), chunk(finish="stop")]))
    assert reason(await run(client, sid, text="d")) == STOP
    assert endpoint.received[-1].body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "b\n\nc\n\nd"},
    ]
    assert [message_text(m) for m in await history(client, sid)] == ["a", "x", "b", "c", "d", "ok"]
    # A trigger after a user message joins it too.
    await client.append_messages(session_id=sid, messages=[said("ROLE_USER", "e")])
    endpoint.replies.append(Reply(chunks=[chunk(content="done"), chunk(finish="stop")]))
    assert reason(await run(client, sid, trigger={"name": "t", "input": {"x": 1}})) == STOP
    assert endpoint.received[-1].body["messages"][-2:] == [
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": 'e\n\nTrigger t: {"x": 1.0}'},
    ]


async def test_openai_chat_timeout_bounds_the_whole_request_not_each_read(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    """A server that keeps the stream alive with comments and never finishes: each read is quick, but the
    turn ends once timeout_seconds have passed since the request, as a retryable failure that keeps what
    came. (One second of real time: the limit is on the event loop's clock, not the service's.)"""
    sid = await session_of(client, openai_agent(endpoint, timeout_seconds=1), unique, "oaislow")
    alive = [b": keep-alive\n\n"] * 40  # 4 s of them, then the end of the stream without an answer
    endpoint.replies.append(Reply(raw=[*sse(chunk(content="Hel")), *alive], interval=0.1))
    events = await run(client, sid, text="hello?")
    error = only(events, "error")
    assert (error.reason, error.retryable, reason(events)) == ("AGENT_UNAVAILABLE", True, ERROR)
    assert "within 1 s" in error.message
    answer = only(events, "message_completed").message
    assert (message_text(answer), answer.status) == ("Hel", MessageStatus.MESSAGE_STATUS_ERROR)


_NO_MAX_TOKENS = {  # OpenAI's answer to max_tokens for o1, o3 and gpt-5
    "error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
}


async def test_openai_chat_asks_again_with_max_completion_tokens_when_max_tokens_is_refused(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    """vLLM, Ollama and llama.cpp servers take `max_tokens`; OpenAI's reasoning models refuse it and take
    `max_completion_tokens`. The turn asks once more that way, with the same limit."""
    sid = await session_of(client, openai_agent(endpoint, max_tokens=64), unique, "oaimct")
    endpoint.replies += [
        Reply(status=400, body=_NO_MAX_TOKENS),
        Reply(chunks=[chunk(content="ok"), chunk(finish="stop")]),
    ]
    events = await run(client, sid, text="hi")
    assert reason(events) == STOP and text_of(events) == "ok"
    first, second = (r.body for r in endpoint.received[-2:])
    assert (first.get("max_tokens"), "max_completion_tokens" in first) == (64, False)
    assert (second.get("max_completion_tokens"), "max_tokens" in second) == (64, False)
    assert first["messages"] == second["messages"]
    # The next turn of the agent sends max_completion_tokens at once.
    endpoint.replies.append(Reply(chunks=[chunk(content="again"), chunk(finish="stop")]))
    assert reason(await run(client, sid, text="more")) == STOP
    third = endpoint.received[-1].body
    assert (third.get("max_completion_tokens"), "max_tokens" in third) == (64, False)


async def test_openai_chat_other_bad_requests_are_not_sent_again(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    sid = await session_of(client, openai_agent(endpoint, max_tokens=64), unique, "oai400")
    other = {"error": {"message": "max_tokens is too large: 64 > 8", "param": "max_tokens", "code": None}}
    endpoint.replies += [
        Reply(status=400, body=other),
        Reply(chunks=[chunk(content="no"), chunk(finish="stop")]),
    ]
    before = len(endpoint.received)
    events = await run(client, sid, text="hi")
    error = only(events, "error")
    assert (error.reason, error.retryable, reason(events)) == ("AGENT_UNAVAILABLE", False, ERROR)
    assert "too large" in error.message
    assert len(endpoint.received) == before + 1
    endpoint.replies.clear()


def sse(*events: dict[str, Any] | str, end: bytes = b"\n\n", prefix: bytes = b"data: ") -> list[bytes]:
    return [prefix + (e if isinstance(e, str) else json.dumps(e)).encode() + end for e in events]


async def test_openai_chat_reads_every_framing_of_server_sent_events(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    """What the servers send between and around events: comments to keep the connection alive (OpenRouter's
    `: OPENROUTER PROCESSING`), `event:` lines, `data:` without a space, CRLF line ends, events and UTF-8
    characters split across writes, an event with no data (which the SSE spec says is not dispatched), and
    bytes after `[DONE]`."""
    sid = await session_of(client, openai_agent(endpoint), unique, "oaisse")
    text = "h\u00e9llo \U0001f600 \u4e16\u754c"
    stream = b"".join(
        [
            b": ping\r\n\r\n",
            *sse(chunk(role="assistant", content=""), end=b"\r\n\r\n", prefix=b"data:"),
            b"event: message\n",
            *sse(chunk(content=text)),
            b"data:\n\n",
            b"data: \r\n\r\n",
            *sse(chunk(content="!"), chunk(finish="stop"), "[DONE]"),
            b"data: {not json\n\n",
        ]
    )
    endpoint.replies.append(Reply(raw=[stream[i : i + 5] for i in range(0, len(stream), 5)]))
    events = await run(client, sid, text="hi")
    assert kinds(events) == ["turn_started", "text_delta", "text_delta", "message_completed", "turn_finished"]
    assert text_of(events) == text + "!"
    assert reason(events) == STOP


def call_piece(
    index: int | None = None, call_id: str = "", name: str = "", arguments: str = ""
) -> dict[str, Any]:
    piece: dict[str, Any] = {"function": {"arguments": arguments}}
    if index is not None:
        piece["index"] = index
    if call_id:
        piece.update(id=call_id, type="function")
    if name:
        piece["function"]["name"] = name
    return piece


@pytest.mark.parametrize(
    "pieces",
    [
        # Ollama and some vLLM tool parsers: each call whole, in a chunk of its own, all under index 0.
        [[call_piece(0, "c1", "f", '{"a": 1}')], [call_piece(0, "c2", "g", '{"b": 2}')]],
        # Gemini: no index; a call's arguments may still come in fragments after its id and name.
        [
            [call_piece(None, "c1", "f")],
            [call_piece(arguments='{"a":')],
            [call_piece(arguments=" 1}")],
            [call_piece(None, "c2", "g", '{"b": 2}')],
        ],
        # OpenAI: two calls interleaved by index, the id and name only in the first fragment.
        [
            [call_piece(0, "c1", "f")],
            [call_piece(1, "c2", "g", '{"b"')],
            [call_piece(0, arguments='{"a": 1}')],
            [call_piece(1, arguments=": 2}")],
        ],
    ],
    ids=["whole-calls-under-index-0", "no-index", "interleaved-by-index"],
)
async def test_openai_chat_parallel_tool_calls_as_each_server_streams_them(
    client: AsyncSessionsClient,
    endpoint: ChatCompletionsServer,
    unique: str,
    pieces: list[list[dict[str, Any]]],
) -> None:
    sid = await session_of(client, openai_agent(endpoint), unique, "oaipar")
    chunks = [chunk(tool_calls=p) for p in pieces]
    endpoint.replies.append(Reply(chunks=[*chunks, chunk(finish="tool_calls")]))
    events = await run(client, sid, text="both")
    assert reason(events) == CLIENT_TOOL_CALLS
    calls = only(events, "client_tool_request").calls
    assert [(c.call_id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("c1", "f", {"a": 1}),
        ("c2", "g", {"b": 2}),
    ]


async def test_openai_chat_cut_off_inside_a_tool_call_finishes_length(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    """At `max_tokens` in the middle of a call's arguments the call is cut too: the turn ends LENGTH with
    the text before it, and asks the caller to run nothing."""
    sid = await session_of(client, openai_agent(endpoint, max_tokens=16), unique, "oaicut")
    endpoint.replies.append(
        Reply(
            chunks=[
                chunk(content="Let me look. "),
                chunk(tool_calls=[call_piece(0, "c1", "search", '{"query": "the wea')]),
                chunk(finish="length"),
            ]
        )
    )
    events = await run(client, sid, text="weather?")
    assert "client_tool_request" not in kinds(events)
    assert reason(events) == LENGTH
    answer = only(events, "message_completed").message
    assert (message_text(answer), answer.status) == ("Let me look. ", MessageStatus.MESSAGE_STATUS_COMPLETE)
    assert [p.WhichOneof("kind") for p in answer.parts] == ["text"]


@pytest.mark.parametrize("finish", ["abort", "error"])
async def test_openai_chat_answer_the_endpoint_gave_up_on_is_an_error(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str, finish: str
) -> None:
    """vLLM finishes an answer its engine aborted with `abort`, OpenRouter one its provider failed with
    `error`: not a complete answer."""
    sid = await session_of(client, openai_agent(endpoint), unique, "oaiabort")
    endpoint.replies.append(Reply(chunks=[chunk(content="Hel"), chunk(finish=finish)]))
    events = await run(client, sid, text="hello?")
    error = only(events, "error")
    assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", True)
    assert finish in error.message
    assert reason(events) == ERROR
    answer = only(events, "message_completed").message
    assert (message_text(answer), answer.status) == ("Hel", MessageStatus.MESSAGE_STATUS_ERROR)


@pytest.mark.parametrize(
    ("reply", "retryable", "said"),
    [
        # llama.cpp and OpenRouter report a failure mid-stream with the HTTP status it stands for.
        (
            Reply(
                chunks=[
                    chunk(content="Hel"),
                    {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                ]
            ),
            True,
            "Loading model",
        ),
        # OpenAI's mid-stream failure: no code, type server_error.
        (
            Reply(
                chunks=[
                    chunk(content="Hel"),
                    {
                        "error": {
                            "message": "The server had an error",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    },
                ],
                done=False,
            ),
            True,
            "The server had an error",
        ),
        # vLLM's mid-stream errors are 400 (a bad request), as the design has them: not retryable.
        (
            Reply(
                chunks=[
                    chunk(content="Hel"),
                    {
                        "error": {
                            "object": "error",
                            "message": "bad grammar",
                            "type": "BadRequestError",
                            "code": 400,
                        }
                    },
                ]
            ),
            False,
            "bad grammar",
        ),
        # An OpenAI account out of credit: a 429 no retry gets past.
        (
            Reply(
                status=429,
                body={
                    "error": {
                        "message": "You exceeded your current quota",
                        "type": "insufficient_quota",
                        "code": "insufficient_quota",
                    }
                },
            ),
            False,
            "exceeded your current quota",
        ),
        # Older vLLM: a flat error body; FastAPI's own 404 (a base_url without /v1).
        (
            Reply(
                status=404,
                body={
                    "object": "error",
                    "message": "The model `test-model` does not exist.",
                    "type": "NotFoundError",
                    "param": None,
                    "code": 404,
                },
            ),
            False,
            "The model `test-model` does not exist.",
        ),
        (Reply(status=404, body={"detail": "Not Found"}), False, "HTTP 404: Not Found"),
    ],
    ids=[
        "stream-error-503",
        "stream-server-error",
        "stream-error-400",
        "out-of-quota",
        "vllm-404",
        "fastapi-404",
    ],
)
async def test_openai_chat_errors_say_what_the_endpoint_said_and_whether_a_retry_helps(
    client: AsyncSessionsClient,
    endpoint: ChatCompletionsServer,
    unique: str,
    reply: Reply,
    retryable: bool,
    said: str,
) -> None:
    sid = await session_of(client, openai_agent(endpoint), unique, "oaierrs")
    endpoint.replies.append(reply)
    events = await run(client, sid, text="hello?")
    error = only(events, "error")
    assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", retryable)
    assert said in error.message, error.message
    assert reason(events) == ERROR
    stored = await history(client, sid)
    assert (stored[0].role, message_text(stored[0])) == (Role.ROLE_USER, "hello?")


async def test_openai_chat_usage_repeated_in_chunks_is_one_usage_event(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    """Together, Groq, DeepSeek and LiteLLM send the usage so far in more than one chunk: the turn reports
    the last, once."""
    sid = await session_of(client, openai_agent(endpoint), unique, "oaiusage")
    so_far = [{"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n} for n in (1, 2)]
    endpoint.replies.append(
        Reply(
            chunks=[
                {**chunk(content="A"), "usage": so_far[0]},
                {**chunk(content="B", finish="stop"), "usage": so_far[1]},
            ]
        )
    )
    events = await run(client, sid, text="hi")
    usage = only(events, "usage")
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (5, 2, 7)
    assert text_of(events) == "AB"


async def test_openai_chat_endpoint_that_ignores_stream_true(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    """A server (or a proxy before it) that answers `stream: true` with one JSON completion: its answer is
    the turn's, not a stream "cut short" that every retry would hit again."""
    sid = await session_of(client, openai_agent(endpoint), unique, "oainostream")
    completion = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
    endpoint.replies.append(Reply(body=completion))
    events = await run(client, sid, text="hi")
    assert text_of(events) == "Let me check."
    (call,) = only(events, "client_tool_request").calls
    assert (call.call_id, call.name, call.arguments) == ("c1", "f", '{"a": 1}')
    assert only(events, "usage").total_tokens == 12
    assert reason(events) == CLIENT_TOOL_CALLS


async def test_openai_chat_call_arguments_that_are_not_json_go_back_as_an_object(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    """A model can write arguments that do not decode. The caller gets them verbatim and answers the call;
    the next request must still be one vLLM and Ollama accept, and they decode every call's arguments in
    the history into an object (refusing the request, and so every later turn, when they do not)."""
    sid = await session_of(client, openai_agent(endpoint), unique, "oaibadargs")
    endpoint.replies.append(
        Reply(
            chunks=[
                chunk(tool_calls=[call_piece(0, "c1", "f", '{"city": Paris}')]),
                chunk(finish="tool_calls"),
            ]
        )
    )
    first = await run(client, sid, text="weather?")
    (call,) = only(first, "client_tool_request").calls
    assert call.arguments == '{"city": Paris}'
    endpoint.replies.append(Reply(chunks=[chunk(content="Sorry."), chunk(finish="stop")]))
    result = {"call_id": "c1", "name": "f", "output": "error: arguments are not JSON"}
    second = await run(client, sid, continue_turn={"turn_id": first[0].turn_id, "tool_results": [result]})
    assert reason(second) == STOP
    sent = endpoint.received[1].body["messages"]
    assert [c["function"]["arguments"] for m in sent for c in m.get("tool_calls", ())] == ["{}"]
    assert sent[-1] == {"role": "tool", "tool_call_id": "c1", "content": "error: arguments are not JSON"}


async def test_openai_chat_tool_call_id_the_store_would_refuse(
    client: AsyncSessionsClient, endpoint: ChatCompletionsServer, unique: str
) -> None:
    sid = await session_of(client, openai_agent(endpoint), unique, "oaibadid")
    call = {"index": 0, "id": "x" * 300, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    endpoint.replies.append(
        Reply(chunks=[chunk(content="Hel"), chunk(tool_calls=[call]), chunk(finish="tool_calls")])
    )
    events = await run(client, sid, text="hello?")
    error = only(events, "error")
    assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", False)
    assert "call_id: must be at most 128 characters, got 300" in error.message
    assert reason(events) == ERROR
    stored = await history(client, sid)
    assert [(message_text(m), m.status) for m in stored] == [
        ("hello?", MessageStatus.MESSAGE_STATUS_COMPLETE),
        ("Hel", MessageStatus.MESSAGE_STATUS_ERROR),
    ]
    endpoint.replies.append(Reply(chunks=[chunk(content="Hello."), chunk(finish="stop")]))
    assert reason(await run(client, sid, text="again", multitask_strategy="reject")) == STOP


async def test_openai_chat_missing_api_key_and_unreachable_endpoint(
    client: AsyncSessionsClient, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_LLM_MISSING_KEY", raising=False)
    base = f"http://127.0.0.1:{closed_port()}/v1"
    no_key = await session_of(
        client,
        {"openai_chat": {"base_url": base, "model": "m", "api_key_env": "TEST_LLM_MISSING_KEY"}},
        unique,
        "nokey",
    )
    error = only(await run(client, no_key, text="hi"), "error")
    assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", False)
    assert "TEST_LLM_MISSING_KEY" in error.message
    down = await session_of(client, {"openai_chat": {"base_url": base, "model": "m"}}, unique, "down")
    error = only(await run(client, down, text="hi"), "error")
    assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", True)


async def test_agents_from_the_api_read_only_the_key_variables_the_operator_lists(
    server: RunningServer,
    client: AsyncSessionsClient,
    endpoint: ChatCompletionsServer,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`api_key_env` would otherwise let anyone who may create an agent send any of the server's variables
    (its database password) to an endpoint of their choosing. The tests' servers list TEST_LLM_KEY and
    TEST_LLM_MISSING_KEY in SESSIOND_AGENT_KEY_VARS (conftest)."""
    monkeypatch.setenv("TEST_LLM_KEY", "sk-listed")
    monkeypatch.setenv("TEST_UNLISTED_SECRET", "hunter2")
    thief = {**openai_agent(endpoint, api_key_env="TEST_UNLISTED_SECRET"), "agent_id": f"{unique}-thief"}
    with pytest.raises(errors.PermissionDenied) as refused:
        await client.create_agent(agent=thief)
    assert refused.value.reason == "API_KEY_VARIABLE_NOT_ALLOWED"
    assert refused.value.metadata["api_key_env"] == "TEST_UNLISTED_SECRET"
    sid = await session_of(client, openai_agent(endpoint, api_key_env="TEST_LLM_KEY"), unique, "listed")
    with pytest.raises(errors.PermissionDenied):
        await client.update_agent(agent={**thief, "agent_id": f"{unique}-listed"}, update_mask=["backend"])
    endpoint.replies.append(Reply(chunks=[chunk(content="fine"), chunk(finish="stop")]))
    assert text_of(await run(client, sid, text="hi")) == "fine"
    assert endpoint.received[-1].headers["authorization"] == "Bearer sk-listed"

    # An agent stored before the rule, or before the operator narrowed the list, is held to it per turn.
    await server.service.store.update_agent(
        f"{unique}-listed",
        lambda a: dataclasses.replace(a, backend={**a.backend, "api_key_env": "TEST_UNLISTED_SECRET"}),
    )
    events = await run(client, sid, text="again")
    error = only(events, "error")
    assert (error.reason, error.retryable) == ("AGENT_UNAVAILABLE", False)
    assert "SESSIOND_AGENT_KEY_VARS" in error.message
    assert len(endpoint.received) == 1  # nothing was sent


async def test_agents_declared_by_the_operator_may_name_any_key_variable(
    database: DatabaseTarget,
    clock: ManualClock,
    endpoint: ChatCompletionsServer,
    tmp_path: Path,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_UNLISTED_SECRET", "operator-key")
    path = tmp_path / "agents.toml"
    path.write_text(
        f'[[agents]]\nid = "{unique}-declared"\n[agents.openai_chat]\nbase_url = "{endpoint.base_url}"\n'
        'model = "m"\napi_key_env = "TEST_UNLISTED_SECRET"\n'
    )
    running = await start_server(make_settings(database, config_file=str(path)), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            sid = (await client.create_session(agent_id=f"{unique}-declared")).session_id
            endpoint.replies.append(Reply(chunks=[chunk(content="ok"), chunk(finish="stop")]))
            assert text_of(await run(client, sid, text="hi")) == "ok"
    finally:
        await running.stop(0)
    assert endpoint.received[-1].headers["authorization"] == "Bearer operator-key"


# --- agents declared in the config file -------------------------------------------------------------------

CONFIG = """
[[agents]]
id = "{unique}-support"
display_name = "Support"
history_window = 20

[agents.timeout_defaults]
timeout_minutes = 60

[agents.openai_chat]
base_url = "http://127.0.0.1:11434/v1"
model = "llama3.2"
api_key_env = "OLLAMA_API_KEY"
system_prompt = "You are helpful."

[[agents]]
id = "{unique}-slow-echo"
[agents.echo]
word_delay_ms = {delay}
"""


async def test_agents_from_the_config_file(
    database: DatabaseTarget, clock: ManualClock, tmp_path: Path, unique: str
) -> None:
    path = tmp_path / "sessiond.toml"
    path.write_text(CONFIG.format(unique=unique, delay=5))
    running = await start_server(make_settings(database, config_file=str(path)), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            support = await client.get_agent(agent_id=f"{unique}-support")
            assert support.origin == AgentOrigin.AGENT_ORIGIN_CONFIG
            assert (support.display_name, support.history_window) == ("Support", 20)
            assert support.timeout_defaults.timeout_minutes == 60
            assert support.openai_chat.model == "llama3.2"
            assert support.openai_chat.api_key_env == "OLLAMA_API_KEY"
            session = await client.create_session(agent_id=f"{unique}-support")
            assert session.effective_timeout_policy.timeout_minutes == 60
            echo = await client.get_agent(agent_id=f"{unique}-slow-echo")
            assert echo.echo.word_delay_ms == 5
            first_etag = echo.etag
    finally:
        await running.stop(0)

    # Starting again with a changed file updates the agent; an unchanged one stays as it was.
    path.write_text(CONFIG.format(unique=unique, delay=0))
    running = await start_server(make_settings(database, config_file=str(path)), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            echo = await client.get_agent(agent_id=f"{unique}-slow-echo")
            assert echo.echo.word_delay_ms == 0 and echo.etag != first_etag
            sid = (await client.create_session(agent_id=echo.agent_id)).session_id
            assert text_of(await run(client, sid, text="from config")) == "from config"
    finally:
        await running.stop(0)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[[agents]]\nid = "x"\n', "backend"),
        ('[[agents]]\nid = "echo"\n[agents.echo]\n', "built-in"),
        ('[[agents]]\nid = "a"\n[agents.echo]\n[[agents]]\nid = "a"\n[agents.echo]\n', "twice"),
        ('[[agents]]\nid = "a"\nhistory_window = -1\n[agents.echo]\n', "history_window"),
        ('[[agents]]\nid = "a"\n[agents.timeout_defaults]\ntimeout_minutes = 1\n[agents.echo]\n', "between"),
        ('[[agents]]\nid = "a"\ncolour = "red"\n[agents.echo]\n', "colour"),
        ("[[agents]]\nid = 5\n[agents.echo]\n", "must be a string"),
        ('[[agents]]\nid = "a"\nagent_id = "b"\n[agents.echo]\n', "once"),
        ("[server]\nport = 1\n", "unknown section"),
        ("not toml [", "cannot read"),
    ],
)
async def test_invalid_config_files_stop_the_start(
    database: DatabaseTarget, tmp_path: Path, text: str, complaint: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=complaint):
        await start_server(make_settings(database, config_file=str(path)))
