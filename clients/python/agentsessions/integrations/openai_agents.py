"""An OpenAI Agents SDK ``Session`` kept by Agent Sessions, so ``Runner.run(..., session=...)`` keeps its
history in the service instead of a per-process SQLite file::

    from agents import Agent, Runner
    from agentsessions.integrations.openai_agents import AgentSessionsSession

    session = AgentSessionsSession("user-42/conv-7", target="sessiond:50051", user_id="user-42")
    result = await Runner.run(Agent(name="assistant"), "Hello!", session=session)

Each item is one message: readable parts (text, reasoning summaries, tool calls and their outputs) for the
UI view and other clients, and the item itself, verbatim JSON, in a hidden data part of type
``openai.agents.item``, which is what :meth:`AgentSessionsSession.get_items` gives back. Messages that other
writers appended (a gateway, an agent turn) come back as the equivalent items, in the order of their parts.

Semantics, against the SDK's ``SQLiteSession``:

- ``get_items(limit=N)`` returns the newest items oldest first, but never a tool call's output without the
  call: where the N-th newest item is an output whose call is older, the window starts after it, so it can
  hold fewer than N items (and more than N only when a single call has more than N outputs, or when
  messages another writer appended hold several items each: the limit counts messages).
- ``add_items`` appends in batches of 100 messages; each batch is atomic, and retried safely (every item
  gets a message id before it is sent). The service session is created on the first add.
- ``clear_session`` deletes the history and leaves the session active and usable (the service's
  ``ClearSession`` would also expire it).
- ``pop_item`` removes the newest message. Messages this adapter writes hold one item each; a message
  another writer appended may hold several (an agent turn's text and its tool calls), and popping it
  removes them all and returns the last. (Known limitation: the SDK's ``SQLiteSession`` would remove one.)
  A newer message that holds no item (another writer's reasoning alone) is left in place.
- The service's timeouts apply: a session expired by inactivity stays readable, and writes to it raise
  :class:`agentsessions.errors.FailedPrecondition` (reason ``SESSION_EXPIRED``).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from agents.items import TResponseInputItem
from agents.memory.session_settings import SessionSettings, resolve_session_limit
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from agentsessions import errors
from agentsessions._requests import TimeoutPolicyInput
from agentsessions.client import DEFAULT_TARGET, AsyncSessionsClient
from agentsessions.integrations import _frames
from agentsessions.v1 import message_pb2

__all__ = ["ITEM_TYPE", "AgentSessionsSession", "item_from_message", "message_from_item"]

#: ``DataPart.type`` of the hidden part holding an item's JSON.
ITEM_TYPE = "openai.agents.item"
# Messages read at a time by `pop_item` looking for the newest that holds an item (usually the first).
_POP_PAGE = 4

_ROLES = {
    "user": message_pb2.ROLE_USER,
    "assistant": message_pb2.ROLE_ASSISTANT,
    "system": message_pb2.ROLE_SYSTEM,
    "developer": message_pb2.ROLE_SYSTEM,
}
_ROLE_NAMES = {
    message_pb2.ROLE_USER: "user",
    message_pb2.ROLE_ASSISTANT: "assistant",
    message_pb2.ROLE_SYSTEM: "system",
}


def _add_visible_parts(
    parts: RepeatedCompositeFieldContainer[message_pb2.Part], item: Mapping[str, Any]
) -> None:
    """Adds the readable form of an item to ``parts`` (a message's, filled in place: building each part on
    its own and copying it in was half of an item's conversion). Every ``*_call`` item with a call id is a
    tool call and every ``*_call_output`` one its result (function, custom tool, shell, computer...), so the
    server links them and never pages one without the other."""
    kind = item.get("type", "message")
    call_id = item.get("call_id")
    if kind == "message":  # also the easy form, {"role": ..., "content": ...}, which has no type
        content = item.get("content")
        if isinstance(content, str):
            parts.add().text.text = content
            return
        for c in content or ():
            if isinstance(c, Mapping):
                text = c.get("text") or c.get("refusal")
                if text:
                    parts.add().text.text = text
        return
    if kind == "reasoning":
        for s in item.get("summary") or ():
            if isinstance(s, Mapping) and s.get("text"):
                parts.add().reasoning.text = s["text"]
        return
    if isinstance(kind, str) and isinstance(call_id, str) and call_id:
        if kind.endswith("_call_output"):
            output = item.get("output", "")
            result = parts.add().tool_result
            result.call_id = call_id
            result.name = str(item.get("name", ""))
            result.output = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        elif kind.endswith("_call"):
            arguments = item.get("arguments", item.get("input", item.get("action", "")))
            call = parts.add().tool_call
            call.call_id = call_id
            call.name = str(item.get("name", kind.removesuffix("_call")))
            call.arguments = (
                arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            )


def message_from_item(item: TResponseInputItem, *, message_id: str = "") -> message_pb2.Message:
    """The message that stores ``item``: its readable parts, then the item itself as JSON (hidden).

    An item with nothing readable (an encrypted reasoning item, say) is a hidden message: the model's,
    not the user interface's."""
    record = cast(Mapping[str, Any], item)
    kind = record.get("type")
    if isinstance(kind, str) and kind.endswith("_call_output"):
        role = message_pb2.ROLE_TOOL
    else:
        role = _ROLES.get(str(record.get("role")), message_pb2.ROLE_ASSISTANT)
    message = message_pb2.Message(message_id=message_id, role=role)
    _add_visible_parts(message.parts, record)
    message.hidden = not message.parts
    _frames.add_record_part(message.parts, ITEM_TYPE, json.dumps(record, ensure_ascii=False))
    return message


def item_from_message(message: message_pb2.Message) -> list[TResponseInputItem]:
    """The items a stored message holds: the verbatim item this adapter stored, or for a message that
    another writer appended, its equivalent in the order of its parts: tool calls, tool outputs, and a text
    message for the text parts between them."""
    text = _frames.record_text(message, ITEM_TYPE)
    if text is not None:
        return [cast(TResponseInputItem, json.loads(text))]
    items: list[dict[str, Any]] = []
    texts: list[str] = []  # text parts since the last call or output: one message item

    def flush_text() -> None:
        body = "".join(texts)
        texts.clear()
        if body and message.role in _ROLE_NAMES:
            items.append({"role": _ROLE_NAMES[message.role], "content": body})

    for part in message.parts:
        kind = part.WhichOneof("kind")
        if kind == "text":
            texts.append(part.text.text)
        elif kind == "tool_call":
            flush_text()
            call = part.tool_call
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                }
            )
        elif kind == "tool_result":
            flush_text()
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": part.tool_result.call_id,
                    "output": part.tool_result.output,
                }
            )
    flush_text()
    return [cast(TResponseInputItem, i) for i in items]


def _items(messages: Iterable[message_pb2.Message]) -> list[TResponseInputItem]:
    return [item for m in messages for item in item_from_message(m)]


class AgentSessionsSession(_frames.LazyClient):
    """An OpenAI Agents SDK session (the ``agents.memory.Session`` protocol) stored in Agent Sessions.

    Args:
        session_id: the service session that holds the history (caller-chosen ids such as
            ``user-42/conv-7`` work well); created on the first :meth:`add_items` if missing.
        client: an :class:`~agentsessions.AsyncSessionsClient` to share; by default one is opened on
            ``target`` (close it with :meth:`close`).
        target: the server, when no client is given.
        agent_id: the service agent the session is created under; registered when missing.
        user_id: the end user, set when the session is created.
        metadata: session metadata, set when the session is created.
        timeout_policy: the session's timeout policy, set when the session is created.
        session_settings: the SDK's settings; ``limit`` is the default of :meth:`get_items`.
    """

    def __init__(
        self,
        session_id: str,
        *,
        client: AsyncSessionsClient | None = None,
        target: str = DEFAULT_TARGET,
        agent_id: str = "openai-agents",
        user_id: str = "",
        metadata: Mapping[str, str] | None = None,
        timeout_policy: TimeoutPolicyInput | None = None,
        session_settings: SessionSettings | None = None,
    ) -> None:
        self.session_id = session_id
        self.session_settings: SessionSettings | None = session_settings or SessionSettings()
        self._use_client(client, target)
        self._agent_id = agent_id
        self._user_id = user_id
        self._metadata = dict(metadata or {})
        self._timeout_policy = timeout_policy

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The history, oldest first: all of it, or with ``limit`` (default ``session_settings.limit``) the
        newest ``limit`` items, cut so that no tool output comes without its call. ``limit=0`` gives none."""
        limit = resolve_session_limit(limit, self.session_settings)
        try:
            if limit is None or limit < 0:  # negative: everything, as the SDK's SQLiteSession does
                _, messages = await _frames.history(self.client, self.session_id)
            elif limit == 0:
                return []
            else:
                _, messages = await _frames.newest(self.client, self.session_id, limit)
            return _items(messages)
        except errors.NotFound:
            return []

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Appends ``items`` in order (batches of 100, each atomic and safe to retry)."""
        messages = [message_from_item(item, message_id=uuid.uuid4().hex) for item in items]
        for start in range(0, len(messages), _frames.MAX_BATCH):
            await self._append(messages[start : start + _frames.MAX_BATCH])

    async def _append(self, batch: Sequence[message_pb2.Message]) -> None:
        try:
            await self.client.append_messages(session_id=self.session_id, messages=batch)
            return
        except errors.NotFound as err:
            if err.reason != "SESSION_NOT_FOUND":
                raise
        await self._create()
        await self.client.append_messages(session_id=self.session_id, messages=batch)

    async def _create(self) -> None:
        for attempt in range(2):
            try:
                await self.client.create_session(
                    agent_id=self._agent_id,
                    session_id=self.session_id,
                    user_id=self._user_id,
                    metadata=self._metadata,
                    timeout_policy=self._timeout_policy,
                )
                return
            except errors.AlreadyExists:  # another writer created it meanwhile
                return
            except errors.NotFound as err:
                if err.reason != "AGENT_NOT_FOUND" or attempt:
                    raise
                await _frames.ensure_agent(self.client, self._agent_id)

    async def pop_item(self) -> TResponseInputItem | None:
        """Removes the newest item and returns it (None when the history is empty). A newer message that
        holds no item (another writer's reasoning alone, which :meth:`get_items` leaves out too) stays."""
        while True:
            message = await self._newest_with_items()
            if message is None:
                return None
            try:
                await self.client.delete_messages(session_id=self.session_id, message_id=message.message_id)
            except errors.NotFound as err:
                if err.reason == "MESSAGE_NOT_FOUND":  # a concurrent pop took it: take the next one
                    continue
                return None
            return item_from_message(message)[-1]

    async def _newest_with_items(self) -> message_pb2.Message | None:
        try:
            pager = await self.client.list_messages(
                session_id=self.session_id, order=message_pb2.MESSAGE_ORDER_DESCENDING, page_size=_POP_PAGE
            )
            async for message in pager:  # newest first
                if item_from_message(message):
                    return message
        except errors.NotFound:
            pass
        return None

    async def clear_session(self) -> None:
        """Deletes the whole history; the session stays active and usable."""
        with contextlib.suppress(errors.NotFound):
            await self.client.delete_messages(session_id=self.session_id, after_sequence=0)
