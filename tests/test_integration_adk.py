"""The Google ADK adapter against a real server: ADK's own Runner with a local fake model (no network)
holding a conversation whose events and state live in the service, then the BaseSessionService contract
case by case (the cases of ADK's own session-service tests, plus the service's improvements)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.adk.agents import LlmAgent
from google.adk.agents.run_config import RunConfig
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions import DatabaseSessionService
from google.adk.sessions.base_session_service import GetSessionConfig
from google.adk.tools.tool_context import ToolContext
from google.genai import types
from pydantic import BaseModel

from agentsessions import AsyncSessionsClient, errors
from agentsessions.integrations.adk import EVENT_TYPE, AgentSessionsService
from sessiond.domain.clock import ManualClock

# --- a local model ---------------------------------------------------------------------------------------


class ScriptedLlm(BaseLlm):
    """Answers from a script, in order, and records the contents of every request: with a session service,
    the history it read back from the store."""

    model: str = "scripted"
    script: list[LlmResponse] = []
    seen: list[list[dict[str, Any]]] = []

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        self.seen.append([c.model_dump(exclude_none=True) for c in llm_request.contents])
        yield self.script.pop(0)


def _text(text: str) -> LlmResponse:
    return LlmResponse(content=types.Content(role="model", parts=[types.Part(text=text)]))


def _calls(name: str, args: dict[str, Any]) -> LlmResponse:
    call = types.FunctionCall(name=name, args=args)
    return LlmResponse(content=types.Content(role="model", parts=[types.Part(function_call=call)]))


def get_weather(city: str, tool_context: ToolContext) -> dict[str, Any]:
    """The weather in a city."""
    tool_context.state["user:last_city"] = city  # shared by all of this user's sessions of the app
    tool_context.state["app:lookups"] = tool_context.state.get("app:lookups", 0) + 1
    tool_context.state["temp:scratch"] = "never stored"
    return {"city": city, "celsius": 21}


def _user(text: str) -> types.Content:
    return types.Content(role="user", parts=[types.Part(text=text)])


async def _run(runner: Runner, user_id: str, session_id: str, text: str, **kwargs: Any) -> list[Event]:
    return [
        e
        async for e in runner.run_async(
            user_id=user_id, session_id=session_id, new_message=_user(text), **kwargs
        )
    ]


@pytest.fixture
def app(unique: str) -> str:
    return f"app_{unique}"


@pytest.fixture
async def service(client: AsyncSessionsClient) -> AgentSessionsService:
    return AgentSessionsService(client=client)


async def test_runner_keeps_a_multi_turn_conversation_in_the_service(
    target: str, client: AsyncSessionsClient, app: str
) -> None:
    llm = ScriptedLlm(
        script=[
            _calls("get_weather", {"city": "Paris"}),
            _text("21 °C in Paris."),
            _text("You asked about Paris."),
        ],
        seen=[],
    )
    agent = LlmAgent(
        name="assistant", model=llm, instruction="Be brief.", tools=[get_weather], output_key="answer"
    )

    first = AgentSessionsService(target)
    try:
        runner = Runner(app_name=app, agent=agent, session_service=first)
        session = await first.create_session(app_name=app, user_id="alice", state={"topic": "weather"})
        events = await _run(runner, "alice", session.id, "Weather in Paris?")
    finally:
        await first.close()
    assert events[-1].content is not None and events[-1].content.parts
    assert events[-1].content.parts[0].text == "21 °C in Paris."

    # A new process would have nothing but the service: a fresh service object, a fresh channel.
    second = AgentSessionsService(target)
    try:
        runner = Runner(app_name=app, agent=agent, session_service=second)
        await _run(runner, "alice", session.id, "What did I ask?")
        stored = await second.get_session(app_name=app, user_id="alice", session_id=session.id)
    finally:
        await second.close()

    # The third model call saw the whole first turn, read back from the service, then the new question.
    history = llm.seen[2]
    assert [c["role"] for c in history] == ["user", "model", "user", "model", "user"]
    assert history[0]["parts"] == [{"text": "Weather in Paris?"}]
    assert history[1]["parts"][0]["function_call"]["args"] == {"city": "Paris"}
    assert history[2]["parts"][0]["function_response"]["response"] == {"city": "Paris", "celsius": 21}
    assert history[4]["parts"] == [{"text": "What did I ask?"}]

    assert stored is not None
    assert [e.author for e in stored.events] == [
        "user",
        "assistant",
        "assistant",
        "assistant",
        "user",
        "assistant",
    ]
    assert stored.state == {
        "topic": "weather",
        "answer": "You asked about Paris.",  # output_key, written by the last event's delta
        "user:last_city": "Paris",
        "app:lookups": 1,  # an int again, though it travelled as a JSON number
    }
    # The user's next session sees the shared scopes.
    other = await client.create_session(agent_id=app, user_id="alice")
    assert dict(other.variables) == {"user:last_city": "Paris", "app:lookups": 1}

    # Any client reads the conversation: user text, a linked tool call and result, the answers.
    messages = [m async for m in await client.list_messages(session_id=session.id)]
    assert [m.role for m in messages] == [1, 2, 4, 2, 1, 2]
    call, result = messages[1].parts[0].tool_call, messages[2].parts[0].tool_result
    assert call.call_id == result.call_id and call.call_id.startswith("adk-")
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert messages[3].parts[0].text.text == "21 °C in Paris."


async def test_runner_with_recent_events_never_splits_a_call_from_its_response(
    service: AgentSessionsService, app: str
) -> None:
    llm = ScriptedLlm(
        script=[_calls("get_weather", {"city": "Oslo"}), _text("Cold."), _text("Still cold.")], seen=[]
    )
    agent = LlmAgent(name="assistant", model=llm, tools=[get_weather])
    runner = Runner(app_name=app, agent=agent, session_service=service)
    session = await service.create_session(app_name=app, user_id="bob")
    await _run(runner, "bob", session.id, "Oslo?")
    # The four stored events: user, call, response, answer. The newest 2 would start with the response.
    config = RunConfig(get_session_config=GetSessionConfig(num_recent_events=2))
    await _run(runner, "bob", session.id, "And now?", run_config=config)
    assert [c["parts"][0].get("text") for c in llm.seen[2]] == ["Cold.", "And now?"]


async def test_the_sync_runner_works_on_each_of_its_event_loops(target: str, app: str) -> None:
    """ADK's sync Runner.run runs every call on an event loop of its own (asyncio.run in a thread), and a
    grpc.aio channel belongs to the loop it was opened on: the service opens a client per loop. Before, the
    client opened on the first loop was used on the next, and the second call failed with "Event loop is
    closed"."""
    llm = ScriptedLlm(script=[_text("One."), _text("Two.")], seen=[])
    sessions = AgentSessionsService(target)
    runner = Runner(app_name=app, agent=LlmAgent(name="assistant", model=llm), session_service=sessions)

    def run_sync(session_id: str, text: str) -> list[Event]:
        return list(runner.run(user_id="u", session_id=session_id, new_message=_user(text)))

    try:
        # The server runs on this test's loop: the sync calls, each with its own loop, run in threads.
        session = await asyncio.to_thread(
            lambda: asyncio.run(sessions.create_session(app_name=app, user_id="u"))
        )
        first = await asyncio.to_thread(run_sync, session.id, "one")
        second = await asyncio.to_thread(run_sync, session.id, "two")
        stored = await sessions.get_session(app_name=app, user_id="u", session_id=session.id)
    finally:
        await sessions.close()
    assert [e.content.parts[0].text for e in first + second] == ["One.", "Two."]  # type: ignore[union-attr,index]
    assert stored is not None
    assert [e.content.parts[0].text for e in stored.events] == ["one", "One.", "two", "Two."]  # type: ignore[union-attr,index]


# --- the BaseSessionService contract ----------------------------------------------------------------------


def _event(author: str, text: str, *, delta: dict[str, Any] | None = None, **kwargs: Any) -> Event:
    return Event(
        author=author,
        invocation_id="inv-1",
        content=types.Content(role="user" if author == "user" else "model", parts=[types.Part(text=text)]),
        actions=EventActions(state_delta=delta or {}),
        **kwargs,
    )


async def test_a_missing_session_is_none(service: AgentSessionsService, app: str) -> None:
    assert await service.get_session(app_name=app, user_id="u", session_id="nope") is None
    session = await service.create_session(app_name=app, user_id="u")
    # Another app's or another user's view of it finds nothing.
    assert await service.get_session(app_name=app, user_id="other", session_id=session.id) is None
    assert await service.get_session(app_name="echo", user_id="u", session_id=session.id) is None


async def test_create_and_get(service: AgentSessionsService, app: str, unique: str) -> None:
    generated = await service.create_session(app_name=app, user_id="u", state={"k": "v"})
    assert generated.id and generated.app_name == app and generated.user_id == "u"
    assert generated.state == {"k": "v"} and generated.events == []
    assert generated.last_update_time > 0
    chosen = await service.create_session(app_name=app, user_id="u", session_id=f" {unique}-s1 ")
    assert chosen.id == f"{unique}-s1"  # stripped, as ADK does
    got = await service.get_session(app_name=app, user_id="u", session_id=generated.id)
    assert got is not None
    assert (got.id, got.state, got.events) == (generated.id, {"k": "v"}, [])


async def test_duplicate_ids_raise(service: AgentSessionsService, app: str, unique: str) -> None:
    await service.create_session(app_name=app, user_id="u", session_id=f"{unique}-dup")
    with pytest.raises(AlreadyExistsError):
        await service.create_session(app_name=app, user_id="u", session_id=f"{unique}-dup")
    # Session ids are global in the service (as on Vertex AI Agent Engine): another user's is taken too.
    with pytest.raises(AlreadyExistsError):
        await service.create_session(app_name=app, user_id="someone-else", session_id=f"{unique}-dup")


async def test_list_sessions(service: AgentSessionsService, app: str, clock: ManualClock) -> None:
    a1 = await service.create_session(app_name=app, user_id="a", state={"n": 1})
    clock.advance(seconds=1)
    a2 = await service.create_session(app_name=app, user_id="a", state={"user:shared": True})
    b1 = await service.create_session(app_name=app, user_id="b")
    clock.advance(seconds=1)
    await service.append_event(a1, _event("user", "moves a1 last"))
    mine = await service.list_sessions(app_name=app, user_id="a")
    assert [s.id for s in mine.sessions] == [a2.id, a1.id]  # by last update, oldest first
    assert all(s.events == [] for s in mine.sessions)
    assert {s.id: s.state for s in mine.sessions} == {
        a1.id: {"n": 1, "user:shared": True},
        a2.id: {"user:shared": True},
    }
    everyone = await service.list_sessions(app_name=app)
    assert {s.id for s in everyone.sessions} == {a1.id, a2.id, b1.id}
    assert (await service.list_sessions(app_name=app, user_id="nobody")).sessions == []


async def test_state_scopes(service: AgentSessionsService, app: str) -> None:
    s1 = await service.create_session(
        app_name=app, user_id="u1", state={"own": 1, "user:u": "a", "app:a": "x", "temp:t": "gone"}
    )
    assert s1.state == {"own": 1, "user:u": "a", "app:a": "x"}
    s2 = await service.create_session(app_name=app, user_id="u1")
    other_user = await service.create_session(app_name=app, user_id="u2")
    assert s2.state == {"user:u": "a", "app:a": "x"}
    assert other_user.state == {"app:a": "x"}

    event = _event("assistant", "hi", delta={"own": 2, "user:u": "b", "app:a": "y", "temp:t": "mem only"})
    await service.append_event(s1, event)
    assert s1.state["temp:t"] == "mem only"  # the in-memory session keeps temp: for this invocation
    assert "temp:t" not in (event.actions.state_delta or {})  # the stored event never carries it
    got = await service.get_session(app_name=app, user_id="u1", session_id=s1.id)
    assert got is not None and got.state == {"own": 2, "user:u": "b", "app:a": "y"}
    assert got.events[0].actions.state_delta == {"own": 2, "user:u": "b", "app:a": "y"}
    assert (await service.get_session(app_name=app, user_id="u1", session_id=s2.id)).state == {  # type: ignore[union-attr]
        "user:u": "b",
        "app:a": "y",
    }
    assert (await service.get_session(app_name=app, user_id="u2", session_id=other_user.id)).state == {  # type: ignore[union-attr]
        "app:a": "y"
    }


class _Forecast(BaseModel):
    city: str
    celsius: int


async def test_state_values_are_stored_as_adks_own_service_stores_them(
    service: AgentSessionsService, app: str, tmp_path: Path
) -> None:
    """A tool may put a datetime, a pydantic model, a set or bytes in the state: stored as the JSON
    ADK's DatabaseSessionService makes of them. Before, the Struct refused them and Runner.run failed."""
    when = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    initial = {"created": when, "user:tags": {"a"}}
    delta = {"forecast": _Forecast(city="Oslo", celsius=-3), "raw": b"ab", "app:updated": when}
    reference = DatabaseSessionService(db_url=f"sqlite+aiosqlite:///{tmp_path / 'adk.db'}")
    try:
        got = {}
        for name, svc in (("adk", reference), ("ours", service)):
            session = await svc.create_session(app_name=app, user_id="u", state=initial)
            await svc.append_event(session, _event("assistant", "hi", delta=delta))
            read = await svc.get_session(app_name=app, user_id="u", session_id=session.id)
            assert read is not None
            got[name] = read.state
    finally:
        await reference.close()
    assert got["ours"] == got["adk"]
    assert got["ours"]["forecast"] == {"city": "Oslo", "celsius": -3}
    assert got["ours"]["created"] == "2030-01-01T12:00:00Z"


async def test_events_round_trip_losslessly(service: AgentSessionsService, app: str) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    rich = Event(
        author="assistant",
        invocation_id="inv-9",
        branch="root.child",
        content=types.Content(
            role="model",
            parts=[
                types.Part(text="thinking...", thought=True),
                types.Part(text="Here is a picture."),
                types.Part(inline_data=types.Blob(mime_type="image/png", data=b"\x89PNG\x00\xff")),
                types.Part(function_call=types.FunctionCall(id="fc-1", name="f", args={"n": 3, "x": 3.0})),
            ],
        ),
        actions=EventActions(
            state_delta={"count": 7, "ratio": 0.5, "nested": {"list": [1, 2.5, None]}},
            artifact_delta={"report.pdf": 2},
            transfer_to_agent="helper",
            escalate=True,
        ),
        long_running_tool_ids={"fc-1"},
        custom_metadata={"trace": "abc", "n": 1},
        usage_metadata=types.GenerateContentResponseUsageMetadata(
            prompt_token_count=10, candidates_token_count=5
        ),
        error_code="NONE",
        turn_complete=True,
    )
    await service.append_event(session, rich)
    got = await service.get_session(app_name=app, user_id="u", session_id=session.id)
    assert got is not None
    assert got.events == [rich]
    assert got.events[0].model_dump_json() == rich.model_dump_json()
    assert got.state == {"count": 7, "ratio": 0.5, "nested": {"list": [1, 2.5, None]}}
    assert type(got.state["count"]) is int


async def test_partial_events_are_not_stored(service: AgentSessionsService, app: str) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    partial = _event("assistant", "streaming...", partial=True)
    assert await service.append_event(session, partial) is partial
    got = await service.get_session(app_name=app, user_id="u", session_id=session.id)
    assert got is not None and got.events == []


async def test_recent_events_and_after_timestamp(service: AgentSessionsService, app: str) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    events = [_event("user" if i % 2 == 0 else "assistant", f"e{i}", timestamp=1000.0 + i) for i in range(6)]
    for event in events:
        await service.append_event(session, event)

    async def get(**config: Any) -> list[str]:
        got = await service.get_session(
            app_name=app, user_id="u", session_id=session.id, config=GetSessionConfig(**config)
        )
        assert got is not None
        return [e.content.parts[0].text for e in got.events if e.content and e.content.parts]  # type: ignore[misc]

    assert await get() == [f"e{i}" for i in range(6)]
    assert await get(num_recent_events=0) == []
    assert await get(num_recent_events=2) == ["e4", "e5"]
    assert await get(num_recent_events=60) == [f"e{i}" for i in range(6)]
    assert await get(after_timestamp=1003.0) == ["e3", "e4", "e5"]  # timestamp >= after
    assert await get(after_timestamp=1003.5) == ["e4", "e5"]
    assert await get(after_timestamp=2000.0) == []
    assert await get(num_recent_events=2, after_timestamp=1001.0) == ["e4", "e5"]
    assert await get(num_recent_events=5, after_timestamp=1003.0) == ["e3", "e4", "e5"]
    with pytest.raises(ValueError):
        GetSessionConfig(num_recent_events=-1)


async def test_recent_events_keep_calls_with_their_responses(service: AgentSessionsService, app: str) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    call = Event(
        author="assistant",
        content=types.Content(
            role="model",
            parts=[
                types.Part(function_call=types.FunctionCall(id="c1", name="f", args={})),
                types.Part(function_call=types.FunctionCall(id="c2", name="g", args={})),
            ],
        ),
    )
    responses = [
        Event(
            author="assistant",
            content=types.Content(
                role="user",
                parts=[
                    types.Part(function_response=types.FunctionResponse(id=cid, name=n, response={"ok": 1}))
                ],
            ),
        )
        for cid, n in (("c1", "f"), ("c2", "g"))
    ]
    answer = _event("assistant", "done")
    for event in [_event("user", "go"), call, *responses, answer]:
        await service.append_event(session, event)
    for recent, expected in ((1, 1), (2, 1), (3, 1), (4, 4), (5, 5)):
        got = await service.get_session(
            app_name=app,
            user_id="u",
            session_id=session.id,
            config=GetSessionConfig(num_recent_events=recent),
        )
        assert got is not None and len(got.events) == expected, recent
        assert got.events[-1] == answer


def _calls_event(timestamp: float, *call_ids: str) -> Event:
    parts = [types.Part(function_call=types.FunctionCall(id=c, name="f", args={})) for c in call_ids]
    return Event(author="assistant", timestamp=timestamp, content=types.Content(role="model", parts=parts))


def _response_event(timestamp: float, call_id: str) -> Event:
    response = types.FunctionResponse(id=call_id, name="f", response={"ok": 1})
    return Event(
        author="assistant",
        timestamp=timestamp,
        content=types.Content(role="user", parts=[types.Part(function_response=response)]),
    )


async def test_recent_events_after_a_timestamp_keep_calls_with_their_responses(
    service: AgentSessionsService, app: str
) -> None:
    """`num_recent_events` with `after_timestamp` takes the pages as the server cuts them: a page cut short
    so that a call stays with its response is the answer, and a page grown to hold a tool group larger than
    it comes whole; and a response whose call is older than `after_timestamp` is left out. Before, the
    reader went on past the short page and cut the grown one at the limit, and so returned a function
    response without its call."""

    async def ids(session_id: str, **config: Any) -> list[str]:
        got = await service.get_session(
            app_name=app, user_id="u", session_id=session_id, config=GetSessionConfig(**config)
        )
        assert got is not None
        return [e.id for e in got.events]

    session = await service.create_session(app_name=app, user_id="u")
    go, call, response = (
        _event("user", "go", timestamp=1000.0),
        _calls_event(1001.0, "c1"),
        _response_event(1002.0, "c1"),
    )
    answer = _event("assistant", "done", timestamp=1003.0)
    for event in (go, call, response, answer):
        await service.append_event(session, event)
    # The newest 2 would start with the response: the server's page stops after the answer.
    assert await ids(session.id, num_recent_events=2, after_timestamp=999.0) == [answer.id]
    assert await ids(session.id, num_recent_events=3, after_timestamp=999.0) == [
        call.id,
        response.id,
        answer.id,
    ]
    # The call is older than the timestamp: its response goes with it.
    assert await ids(session.id, num_recent_events=3, after_timestamp=1001.5) == [answer.id]
    assert await ids(session.id, after_timestamp=1001.5) == [answer.id]
    assert await ids(session.id, after_timestamp=1001.0) == [call.id, response.id, answer.id]

    # A group larger than the page: the page grows to hold it whole.
    grown = await service.create_session(app_name=app, user_id="u")
    calls = _calls_event(1001.0, "g1", "g2")
    responses = [_response_event(1002.0, "g1"), _response_event(1003.0, "g2")]
    for event in (_event("user", "go", timestamp=1000.0), calls, *responses):
        await service.append_event(grown, event)
    whole = [calls.id, *(r.id for r in responses)]
    assert await ids(grown.id, num_recent_events=1, after_timestamp=999.0) == whole
    assert await ids(grown.id, num_recent_events=1) == whole  # as without a timestamp
    assert await ids(grown.id, num_recent_events=1, after_timestamp=1002.5) == []


async def test_delete_is_idempotent_and_scoped_to_the_owner(service: AgentSessionsService, app: str) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    await service.delete_session(app_name=app, user_id="intruder", session_id=session.id)
    assert await service.get_session(app_name=app, user_id="u", session_id=session.id) is not None
    await service.delete_session(app_name=app, user_id="u", session_id=session.id)
    assert await service.get_session(app_name=app, user_id="u", session_id=session.id) is None
    await service.delete_session(app_name=app, user_id="u", session_id=session.id)  # again: no error
    await service.delete_session(app_name=app, user_id="u", session_id="never-was")


async def test_append_to_a_deleted_session_raises(service: AgentSessionsService, app: str) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    await service.delete_session(app_name=app, user_id="u", session_id=session.id)
    with pytest.raises(SessionNotFoundError):
        await service.append_event(session, _event("user", "hello?"))


async def test_a_redelivered_event_is_stored_once(service: AgentSessionsService, app: str) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    event = _event("user", "once", delta={"n": 1})
    await service.append_event(session, event)
    await service.append_event(session, event)  # the same object again
    stale = await service.get_session(app_name=app, user_id="u", session_id=session.id)
    assert stale is not None
    await service.append_event(stale, event.model_copy(deep=True))  # an equal copy, from a reloaded session
    got = await service.get_session(app_name=app, user_id="u", session_id=session.id)
    assert got is not None and [e.id for e in got.events] == [event.id]


async def test_another_event_under_a_stored_id_is_refused(service: AgentSessionsService, app: str) -> None:
    """The server keeps what it holds under a known id (a retry's); a different event under that id must
    not pass for stored while the in-memory session goes on with it."""
    session = await service.create_session(app_name=app, user_id="u")
    first = _event("user", "first", delta={"step": 1})
    await service.append_event(session, first)
    other = _event("user", "other content", delta={"step": 2})
    other.id = first.id
    with pytest.raises(ValueError, match=r"stored in session .* with other content"):
        await service.append_event(session, other)
    assert [e.content.parts[0].text for e in session.events] == ["first"]  # type: ignore[union-attr,index]
    got = await service.get_session(app_name=app, user_id="u", session_id=session.id)
    assert got is not None and [e.id for e in got.events] == [first.id]
    assert got.state == {"step": 1}


async def test_concurrent_writers_never_see_stale_session_errors(
    service: AgentSessionsService, app: str
) -> None:
    # ADK's database service rejects a writer whose copy is older than storage; here appends are ordered
    # by sequence numbers, so two copies of one session both write.
    created = await service.create_session(app_name=app, user_id="u")
    copies = [await service.get_session(app_name=app, user_id="u", session_id=created.id) for _ in range(4)]
    await asyncio.gather(
        *(
            service.append_event(c, _event("user", f"w{i}", delta={f"k{i}": i}))
            for i, c in enumerate(copies)
            if c
        )
    )
    got = await service.get_session(app_name=app, user_id="u", session_id=created.id)
    assert got is not None
    assert sorted(e.content.parts[0].text for e in got.events) == ["w0", "w1", "w2", "w3"]  # type: ignore[union-attr,index]
    assert got.state == {"k0": 0, "k1": 1, "k2": 2, "k3": 3}


async def test_the_stored_form(service: AgentSessionsService, client: AsyncSessionsClient, app: str) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    await service.append_event(session, _event("user", "hello"))
    await service.append_event(session, Event(author="assistant", actions=EventActions(state_delta={"x": 1})))
    messages = [m async for m in await client.list_messages(session_id=session.id)]
    assert messages[0].message_id == session.events[0].id
    assert [p.WhichOneof("kind") for p in messages[0].parts] == ["text", "data"]
    assert messages[0].parts[1].hidden and messages[0].parts[1].data.type == EVENT_TYPE
    assert messages[1].hidden  # a state-only event: nothing for a user interface
    agent = await client.get_agent(agent_id=app)  # the app, registered as an agent on first use
    assert agent.agent_id == app


async def test_messages_from_other_writers_read_as_events(
    service: AgentSessionsService, client: AsyncSessionsClient, app: str
) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    await client.append_messages(
        session_id=session.id,
        messages=[
            {"role": "ROLE_USER", "parts": [{"text": {"text": "from a gateway"}}]},
            {
                "role": "ROLE_ASSISTANT",
                "parts": [{"toolCall": {"callId": "x1", "name": "f", "arguments": '{"a": 1}'}}],
            },
            {
                "role": "ROLE_TOOL",
                "parts": [{"toolResult": {"callId": "x1", "name": "f", "output": "plain"}}],
            },
        ],
    )
    got = await service.get_session(app_name=app, user_id="u", session_id=session.id)
    assert got is not None
    user, call, result = got.events
    assert user.author == "user" and user.content.parts[0].text == "from a gateway"  # type: ignore[union-attr,index]
    assert call.get_function_calls()[0].args == {"a": 1}
    assert result.get_function_responses()[0].response == {"result": "plain"}


async def test_writes_to_an_expired_session_raise(
    service: AgentSessionsService, client: AsyncSessionsClient, app: str
) -> None:
    session = await service.create_session(app_name=app, user_id="u")
    await client.end_session(session_id=session.id)
    with pytest.raises(errors.FailedPrecondition):
        await service.append_event(session, _event("user", "late"))
    assert await service.get_session(app_name=app, user_id="u", session_id=session.id) is not None
