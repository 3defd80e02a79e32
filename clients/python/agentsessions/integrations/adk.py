"""A Google ADK ``BaseSessionService`` kept by Agent Sessions, so an ADK ``Runner`` keeps its sessions in the
service instead of a per-process database::

    from google.adk.runners import Runner
    from agentsessions.integrations.adk import AgentSessionsService

    sessions = AgentSessionsService("sessiond:50051")
    runner = Runner(app_name="weather_app", agent=root_agent, session_service=sessions)

How ADK's model maps onto the service:

- An app is a service agent (``app_name`` is the agent id), registered on first use when missing. A session
  is a service session of that agent, with ``user_id`` as its user and ADK's session id as its id. Session
  ids are global in the service, as on Vertex AI Agent Engine: an id that another app or user holds is
  ``AlreadyExistsError`` too, and reads of it through another app or user find nothing.
- State is the session's variables, with ADK's scopes served by the service itself: ``user:`` keys are
  shared by the user's sessions of the app, ``app:`` keys by all the app's sessions, ``temp:`` keys are
  never stored. A state delta is written key by key, so concurrent sessions never overwrite each other's
  keys. Values are stored as JSON, made so as ADK's own services make them (a ``datetime`` becomes its
  ISO string, a pydantic model its dict, a set a list; a value with no JSON form, a callable say, its
  string, with a warning). Numbers travel as JSON numbers (``google.protobuf.Value``, a double): a
  whole number reads back as an ``int``, whatever it was written as, and one beyond ±2**53 (a 64-bit
  id) comes back rounded, so keep such ids as strings.
- Each event is one message: readable parts (text, thoughts as reasoning, function calls and responses as
  tool calls and results linked by call id) for the UI view and other clients, and the event itself,
  verbatim JSON, in a hidden data part of type ``adk.event``, which is what comes back. Messages that
  other writers appended (a gateway, an agent turn) come back as equivalent events.
- ``get_session`` with ``num_recent_events=N`` reads the session and one page of the newest N messages in
  one call: O(N) whatever the history's length, and never a function response without its call (the
  window then starts after it, so it may hold fewer than N events). ``after_timestamp`` keeps the events
  from the newest back to the first one older than it, as ADK's in-memory service does, but never a
  function response whose call is older.
- A service opened without a client opens one per event loop that uses it, so ADK's sync ``Runner.run``
  (a new event loop per call) works too; :meth:`AgentSessionsService.close` closes them.
- ``append_event`` appends the event and sets its state delta in one call and one transaction
  (``AppendMessages`` with ``set_variables``), idempotent on the event id: a retry stores the event and
  applies the delta once. There is no stale-session check: appends are ordered by the service's sequence
  numbers, not by timestamps, so two writers of one session never fail each other.
- ``get_user_state`` is not offered (ADK's base raises ``NotImplementedError``): the service reads shared
  state through a session, whose ``state`` holds the ``user:`` keys.
- The service's timeouts apply: an expired session stays readable, and appends to it raise
  :class:`agentsessions.errors.FailedPrecondition` (reason ``SESSION_EXPIRED``); pass a
  ``timeout_policy`` to create sessions with longer ones.
"""

from __future__ import annotations

import json
import logging
import operator
from typing import Any

from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session
from google.adk.sessions.state import State
from google.genai import types
from google.protobuf import json_format
from pydantic_core import to_jsonable_python

from agentsessions import errors
from agentsessions._requests import TimeoutPolicyInput
from agentsessions.client import DEFAULT_TARGET, AsyncSessionsClient
from agentsessions.integrations import _frames
from agentsessions.v1 import message_pb2, session_pb2

__all__ = ["EVENT_TYPE", "AgentSessionsService", "event_from_message", "message_from_event"]

#: ``DataPart.type`` of the hidden part holding an event's JSON.
EVENT_TYPE = "adk.event"

# Whole numbers up to this size are exact in a double, so reading them back as int loses nothing.
_EXACT_INT = 2**53

log = logging.getLogger(__name__)


def _json_state(state: dict[str, Any]) -> dict[str, Any]:
    """State as the JSON the service stores, converted as ADK's database service converts it: a tool
    may put a ``datetime`` or a pydantic model in ``tool_context.state``, which a ``Struct`` refuses."""
    try:
        converted: dict[str, Any] = to_jsonable_python(state)
    except Exception:  # a value with no JSON form (a callable): its string, as ADK's services store it
        log.warning("session state holds values with no JSON form; they are stored as strings", exc_info=True)
        converted = to_jsonable_python(state, fallback=str)
    return converted


def message_from_event(event: Event) -> message_pb2.Message:
    """The message that stores ``event``: its readable parts, then the event itself as JSON (hidden). The
    event id is the message id, so appending the same event twice stores it once."""
    parts: list[message_pb2.Part] = []
    responds = False
    # Calls and responses without an id cannot be linked: they stay in the record only.
    for part in (event.content.parts or []) if event.content else []:
        if part.text:
            if part.thought:
                parts.append(message_pb2.Part(reasoning=message_pb2.ReasoningPart(text=part.text)))
            else:
                parts.append(message_pb2.Part(text=message_pb2.TextPart(text=part.text)))
        elif part.function_call is not None and part.function_call.id:
            call = part.function_call
            parts.append(
                message_pb2.Part(
                    tool_call=message_pb2.ToolCallPart(
                        call_id=call.id,
                        name=call.name or "",
                        arguments=json.dumps(call.args or {}, ensure_ascii=False, default=str),
                    )
                )
            )
        elif part.function_response is not None and part.function_response.id:
            response = part.function_response
            responds = True
            parts.append(
                message_pb2.Part(
                    tool_result=message_pb2.ToolResultPart(
                        call_id=response.id,
                        name=response.name or "",
                        output=json.dumps(response.response or {}, ensure_ascii=False, default=str),
                    )
                )
            )
    if responds:
        role = message_pb2.ROLE_TOOL
    elif event.author == "user":
        role = message_pb2.ROLE_USER
    else:
        role = message_pb2.ROLE_ASSISTANT
    # State-only events and the like are hidden: the model's, not the UI's.
    message = message_pb2.Message(message_id=event.id, role=role, parts=parts, hidden=not parts)
    _frames.add_record_part(message.parts, EVENT_TYPE, event.model_dump_json(exclude_none=True))
    return message


def event_from_message(message: message_pb2.Message) -> Event:
    """The event a stored message holds: the verbatim event this adapter stored, or for a message another
    writer appended, its equivalent (text, function calls and responses)."""
    text = _frames.record_text(message, EVENT_TYPE)
    if text is not None:
        return Event.model_validate_json(text)
    parts: list[types.Part] = []
    for part in message.parts:
        kind = part.WhichOneof("kind")
        if kind == "text":
            parts.append(types.Part(text=part.text.text))
        elif kind == "reasoning":
            parts.append(types.Part(text=part.reasoning.text, thought=True))
        elif kind == "tool_call":
            call = part.tool_call
            try:
                args = json.loads(call.arguments) if call.arguments else {}
            except ValueError:
                args = {"arguments": call.arguments}
            if not isinstance(args, dict):
                args = {"arguments": args}
            parts.append(
                types.Part(
                    function_call=types.FunctionCall(id=call.call_id or None, name=call.name, args=args)
                )
            )
        elif kind == "tool_result":
            result = part.tool_result
            try:
                output = json.loads(result.output)
            except ValueError:
                output = result.output
            response = output if isinstance(output, dict) else {"result": output}
            parts.append(
                types.Part(
                    function_response=types.FunctionResponse(
                        id=result.call_id or None, name=result.name, response=response
                    )
                )
            )
    user = message.role in (message_pb2.ROLE_USER, message_pb2.ROLE_TOOL)
    return Event(
        id=message.message_id,
        invocation_id=message.turn_id,
        author="user" if message.role == message_pb2.ROLE_USER else "model",
        content=types.Content(role="user" if user else "model", parts=parts) if parts else None,
        timestamp=message.create_time.seconds + message.create_time.nanos / 1e9,
    )


def _exact(value: Any) -> Any:
    """A JSON value read from a ``google.protobuf.Value``, whole numbers back to ``int``."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INT:
        return int(value)
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exact(v) for v in value]
    return value


_EVENT_ID = operator.attrgetter("id")


def _state(session: session_pb2.Session) -> dict[str, Any]:
    return {k: _exact(v) for k, v in json_format.MessageToDict(session.variables).items()}


def _after_cut_groups(events: list[Event]) -> list[Event]:
    """``events`` (oldest first, cut from older ones) from after the last function response whose call is
    not among them: a response never comes without its call."""
    start = 0
    calls: set[str] = set()
    for i, event in enumerate(events):
        if any(r.id and r.id not in calls for r in event.get_function_responses()):
            start = i + 1
            calls.clear()
        calls.update(c.id for c in event.get_function_calls() if c.id)
    return events[start:]


class AgentSessionsService(_frames.LazyClient, BaseSessionService):
    """A Google ADK session service stored in Agent Sessions.

    Args:
        target: the server, when no client is given.
        client: an :class:`~agentsessions.AsyncSessionsClient` to share; by default one is opened on
            ``target`` when first needed (close it with :meth:`close`).
        timeout_policy: the timeout policy of the sessions it creates (default: the app agent's and the
            server's defaults).
        register_apps: register an app as a service agent on first use when it is not one yet.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        client: AsyncSessionsClient | None = None,
        timeout_policy: TimeoutPolicyInput | None = None,
        register_apps: bool = True,
    ) -> None:
        self._use_client(client, target)
        self._timeout_policy = timeout_policy
        self._register_apps = register_apps

    def _to_adk(self, stored: session_pb2.Session, events: list[Event] | None = None) -> Session:
        return Session(
            id=stored.session_id,
            app_name=stored.agent_id,
            user_id=stored.user_id,
            state=_state(stored),
            events=events or [],
            last_update_time=stored.update_time.seconds + stored.update_time.nanos / 1e9,
        )

    async def _owned(self, app_name: str, user_id: str, session_id: str) -> session_pb2.Session | None:
        """The stored session if it exists and belongs to this app and user."""
        try:
            stored = await self.client.get_session(session_id=session_id.strip())
        except errors.NotFound:
            return None
        if stored.agent_id != app_name or stored.user_id != user_id:
            return None
        return stored

    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        """Creates a session (its id generated, time-ordered, when none is given). ``user:`` and ``app:``
        keys of ``state`` go to the shared scopes; ``temp:`` keys are dropped. A taken id raises
        ``AlreadyExistsError``."""
        for attempt in range(2):
            try:
                stored = await self.client.create_session(
                    agent_id=app_name,
                    session_id=(session_id or "").strip(),
                    user_id=user_id,
                    variables=_json_state(state or {}),
                    timeout_policy=self._timeout_policy,
                )
                return self._to_adk(stored)
            except errors.AlreadyExists as err:
                raise AlreadyExistsError(f"Session with id {session_id} already exists.") from err
            except errors.NotFound as err:
                if err.reason != "AGENT_NOT_FOUND" or not self._register_apps or attempt:
                    raise
                await _frames.ensure_agent(self.client, app_name)
        raise AssertionError("unreachable")

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        """The session with its merged state and its events (all, or as ``config`` limits them), or None.

        One call reads the session and its newest events together (ListMessages with
        ``include_session``); longer reads go on page by page. Events of a session that turns out not to
        be this app's and user's are dropped undecoded."""
        recent = config.num_recent_events if config else None
        after = config.after_timestamp if config else None
        session_id = session_id.strip()
        if recent == 0:
            stored = await self._owned(app_name, user_id, session_id)
            return None if stored is None else self._to_adk(stored, [])
        events: list[Event] | None = None
        try:
            if after is not None:
                found, events = await self._events_since(session_id, after, recent)
            elif recent is not None:
                found, messages = await _frames.newest(self.client, session_id, recent, include_session=True)
            else:
                found, messages = await _frames.history(self.client, session_id, include_session=True)
        except errors.NotFound:
            return None
        if found is None or found.agent_id != app_name or found.user_id != user_id:
            return None
        if events is None:  # decoded only once the session is known to be this app's and user's
            events = [event_from_message(m) for m in messages]
        return self._to_adk(found, events)

    async def _events_since(
        self, session_id: str, after: float, limit: int | None
    ) -> tuple[session_pb2.Session | None, list[Event]]:
        """From the newest event back to (not including) the first one older than ``after``, at most the
        newest ``limit`` (as ``_frames.newest`` counts them): descending pages, read only as far as needed;
        the session comes with the first.

        The pages are taken as the server cuts them, so that no function response comes without its call:
        with a limit, the page that asks for the last events wanted is the last one read, whether it came
        back short (a call kept with its responses) or grown (a group larger than the page), and nothing is
        cut from it. Where ``after`` falls inside a group, the window starts after its last response."""
        found: list[Event] = []
        session: session_pb2.Session | None = None
        token = ""
        while True:
            wanted = _frames.MAX_PAGE if limit is None else limit - len(found)
            page = (
                await self.client.list_messages(
                    session_id=session_id,
                    order=message_pb2.MESSAGE_ORDER_DESCENDING,
                    page_size=min(wanted, _frames.MAX_PAGE),
                    page_token=token,
                    include_session=session is None,
                )
            ).first_page
            if page.HasField("session"):
                session = page.session
            for message in page.messages:
                event = event_from_message(message)
                if event.timestamp < after:
                    return session, _after_cut_groups(found[::-1])
                found.append(event)
            token = page.next_page_token
            if not token or (limit is not None and (wanted <= _frames.MAX_PAGE or len(found) >= limit)):
                return session, found[::-1]

    async def list_sessions(self, *, app_name: str, user_id: str | None = None) -> ListSessionsResponse:
        """The app's sessions (of one user, when given), without events, oldest update first."""
        pager = await self.client.list_sessions(
            agent_id=app_name, user_id=user_id or "", page_size=_frames.MAX_PAGE
        )
        sessions = [self._to_adk(s) async for s in pager if user_id is None or s.user_id == user_id]
        sessions.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=sessions)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        """Deletes a session and its events; a missing one is no error."""
        if await self._owned(app_name, user_id, session_id) is None:
            return
        await self.client.delete_session(session_id=session_id.strip(), force=True, allow_missing=True)

    async def append_event(self, session: Session, event: Event) -> Event:
        """Stores ``event`` and applies its state delta: own keys to the session, ``user:`` and ``app:`` keys
        to the shared scopes (``temp:`` keys only to the in-memory session). Partial events are not stored."""
        if event.partial:
            return event
        # An equal re-delivery is stored once, as ADK's in-memory service treats it. The id scan runs in C
        # (map, attrgetter): a long session made the Python-level scan a third of this method's time.
        if event.id in map(_EVENT_ID, session.events) and any(
            e.id == event.id and e == event for e in session.events
        ):
            return event
        if not event.id:
            event.id = Event.new_id()
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        delta = {
            k: v for k, v in (event.actions.state_delta or {}).items() if not k.startswith(State.TEMP_PREFIX)
        }
        # The event and its state delta land in one transaction, as in ADK's own database service; the
        # event id is the message id, so a retried append_event stores and applies them once.
        message = message_from_event(event)
        try:
            stored = await self.client.append_messages(
                session_id=session.id, messages=[message], set_variables=_json_state(delta) if delta else None
            )
        except errors.NotFound as err:
            if err.reason == "SESSION_NOT_FOUND":
                raise SessionNotFoundError(f"Session {session.id} not found.") from err
            raise
        # The server keeps what it holds under a known id (a retry's), so another event under a stored
        # id would be dropped in silence while this session went on with it.
        kept = _frames.record_text(stored.messages[0], EVENT_TYPE) if stored.messages else None
        if kept is not None and kept != _frames.record_text(message, EVENT_TYPE):
            raise ValueError(f"Event {event.id} is stored in session {session.id} with other content.")
        self._commit_event_to_session(session, event)
        session.last_update_time = event.timestamp
        return event
