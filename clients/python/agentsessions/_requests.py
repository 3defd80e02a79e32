"""Request building shared by the async and the sync client: keyword arguments in, request messages out.

Each builder of a unary call returns a :class:`Prepared` that also says whether the call may be retried,
so both clients make the same idempotency decisions from one place.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from google.protobuf import field_mask_pb2, json_format, struct_pb2
from google.protobuf.message import Message as ProtoMessage

from agentsessions.v1 import (
    admin_service_pb2,
    agent_pb2,
    agent_service_pb2,
    message_pb2,
    message_service_pb2,
    session_pb2,
    session_service_pb2,
    turn_service_pb2,
)

RequestT = TypeVar("RequestT", bound=ProtoMessage)
MessageT = TypeVar("MessageT", bound=ProtoMessage)
EnumT = TypeVar("EnumT", bound=int)

MessageInput = message_pb2.Message | Mapping[str, Any]
TimeoutPolicyInput = session_pb2.TimeoutPolicy | Mapping[str, Any]
Variables = struct_pb2.Struct | Mapping[str, Any]

_TIMEOUT_POLICY_FIELDS = (
    "timeout_minutes",
    "auto_renew",
    "max_duration_minutes",
    "warning_threshold_minutes",
)
_AGENT_MUTABLE_FIELDS = ("display_name", "timeout_defaults", "history_window")


class Prepared(NamedTuple, Generic[RequestT]):
    """A request and whether sending it twice has the same effect as sending it once."""

    request: RequestT
    idempotent: bool


def coerce(value: MessageT | Mapping[str, Any], cls: type[MessageT]) -> MessageT:
    """Returns ``value`` if it is a ``cls``, else parses it as the JSON form of one (``ParseDict``)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")
    return json_format.ParseDict(dict(value), cls())


def struct(values: Variables) -> struct_pb2.Struct:
    """A ``google.protobuf.Struct`` holding a JSON object."""
    if isinstance(values, struct_pb2.Struct):
        return values
    result = struct_pb2.Struct()
    result.update(values)
    return result


def enum(value: EnumT | str, prefix: str) -> EnumT | str:
    """Accepts an enum value, its full name, or its short name in any case (``"active"``)."""
    if not isinstance(value, str):
        return value
    name = value.upper()
    return name if name.startswith(prefix) else prefix + name


def with_page_token(request: RequestT, token: str) -> RequestT:
    """A copy of a List request asking for the page ``token`` points at."""
    copy = type(request)()
    copy.CopyFrom(request)
    setattr(copy, "page_token", token)  # noqa: B010 - every List request has the field; the type does not say so
    return copy


def _all_have_ids(messages: Iterable[message_pb2.Message]) -> bool:
    return all(m.message_id for m in messages)


# SessionService


def create_session(
    *,
    agent_id: str,
    session_id: str,
    user_id: str,
    metadata: Mapping[str, str] | None,
    variables: Variables | None,
    timeout_policy: TimeoutPolicyInput | None,
    request_id: str | None,
) -> Prepared[session_service_pb2.CreateSessionRequest]:
    session = session_pb2.Session(agent_id=agent_id, user_id=user_id, metadata=metadata or {})
    if variables is not None:
        session.variables.CopyFrom(struct(variables))
    if timeout_policy is not None:
        session.timeout_policy.CopyFrom(coerce(timeout_policy, session_pb2.TimeoutPolicy))
    # A request id makes a repeated create return the first one's session, so the call can be retried.
    request_id = str(uuid.uuid4()) if request_id is None else request_id
    request = session_service_pb2.CreateSessionRequest(
        session=session, session_id=session_id, request_id=request_id
    )
    return Prepared(request, idempotent=bool(request_id))


def get_session(session_id: str) -> Prepared[session_service_pb2.GetSessionRequest]:
    return Prepared(session_service_pb2.GetSessionRequest(session_id=session_id), idempotent=True)


def list_sessions(
    *,
    agent_id: str,
    user_id: str,
    status: session_pb2.SessionStatus | str,
    metadata: Mapping[str, str] | None,
    page_size: int,
    page_token: str,
) -> Prepared[session_service_pb2.ListSessionsRequest]:
    request = session_service_pb2.ListSessionsRequest(
        agent_id=agent_id,
        user_id=user_id,
        status=enum(status, "SESSION_STATUS_"),
        metadata=metadata or {},
        page_size=page_size,
        page_token=page_token,
    )
    return Prepared(request, idempotent=True)


def update_session(
    *,
    session_id: str,
    metadata: Mapping[str, str] | None,
    variables: Variables | None,
    timeout_policy: TimeoutPolicyInput | None,
    update_mask: Sequence[str] | None,
    etag: str,
) -> Prepared[session_service_pb2.UpdateSessionRequest]:
    session = session_pb2.Session(session_id=session_id, etag=etag)
    paths: list[str] = []
    if metadata is not None:
        session.metadata.update(metadata)
        paths.append("metadata")
    if variables is not None:
        session.variables.CopyFrom(struct(variables))
        paths.append("variables")
    if timeout_policy is not None:
        session.timeout_policy.CopyFrom(coerce(timeout_policy, session_pb2.TimeoutPolicy))
        # Patch the policy fields given; an empty policy resets the whole session tier.
        paths += [f"timeout_policy.{f}" for f in _TIMEOUT_POLICY_FIELDS if session.timeout_policy.HasField(f)]
        paths += [] if session.timeout_policy.ListFields() else ["timeout_policy"]
    if update_mask is not None:
        paths = list(update_mask)
    if not paths:
        raise ValueError("update_session: pass metadata, variables, timeout_policy or update_mask")
    request = session_service_pb2.UpdateSessionRequest(
        session=session, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    # Updates set values, so a repeat is harmless, unless an etag makes the repeat fail with ABORTED.
    return Prepared(request, idempotent=not etag)


def end_session(session_id: str) -> Prepared[session_service_pb2.EndSessionRequest]:
    return Prepared(session_service_pb2.EndSessionRequest(session_id=session_id), idempotent=True)


def delete_session(
    *, session_id: str, force: bool, allow_missing: bool, etag: str
) -> Prepared[session_service_pb2.DeleteSessionRequest]:
    request = session_service_pb2.DeleteSessionRequest(
        session_id=session_id, force=force, allow_missing=allow_missing, etag=etag
    )
    # Without allow_missing a repeat of a delete that went through fails with NOT_FOUND.
    return Prepared(request, idempotent=allow_missing)


def renew_session(session_id: str) -> Prepared[session_service_pb2.RenewSessionRequest]:
    # Each renewal counts (renewal_count), so a renewal is not repeated behind the caller's back.
    return Prepared(session_service_pb2.RenewSessionRequest(session_id=session_id), idempotent=False)


def heartbeat(session_id: str) -> Prepared[session_service_pb2.HeartbeatRequest]:
    # With auto-renew on, a heartbeat renews the session and counts (renewal_count): not repeated either.
    return Prepared(session_service_pb2.HeartbeatRequest(session_id=session_id), idempotent=False)


def clear_session(session_id: str) -> Prepared[session_service_pb2.ClearSessionRequest]:
    return Prepared(session_service_pb2.ClearSessionRequest(session_id=session_id), idempotent=True)


def restore_session(
    *, session_id: str, messages: Sequence[MessageInput]
) -> Prepared[session_service_pb2.RestoreSessionRequest]:
    request = session_service_pb2.RestoreSessionRequest(
        session_id=session_id, messages=[coerce(m, message_pb2.Message) for m in messages]
    )
    # A repeat of a restore that went through would answer restored=false: not retried.
    return Prepared(request, idempotent=False)


def watch_session(
    *, session_id: str, after_event_id: int | None, include_deltas: bool
) -> session_service_pb2.WatchSessionRequest:
    return session_service_pb2.WatchSessionRequest(
        session_id=session_id, after_event_id=after_event_id, include_deltas=include_deltas
    )


# MessageService


def text_message(
    *,
    role: message_pb2.Role | str,
    text: str,
    message_id: str = "",
    hidden: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> message_pb2.Message:
    """A message with one text part."""
    return message_pb2.Message(
        message_id=message_id,
        role=enum(role, "ROLE_"),
        parts=[message_pb2.Part(text=message_pb2.TextPart(text=text))],
        hidden=hidden,
        metadata=metadata or {},
    )


def append_messages(
    *, session_id: str, messages: Sequence[MessageInput], set_variables: Variables | None = None
) -> Prepared[message_service_pb2.AppendMessagesRequest]:
    coerced = [coerce(m, message_pb2.Message) for m in messages]
    request = message_service_pb2.AppendMessagesRequest(session_id=session_id, messages=coerced)
    if set_variables:
        request.set_variables.CopyFrom(struct(set_variables))
    # The server skips messages whose caller-chosen id it already holds (and then sets no variable): with
    # ids, a repeat is harmless.
    return Prepared(request, idempotent=_all_have_ids(coerced))


def list_messages(
    *,
    session_id: str,
    view: message_pb2.MessageView | str,
    order: message_pb2.MessageOrder | str,
    page_size: int,
    page_token: str,
    after_sequence: int,
    before_sequence: int,
    include_session: bool = False,
) -> Prepared[message_service_pb2.ListMessagesRequest]:
    request = message_service_pb2.ListMessagesRequest(
        session_id=session_id,
        view=enum(view, "MESSAGE_VIEW_"),
        order=enum(order, "MESSAGE_ORDER_"),
        page_size=page_size,
        page_token=page_token,
        after_sequence=after_sequence,
        before_sequence=before_sequence,
        include_session=include_session,
    )
    return Prepared(request, idempotent=True)


def last_messages(
    *, session_id: str, n: int, view: message_pb2.MessageView | str
) -> Prepared[message_service_pb2.ListMessagesRequest]:
    """One descending page of ``n``: the newest messages, newest first (the clients reverse it)."""
    return list_messages(
        session_id=session_id,
        view=view,
        order=message_pb2.MESSAGE_ORDER_DESCENDING,
        page_size=n,
        page_token="",
        after_sequence=0,
        before_sequence=0,
    )


def delete_messages(
    *, session_id: str, message_id: str | None, after_sequence: int | None
) -> Prepared[message_service_pb2.DeleteMessagesRequest]:
    if (message_id is None) == (after_sequence is None):
        raise ValueError("delete_messages: pass exactly one of message_id and after_sequence")
    request = message_service_pb2.DeleteMessagesRequest(
        session_id=session_id, message_id=message_id, after_sequence=after_sequence
    )
    # Not retried: a repeat of a one-message delete is NOT_FOUND, and a repeat of "everything after N" whose
    # first attempt landed (its answer lost) would delete messages others appended in between.
    return Prepared(request, idempotent=False)


# TurnService


def execute(
    *,
    session_id: str,
    text: str | None,
    message: MessageInput | None,
    trigger: turn_service_pb2.Trigger | Mapping[str, Any] | None,
    continue_turn: turn_service_pb2.ContinueTurn | Mapping[str, Any] | None,
    request_id: str,
    multitask_strategy: turn_service_pb2.MultitaskStrategy | str,
    on_disconnect: turn_service_pb2.DisconnectBehavior | str,
) -> turn_service_pb2.ExecuteRequest:
    if sum(x is not None for x in (text, message, trigger, continue_turn)) != 1:
        raise ValueError("execute: pass exactly one of text, message, trigger and continue_turn")
    request = turn_service_pb2.ExecuteRequest(
        session_id=session_id,
        request_id=request_id,
        multitask_strategy=enum(multitask_strategy, "MULTITASK_STRATEGY_"),
        on_disconnect=enum(on_disconnect, "DISCONNECT_BEHAVIOR_"),
    )
    if text is not None:
        request.message.CopyFrom(text_message(role=message_pb2.ROLE_USER, text=text))
    elif message is not None:
        request.message.CopyFrom(coerce(message, message_pb2.Message))
    elif trigger is not None:
        request.trigger.CopyFrom(coerce(trigger, turn_service_pb2.Trigger))
    elif continue_turn is not None:
        request.continue_turn.CopyFrom(coerce(continue_turn, turn_service_pb2.ContinueTurn))
    return request


def stop_turn(*, session_id: str, turn_id: str) -> Prepared[turn_service_pb2.StopTurnRequest]:
    # A repeat would answer stopped=false, and without a turn_id could stop a newer turn: not retried.
    return Prepared(
        turn_service_pb2.StopTurnRequest(session_id=session_id, turn_id=turn_id), idempotent=False
    )


def connect_stop(*, session_id: str, turn_id: str) -> turn_service_pb2.ConnectRequest:
    return turn_service_pb2.ConnectRequest(stop=stop_turn(session_id=session_id, turn_id=turn_id).request)


def connect_heartbeat(session_id: str) -> turn_service_pb2.ConnectRequest:
    return turn_service_pb2.ConnectRequest(heartbeat=turn_service_pb2.HeartbeatFrame(session_id=session_id))


# AgentRegistryService and AdminService


def create_agent(
    *, agent: agent_pb2.Agent | Mapping[str, Any], agent_id: str
) -> Prepared[agent_service_pb2.CreateAgentRequest]:
    coerced = coerce(agent, agent_pb2.Agent)
    request = agent_service_pb2.CreateAgentRequest(agent=coerced, agent_id=agent_id or coerced.agent_id)
    # A repeat of a create that went through fails with ALREADY_EXISTS.
    return Prepared(request, idempotent=False)


def get_agent(agent_id: str) -> Prepared[agent_service_pb2.GetAgentRequest]:
    return Prepared(agent_service_pb2.GetAgentRequest(agent_id=agent_id), idempotent=True)


def list_agents(*, page_size: int, page_token: str) -> Prepared[agent_service_pb2.ListAgentsRequest]:
    request = agent_service_pb2.ListAgentsRequest(page_size=page_size, page_token=page_token)
    return Prepared(request, idempotent=True)


def update_agent(
    *, agent: agent_pb2.Agent | Mapping[str, Any], update_mask: Sequence[str] | None
) -> Prepared[agent_service_pb2.UpdateAgentRequest]:
    coerced = coerce(agent, agent_pb2.Agent)
    if update_mask is None:
        # Default: the fields the agent sets (proto3 cannot tell a scalar set to its default from unset).
        present = {descriptor.name for descriptor, _ in coerced.ListFields()}
        update_mask = [f for f in _AGENT_MUTABLE_FIELDS if f in present]
        update_mask += ["backend"] if coerced.WhichOneof("backend") else []
    if not update_mask:
        raise ValueError("update_agent: the agent sets no field to update; pass update_mask")
    request = agent_service_pb2.UpdateAgentRequest(
        agent=coerced, update_mask=field_mask_pb2.FieldMask(paths=list(update_mask))
    )
    # With an etag, a retry after a lost answer would fail ETAG_MISMATCH on its own write (as for sessions).
    return Prepared(request, idempotent=not coerced.etag)


def delete_agent(*, agent_id: str, allow_missing: bool) -> Prepared[agent_service_pb2.DeleteAgentRequest]:
    request = agent_service_pb2.DeleteAgentRequest(agent_id=agent_id, allow_missing=allow_missing)
    return Prepared(request, idempotent=allow_missing)


def get_server_stats() -> Prepared[admin_service_pb2.GetServerStatsRequest]:
    return Prepared(admin_service_pb2.GetServerStatsRequest(), idempotent=True)
