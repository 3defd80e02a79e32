"""Proto <-> domain, and the validation of what callers send. Only the API layer sees protos."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from agentsessions.v1 import agent_pb2, message_pb2, session_pb2

from ..domain import model
from ..domain.agents import BACKEND_KINDS, Agent, AgentOrigin
from ..domain.errors import InvalidArgument
from ..domain.model import NewMessage, Session, StoredMessage
from ..domain.policy import POLICY_FIELDS, EffectivePolicy, TimeoutPolicy
from ..domain.state import merged as merged_variables
from ..domain.turns import MAX_HISTORY_WINDOW
from ..domain.validation import (
    Limits,
    check_message_id,
    check_metadata,
    check_text,
    check_variables,
    uuid7,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_time(field: timestamp_pb2.Timestamp, value: datetime) -> None:
    """`field.FromDatetime(value)` for the store's aware datetimes, in a fraction of its time (it is
    pure Python and shows in profiles of every read)."""
    delta = value - _EPOCH
    field.seconds = delta.days * 86_400 + delta.seconds
    field.nanos = delta.microseconds * 1000


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    set_time(ts, value)
    return ts


# --- sessions -----------------------------------------------------------------------------------------


def policy_from_pb(pb: session_pb2.TimeoutPolicy) -> TimeoutPolicy:
    return TimeoutPolicy(**{name: getattr(pb, name) for name in POLICY_FIELDS if pb.HasField(name)})


def policy_to_pb(policy: TimeoutPolicy) -> session_pb2.TimeoutPolicy:
    return session_pb2.TimeoutPolicy(
        timeout_minutes=policy.timeout_minutes,
        auto_renew=policy.auto_renew,
        max_duration_minutes=policy.max_duration_minutes,
        warning_threshold_minutes=policy.warning_threshold_minutes,
    )


# How deep lists and objects may nest in a JSON value a caller sends (a Struct or a Value). Stored values
# travel on inside events and frames, a few message levels deeper; protobuf refuses to decode past 100
# levels, and each level of JSON is two (Value, then Struct or ListValue). 32 keeps every wrapping of an
# accepted value decodable.
MAX_JSON_DEPTH = 32


def json_from_pb(pb: struct_pb2.Struct | struct_pb2.Value, field: str) -> Any:
    """A Struct or a Value as plain JSON data (numbers as floats, as json_format has them). Refuses what
    JSON cannot hold (NaN, infinities) and nesting deeper than MAX_JSON_DEPTH, either of which would
    otherwise be stored and fail every later read that decodes or encodes it."""
    if isinstance(pb, struct_pb2.Struct):
        return _json_object(pb, field, 1)
    return _json_value(pb, field, 0)


def _json_object(pb: struct_pb2.Struct, field: str, depth: int) -> dict[str, Any]:
    if depth > MAX_JSON_DEPTH:
        raise InvalidArgument.field(field, f"nests lists and objects more than {MAX_JSON_DEPTH} levels deep")
    return {key: _json_value(value, field, depth) for key, value in pb.fields.items()}


def _json_value(pb: struct_pb2.Value, field: str, depth: int) -> Any:
    kind = pb.WhichOneof("kind")
    if kind == "number_value":
        if not math.isfinite(pb.number_value):
            raise InvalidArgument.field(field, "numbers must be finite: JSON has no NaN or Infinity")
        return pb.number_value
    if kind == "string_value":
        return pb.string_value
    if kind == "bool_value":
        return pb.bool_value
    if kind == "struct_value":
        return _json_object(pb.struct_value, field, depth + 1)
    if kind == "list_value":
        if depth + 1 > MAX_JSON_DEPTH:
            raise InvalidArgument.field(
                field, f"nests lists and objects more than {MAX_JSON_DEPTH} levels deep"
            )
        return [_json_value(item, field, depth + 1) for item in pb.list_value.values]
    return None  # null_value, or no kind set (read as null, as json_format does)


def struct_to_dict(pb: struct_pb2.Struct, field: str) -> dict[str, Any]:
    data: dict[str, Any] = json_from_pb(pb, field)
    return data


def dict_to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    pb = struct_pb2.Struct()
    if data:
        pb.update(data)
    return pb


def variables_from_pb(pb: struct_pb2.Struct, limits: Limits, field: str) -> dict[str, Any]:
    variables = struct_to_dict(pb, field)
    check_variables(variables, limits, field)
    return variables


def metadata_from_pb(pb: Any, limits: Limits, field: str) -> dict[str, str]:
    metadata = dict(pb)
    check_metadata(metadata, limits, field)
    return metadata


def session_to_pb(s: Session, now: datetime) -> session_pb2.Session:
    # Field by field, with the two policies from a cache of their encoded forms: the constructor with
    # keyword arguments (a Timestamp built and copied per time, the nested policies built anew) took
    # 19 µs, and every append and every event encodes a session.
    pb = session_pb2.Session(
        session_id=s.session_id,
        agent_id=s.agent_id,
        user_id=s.user_id,
        status=int(s.status(now)),  # type: ignore[arg-type]
        near_expiration=s.near_expiration(now),
        renewal_count=s.renewal_count,
        message_count=s.message_count,
        last_sequence=s.last_sequence,
        etag=s.etag,
        last_event_id=s.last_event_id,
    )
    if s.metadata:
        pb.metadata.update(s.metadata)
    variables = merged_variables(s.variables, s.shared)
    if variables:
        pb.variables.update(variables)
    else:
        pb.variables.SetInParent()
    pb.timeout_policy.MergeFromString(_encoded(_policy_bytes, s.policy))
    pb.effective_timeout_policy.MergeFromString(_encoded(_effective_bytes, s.effective))
    set_time(pb.create_time, s.create_time)
    set_time(pb.update_time, s.update_time)
    set_time(pb.last_activity_time, s.last_activity_time)
    set_time(pb.expire_time, s.expire_time)
    set_time(pb.max_expire_time, s.max_expire_time)
    if s.end_time is not None:
        set_time(pb.end_time, s.end_time)
    remaining = s.time_remaining(now)
    pb.time_remaining.seconds = remaining.days * 86_400 + remaining.seconds
    pb.time_remaining.nanos = remaining.microseconds * 1000
    return pb


_ENCODED: dict[Any, bytes] = {}  # policies (frozen, hashable) -> their encoded message; a few in use


def _encoded(encode: Callable[[Any], bytes], value: Any) -> bytes:
    key = (encode, value)
    found = _ENCODED.get(key)
    if found is None:
        if len(_ENCODED) >= 4096:
            _ENCODED.clear()
        found = _ENCODED[key] = encode(value)
    return found


def _policy_bytes(policy: TimeoutPolicy) -> bytes:
    return policy_to_pb(policy).SerializeToString()


def _effective_bytes(eff: EffectivePolicy) -> bytes:
    return session_pb2.EffectiveTimeoutPolicy(
        timeout_minutes=eff.timeout_minutes,
        auto_renew=eff.auto_renew,
        max_duration_minutes=eff.max_duration_minutes,
        warning_threshold_minutes=eff.warning_threshold_minutes,
        timeout_minutes_source=int(eff.sources[0]),  # type: ignore[arg-type]
        auto_renew_source=int(eff.sources[1]),  # type: ignore[arg-type]
        max_duration_minutes_source=int(eff.sources[2]),  # type: ignore[arg-type]
        warning_threshold_minutes_source=int(eff.sources[3]),  # type: ignore[arg-type]
    ).SerializeToString()


# --- messages -----------------------------------------------------------------------------------------

_PART_KINDS = ("text", "reasoning", "tool_call", "tool_result", "file", "data")
# A tool's name (OpenAI allows 64 characters; MCP servers prefix theirs): a name, not a payload.
MAX_TOOL_NAME = 256
_ROLES: dict[int, model.Role] = {int(r): r for r in model.Role}
_MESSAGE_STATUSES: dict[int, model.MessageStatus] = {int(s): s for s in model.MessageStatus}


def new_message_from_pb(
    pb: message_pb2.Message, limits: Limits, field: str, *, default_role: int = 0
) -> NewMessage:
    """Validates one message a caller sends and turns it into a NewMessage (content = serialized parts).
    Written for speed (every appended message passes here): field paths are built only for errors."""
    role = _ROLES.get(pb.role or default_role)
    if role is None:
        raise InvalidArgument.field(f"{field}.role", "must be USER, ASSISTANT, SYSTEM or TOOL")
    status = _MESSAGE_STATUSES.get(pb.status or model.MessageStatus.COMPLETE)
    if status is None:
        raise InvalidArgument.field(f"{field}.status", f"unknown message status {pb.status}")
    message_id = pb.message_id
    if message_id:
        check_message_id(message_id, limits, f"{field}.message_id")
    parts = pb.parts
    if not parts:
        raise InvalidArgument.field(f"{field}.parts", "a message needs at least one part")
    if len(parts) > limits.max_parts_per_message:
        raise InvalidArgument.field(
            f"{field}.parts", f"at most {limits.max_parts_per_message} parts per message"
        )
    metadata = pb.metadata
    if metadata:
        check_metadata(metadata, limits, f"{field}.metadata")
    calls: list[str] = []
    results: list[str] = []
    for j, part in enumerate(parts):
        kind = part.WhichOneof("kind")
        if kind == "text" or kind == "reasoning":
            continue
        where = f"{field}.parts[{j}]"
        if kind is None:
            raise InvalidArgument.field(where, f"a part needs one of {', '.join(_PART_KINDS)}")
        if kind == "tool_call":
            check_call_id(part.tool_call.call_id, f"{where}.tool_call.call_id", limits)
            if not part.tool_call.name:
                raise InvalidArgument.field(f"{where}.tool_call.name", "is required")
            check_text(part.tool_call.name, f"{where}.tool_call.name", MAX_TOOL_NAME)
            calls.append(part.tool_call.call_id)
        elif kind == "tool_result":
            check_call_id(part.tool_result.call_id, f"{where}.tool_result.call_id", limits)
            check_text(part.tool_result.name, f"{where}.tool_result.name", MAX_TOOL_NAME)
            results.append(part.tool_result.call_id)
        elif kind == "file":
            if not part.file.uri:
                raise InvalidArgument.field(f"{where}.file.uri", "is required")
            if part.file.size_bytes < 0:
                raise InvalidArgument.field(f"{where}.file.size_bytes", "must not be negative")
        elif kind == "data":
            json_from_pb(part.data.value, f"{where}.data.value")
    content = message_pb2.Message(parts=parts).SerializeToString()
    if len(content) > limits.max_message_bytes:
        raise InvalidArgument.field(
            f"{field}.parts",
            f"message content is {len(content)} bytes; the limit is {limits.max_message_bytes}",
        )
    return NewMessage(
        message_id=message_id or uuid7(),
        role=role,
        content=content,
        hidden=pb.hidden,
        metadata=dict(metadata) if metadata else {},
        status=status,
        tool_call_ids=tuple(calls),
        tool_result_ids=tuple(results),
        caller_id=bool(pb.message_id),
    )


def check_call_id(call_id: str, field: str, limits: Limits) -> None:
    """A tool call's id, from a caller or an agent: required, and what the store's call id column holds."""
    if not call_id:
        raise InvalidArgument.field(field, "is required")
    check_text(call_id, field, limits.max_message_id_length)


def new_messages_from_pb(
    pbs: Sequence[message_pb2.Message], limits: Limits, field: str = "messages", *, allow_empty: bool = False
) -> list[NewMessage]:
    if not pbs and not allow_empty:
        raise InvalidArgument.field(field, "at least one message is required")
    if len(pbs) > limits.max_batch_messages:
        raise InvalidArgument.field(
            field,
            f"at most {limits.max_batch_messages} messages per call, got {len(pbs)}",
            limit=str(limits.max_batch_messages),
        )
    converted = [new_message_from_pb(pb, limits, f"{field}[{i}]") for i, pb in enumerate(pbs)]
    seen: set[str] = set()
    for i, m in enumerate(converted):
        if m.message_id in seen:
            raise InvalidArgument.field(
                f"{field}[{i}].message_id", f"{m.message_id!r} appears twice in the request"
            )
        seen.add(m.message_id)
    return converted


def message_to_pb(m: StoredMessage, *, ui_view: bool) -> message_pb2.Message:
    pb = message_pb2.Message.FromString(m.content)
    if ui_view and any(p.hidden for p in pb.parts):
        visible = [p for p in pb.parts if not p.hidden]
        del pb.parts[:]
        pb.parts.extend(visible)
    pb.message_id = m.message_id
    pb.session_id = m.session_id
    pb.sequence = m.sequence
    pb.role = m.role  # type: ignore[assignment]
    pb.hidden = m.hidden
    pb.status = m.status  # type: ignore[assignment]
    pb.turn_id = m.turn_id
    if m.metadata:
        pb.metadata.update(m.metadata)
    set_time(pb.create_time, m.create_time)
    return pb


# --- agents -------------------------------------------------------------------------------------------


# The numbers of each backend, with their ranges (0 means "none" or "the server default" for each).
_BACKEND_NUMBERS: dict[str, tuple[tuple[str, int, int], ...]] = {
    "echo": (("word_delay_ms", 0, 10_000),),
    "remote": (("timeout_seconds", 0, 86_400),),
    "openai_chat": (("max_tokens", 0, 2**31 - 1), ("timeout_seconds", 0, 86_400)),
}


# An agent's backend settings, system prompt and tools included: an agent is read whole by every turn
# and every ListAgents page, and the larger ones had made those answers too large for the clients.
MAX_BACKEND_BYTES = 256 * 1024


def backend_from_pb(pb: agent_pb2.Agent) -> dict[str, Any]:
    kind = pb.WhichOneof("backend")
    if kind is None:
        raise InvalidArgument.field("agent.backend", f"one of {', '.join(BACKEND_KINDS)} is required")
    size = getattr(pb, kind).ByteSize()
    if size > MAX_BACKEND_BYTES:
        raise InvalidArgument.field(
            f"agent.{kind}",
            f"is {size} bytes (system prompt and tools included); the limit is {MAX_BACKEND_BYTES}",
        )
    for name, low, high in _BACKEND_NUMBERS.get(kind, ()):
        value = getattr(getattr(pb, kind), name)
        if not low <= value <= high:
            raise InvalidArgument.field(
                f"agent.{kind}.{name}", f"must be between {low} and {high}, got {value}"
            )
    if kind == "openai_chat":
        for i, tool in enumerate(pb.openai_chat.tools):
            json_from_pb(tool, f"agent.openai_chat.tools[{i}]")
    settings = json_format.MessageToDict(getattr(pb, kind), preserving_proto_field_name=True)
    if kind == "remote":
        if not pb.remote.target:
            raise InvalidArgument.field("agent.remote.target", "is required")
        check_text(pb.remote.target, "agent.remote.target", 1024)
    if kind == "openai_chat":
        if not pb.openai_chat.base_url or not pb.openai_chat.model:
            raise InvalidArgument.field("agent.openai_chat", "base_url and model are required")
        check_text(pb.openai_chat.model, "agent.openai_chat.model", 256)
        _check_base_url(pb.openai_chat.base_url)
    return {"kind": kind, **settings}


def _check_base_url(url: str) -> None:
    """An http(s) URL with a host, checked when the agent is stored: a URL no request can be sent to
    would otherwise fail every turn of the agent."""
    field = "agent.openai_chat.base_url"
    check_text(url, field, 2048)
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidArgument.field(field, f"must be an http:// or https:// URL with a host, got {url!r}")
    try:
        parsed.port  # noqa: B018 - raises for a port that is not a number or out of range
    except ValueError as err:
        raise InvalidArgument.field(field, f"has an invalid port: {err}") from None


def check_history_window(value: int, field: str = "agent.history_window") -> None:
    if not 0 <= value <= MAX_HISTORY_WINDOW:
        raise InvalidArgument.field(field, f"must be between 0 (the server default) and {MAX_HISTORY_WINDOW}")


def agent_from_pb(pb: agent_pb2.Agent, agent_id: str, now: datetime) -> Agent:
    check_history_window(pb.history_window)
    check_text(pb.display_name, "agent.display_name", 256)
    return Agent(
        agent_id=agent_id,
        display_name=pb.display_name,
        backend=backend_from_pb(pb),
        timeout_defaults=policy_from_pb(pb.timeout_defaults),
        history_window=pb.history_window,
        origin=AgentOrigin.API,
        create_time=now,
        update_time=now,
    )


def agent_to_pb(a: Agent) -> agent_pb2.Agent:
    pb = agent_pb2.Agent(
        agent_id=a.agent_id,
        display_name=a.display_name,
        timeout_defaults=policy_to_pb(a.timeout_defaults),
        history_window=a.history_window,
        origin=int(a.origin),  # type: ignore[arg-type]
        create_time=_ts(a.create_time),
        update_time=_ts(a.update_time),
        etag=a.etag,
    )
    backend = getattr(pb, a.backend["kind"])
    backend.SetInParent()
    json_format.ParseDict({k: v for k, v in a.backend.items() if k != "kind"}, backend)
    return pb
