"""The OpenAI Agents SDK adapter against a real server: the SDK's own Runner with a local fake model (no
network) holding a conversation whose history lives in the service, then the Session contract case by case."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
from agents.items import ModelResponse, TResponseInputItem
from agents.memory import Session as SessionProtocol
from agents.memory import SessionSettings
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

from agentsessions import AsyncSessionsClient, errors
from agentsessions.integrations.openai_agents import ITEM_TYPE, AgentSessionsSession

# No trace export: these tests never leave the machine.
set_tracing_disabled(True)


# --- a local model ---------------------------------------------------------------------------------------


def _say(text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=f"msg-{abs(hash(text)) % 10**8}",
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
    )


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(
        id=f"fc-{call_id}", type="function_call", call_id=call_id, name=name, arguments=json.dumps(arguments)
    )


class ScriptedModel(Model):
    """Answers from a script, in order, and records the input of every call: what the SDK sent it, which
    with a session is the history it read back from the store."""

    def __init__(self, script: list[list[Any]]) -> None:
        self.script = list(script)
        self.inputs: list[list[TResponseInputItem]] = []

    async def get_response(
        self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any
    ) -> ModelResponse:
        self.inputs.append(json.loads(json.dumps(input)) if isinstance(input, list) else [input])
        return ModelResponse(output=self.script.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("these tests do not stream")


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return json.dumps({"city": city, "celsius": 21, "sky": "clear"})


async def test_runner_keeps_a_multi_turn_conversation_in_the_service(
    target: str, client: AsyncSessionsClient, unique: str
) -> None:
    model = ScriptedModel(
        [
            [_call("call-paris", "get_weather", {"city": "Paris"})],
            [_say("It is 21 °C and clear in Paris.")],
            [_say("You asked about Paris.")],
        ]
    )
    agent = Agent(name="assistant", instructions="Be brief.", model=model, tools=[get_weather])
    session_id = f"{unique}/oai-runner"

    first = AgentSessionsSession(session_id, target=target, user_id="user-42")
    try:
        result = await Runner.run(agent, "What is the weather in Paris?", session=first)
    finally:
        await first.close()
    assert result.final_output == "It is 21 °C and clear in Paris."

    # A new process would have nothing but the service: a fresh session object, a fresh channel.
    second = AgentSessionsSession(session_id, target=target)
    try:
        result = await Runner.run(agent, "What did I ask?", session=second)
    finally:
        await second.close()
    assert result.final_output == "You asked about Paris."

    # The third model call got the whole first turn back from the service, then the new question.
    history = model.inputs[2]
    assert history[0] == {"content": "What is the weather in Paris?", "role": "user"}
    kinds = [item.get("type", "message") for item in history]
    assert kinds == ["message", "function_call", "function_call_output", "message", "message"]
    assert history[1]["call_id"] == history[2]["call_id"] == "call-paris"  # type: ignore[typeddict-item]
    assert json.loads(history[2]["output"]) == {"city": "Paris", "celsius": 21, "sky": "clear"}  # type: ignore[typeddict-item]
    assert history[-1] == {"content": "What did I ask?", "role": "user"}

    # The service holds it as messages any client can read: roles, text, a linked tool call and result.
    stored = [m async for m in await client.list_messages(session_id=session_id)]
    roles = [m.role for m in stored]
    assert roles == [1, 2, 4, 2, 1, 2]  # user, assistant (call), tool, assistant, user, assistant
    assert stored[1].parts[0].tool_call.name == "get_weather"
    assert json.loads(stored[1].parts[0].tool_call.arguments) == {"city": "Paris"}
    assert stored[2].parts[0].tool_result.call_id == "call-paris"
    assert stored[3].parts[0].text.text == "It is 21 °C and clear in Paris."
    ui = [m async for m in await client.list_messages(session_id=session_id, view="ui")]
    assert all(p.WhichOneof("kind") != "data" for m in ui for p in m.parts)  # the JSON stays hidden
    session = await client.get_session(session_id=session_id)
    assert (session.agent_id, session.user_id) == ("openai-agents", "user-42")


async def test_runner_with_a_session_limit_replays_whole_tool_groups(target: str, unique: str) -> None:
    model = ScriptedModel(
        [
            [_call("c1", "get_weather", {"city": "Oslo"})],
            [_say("Cold in Oslo.")],
            [_say("Still cold.")],
        ]
    )
    agent = Agent(name="assistant", model=model, tools=[get_weather], model_settings=ModelSettings())
    session = AgentSessionsSession(
        f"{unique}/oai-limit", target=target, session_settings=SessionSettings(limit=2)
    )
    try:
        await Runner.run(agent, "Weather in Oslo?", session=session)
        await Runner.run(agent, "And now?", session=session)
    finally:
        await session.close()
    # The newest 2 items were [function_call_output, assistant]: the output would have come without its
    # call, so the window starts after it.
    replayed = model.inputs[2]
    assert [i.get("role") for i in replayed] == ["assistant", "user"]
    assert replayed[-1] == {"content": "And now?", "role": "user"}


# --- the Session contract ---------------------------------------------------------------------------------


@pytest.fixture
def make_session(client: AsyncSessionsClient, unique: str) -> Callable[..., AgentSessionsSession]:
    counter = iter(range(1000))

    def make(name: str | None = None, **kwargs: Any) -> AgentSessionsSession:
        return AgentSessionsSession(f"{unique}/oai-{name or next(counter)}", client=client, **kwargs)

    return make


def _user(text: str) -> TResponseInputItem:
    return cast(TResponseInputItem, {"role": "user", "content": text})


def _assistant(text: str) -> TResponseInputItem:
    return cast(
        TResponseInputItem,
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        },
    )


def _fc(call_id: str) -> TResponseInputItem:
    return cast(
        TResponseInputItem,
        {
            "type": "function_call",
            "call_id": call_id,
            "name": "lookup",
            "arguments": '{"q": 1}',
            "id": "fc_1",
        },
    )


def _out(call_id: str) -> TResponseInputItem:
    return cast(TResponseInputItem, {"type": "function_call_output", "call_id": call_id, "output": "42"})


async def test_it_is_a_session(make_session: Callable[..., AgentSessionsSession]) -> None:
    assert isinstance(make_session(), SessionProtocol)


async def test_a_new_session_is_empty(make_session: Callable[..., AgentSessionsSession]) -> None:
    session = make_session()
    assert await session.get_items() == []
    assert await session.get_items(limit=5) == []
    assert await session.pop_item() is None
    await session.clear_session()  # nothing to clear is no error
    assert await session.get_items() == []


async def test_items_come_back_in_order_and_unchanged(
    make_session: Callable[..., AgentSessionsSession],
) -> None:
    session = make_session()
    exotic = cast(
        TResponseInputItem,
        {
            "type": "function_call_output",
            "call_id": "c-x",
            "output": [{"type": "input_text", "text": "naïve ☃"}],
            "extra": {"int": 3, "float": 3.0, "big": 2**53 + 1, "neg": -0.5, "none": None, "list": [1, [2]]},
        },
    )
    reasoning = cast(
        TResponseInputItem,
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "b64=="},
    )
    batch1 = [_user("one"), _assistant("two")]
    batch2 = [_fc("c-x"), exotic, reasoning, _user("three")]
    await session.add_items(batch1)
    await session.add_items(batch2)
    got = await session.get_items()
    assert got == batch1 + batch2
    # Exactly, types included: 3 stays an int and 3.0 a float, 2**53 + 1 is not rounded.
    assert json.dumps(got, sort_keys=True) == json.dumps(batch1 + batch2, sort_keys=True)


async def test_limit_gives_the_newest_items_oldest_first(
    make_session: Callable[..., AgentSessionsSession],
) -> None:
    session = make_session("limits")
    items = [_user(f"m{i}") for i in range(6)]
    await session.add_items(items)
    assert await session.get_items(limit=2) == items[-2:]
    assert await session.get_items(limit=6) == items
    assert await session.get_items(limit=60) == items
    assert await session.get_items(limit=0) == []
    assert await session.get_items(limit=-1) == items  # as SQLiteSession: a negative limit is no limit
    limited = make_session("limits", session_settings=SessionSettings(limit=4))
    assert await limited.get_items() == items[-4:]
    assert await limited.get_items(limit=1) == items[-1:]


async def test_limit_never_returns_a_tool_output_without_its_call(
    make_session: Callable[..., AgentSessionsSession],
) -> None:
    session = make_session()
    items = [_user("q"), _fc("c1"), _fc("c2"), _out("c1"), _out("c2"), _assistant("a")]
    await session.add_items(items)
    assert await session.get_items(limit=1) == items[-1:]
    # The 2nd..4th newest are outputs whose calls are older: the window ends where the group starts.
    for limit in (2, 3, 4):
        assert await session.get_items(limit=limit) == items[-1:]
    assert await session.get_items(limit=5) == items[1:]
    assert await session.get_items(limit=6) == items


async def test_long_histories_page_across_the_server_maximum(
    make_session: Callable[..., AgentSessionsSession],
) -> None:
    session = make_session()
    items = [_user(f"m{i}") for i in range(1205)]
    await session.add_items(items)  # batches of 100
    assert await session.get_items() == items
    assert await session.get_items(limit=1100) == items[-1100:]


async def test_pop_removes_and_returns_the_newest(make_session: Callable[..., AgentSessionsSession]) -> None:
    session = make_session()
    items = [_user("a"), _fc("c1"), _out("c1")]
    await session.add_items(items)
    assert await session.pop_item() == items[2]  # the newest, even inside a tool group
    assert await session.get_items() == items[:2]
    assert await session.pop_item() == items[1]
    assert await session.pop_item() == items[0]
    assert await session.pop_item() is None
    await session.add_items([_user("again")])
    assert await session.get_items() == [_user("again")]


async def test_concurrent_pops_take_distinct_items(make_session: Callable[..., AgentSessionsSession]) -> None:
    session = make_session()
    items = [_user(str(i)) for i in range(6)]
    await session.add_items(items)
    popped = await asyncio.gather(*(session.pop_item() for _ in range(8)))
    assert sorted(json.dumps(p) for p in popped if p is not None) == sorted(json.dumps(i) for i in items)
    assert popped.count(None) == 2


async def test_clear_empties_the_history_and_keeps_the_session_usable(
    make_session: Callable[..., AgentSessionsSession], client: AsyncSessionsClient
) -> None:
    session = make_session()
    await session.add_items([_user("a"), _user("b")])
    await session.clear_session()
    assert await session.get_items() == []
    await session.clear_session()  # idempotent
    await session.add_items([_user("c")])
    assert await session.get_items() == [_user("c")]
    stored = await client.get_session(session_id=session.session_id)
    assert stored.status == 1  # still ACTIVE
    assert stored.message_count == 1


async def test_duplicate_items_are_kept_as_separate_entries(
    make_session: Callable[..., AgentSessionsSession],
) -> None:
    # Item ids are the model's, not keys: SQLiteSession keeps a repeated item twice, and so does this.
    session = make_session()
    await session.add_items([_assistant("same"), _assistant("same")])
    assert await session.get_items() == [_assistant("same"), _assistant("same")]


async def test_sessions_are_isolated_and_shared_by_id(
    make_session: Callable[..., AgentSessionsSession],
) -> None:
    one, other = make_session("iso-1"), make_session("iso-2")
    await one.add_items([_user("for one")])
    await other.add_items([_user("for other")])
    again = make_session("iso-1")  # another object (another process) on the same id
    assert await again.get_items() == [_user("for one")]
    assert await other.get_items() == [_user("for other")]


async def test_messages_from_other_writers_read_as_items(
    make_session: Callable[..., AgentSessionsSession], client: AsyncSessionsClient
) -> None:
    session = make_session()
    await session.add_items([_user("hi")])
    await client.append_messages(
        session_id=session.session_id,
        messages=[
            {
                "role": "ROLE_ASSISTANT",
                "parts": [
                    {"text": {"text": "Let me check."}},
                    {"toolCall": {"callId": "g1", "name": "f", "arguments": "{}"}},
                ],
            },
            {"role": "ROLE_TOOL", "parts": [{"toolResult": {"callId": "g1", "output": "ok"}}]},
        ],
    )
    assert await session.get_items() == [
        _user("hi"),
        {"role": "assistant", "content": "Let me check."},
        {"type": "function_call", "call_id": "g1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "g1", "output": "ok"},
    ]


async def test_pop_passes_over_messages_that_hold_no_item(
    make_session: Callable[..., AgentSessionsSession], client: AsyncSessionsClient
) -> None:
    """Another writer's message with nothing the SDK reads (reasoning alone) is not an item: pop takes the
    newest item before it and leaves it in place. Before, pop deleted it and returned None, which the SDK
    reads as an empty history, with items still there."""
    session = make_session()
    await session.add_items([_user("first"), _user("second")])
    thought = {"role": "ROLE_ASSISTANT", "parts": [{"reasoning": {"text": "thinking..."}}]}
    await client.append_messages(session_id=session.session_id, messages=[thought, thought])
    assert await session.pop_item() == _user("second")
    assert await session.pop_item() == _user("first")
    assert await session.pop_item() is None
    left = await client.last_messages(session_id=session.session_id, n=10)
    assert [m.parts[0].reasoning.text for m in left] == ["thinking...", "thinking..."]


async def test_messages_from_other_writers_read_as_items_in_the_order_of_their_parts(
    make_session: Callable[..., AgentSessionsSession], client: AsyncSessionsClient
) -> None:
    """A message with text after a tool call (an agent turn that speaks, calls a tool, speaks again) reads
    as items in the order of its parts; adjacent text parts are one message item. Before, all of its text
    came first, as one item, then the calls."""
    session = make_session()
    await session.add_items([_user("hi")])
    await client.append_messages(
        session_id=session.session_id,
        messages=[
            {
                "role": "ROLE_ASSISTANT",
                "parts": [
                    {"text": {"text": "Let me "}},
                    {"text": {"text": "check."}},
                    {"toolCall": {"callId": "g1", "name": "f", "arguments": "{}"}},
                    {"text": {"text": "Asked."}},
                    {"toolCall": {"callId": "g2", "name": "f", "arguments": "{}"}},
                ],
            },
            {"role": "ROLE_TOOL", "parts": [{"toolResult": {"callId": "g1", "output": "ok"}}]},
            {"role": "ROLE_TOOL", "parts": [{"toolResult": {"callId": "g2", "output": "ok"}}]},
        ],
    )
    assert await session.get_items() == [
        _user("hi"),
        {"role": "assistant", "content": "Let me check."},
        {"type": "function_call", "call_id": "g1", "name": "f", "arguments": "{}"},
        {"role": "assistant", "content": "Asked."},
        {"type": "function_call", "call_id": "g2", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "g1", "output": "ok"},
        {"type": "function_call_output", "call_id": "g2", "output": "ok"},
    ]


async def test_the_stored_form(
    make_session: Callable[..., AgentSessionsSession], client: AsyncSessionsClient
) -> None:
    session = make_session(agent_id="oai-app", user_id="u-7", metadata={"channel": "web"})
    await session.add_items([_user("hello"), {"type": "reasoning", "id": "r", "summary": []}])  # type: ignore[list-item]
    stored = [m async for m in await client.list_messages(session_id=session.session_id)]
    assert [p.WhichOneof("kind") for p in stored[0].parts] == ["text", "data"]
    assert stored[0].parts[1].hidden and stored[0].parts[1].data.type == ITEM_TYPE
    assert stored[1].hidden  # nothing readable: the model's, not the UI's
    got = await client.get_session(session_id=session.session_id)
    assert (got.agent_id, got.user_id, dict(got.metadata)) == ("oai-app", "u-7", {"channel": "web"})


async def test_writes_to_an_ended_session_raise(
    make_session: Callable[..., AgentSessionsSession], client: AsyncSessionsClient
) -> None:
    session = make_session()
    await session.add_items([_user("a")])
    await client.end_session(session_id=session.session_id)
    assert await session.get_items() == [_user("a")]  # still readable
    with pytest.raises(errors.FailedPrecondition) as caught:
        await session.add_items([_user("b")])
    assert caught.value.reason == "SESSION_ENDED"
