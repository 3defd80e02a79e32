"""Generated requests on every RPC: the promise that every RPC validates its input and answers with the right
status and ErrorInfo, and that no request crashes the server, corrupts a session or drops an acknowledged
message, tested beyond the hand-picked bad inputs of test_errors_and_services.py.

The methods come from the generated descriptors (every service the server serves; `AgentService` is the one
a remote agent implements, not the server). Requests are built from the message descriptors: every field
kind (strings empty, long, with NUL, control and astral characters; integers at and past their extremes;
enums with unknown numbers; repeated fields, maps, oneofs, nested messages to a bounded depth; Struct and
Value holding NaN, infinities and deep nesting; Timestamp, Duration and FieldMask with any contents). String
fields are biased by name toward ids that exist (a pool of sessions, agents, message and call ids created
first) and toward plausible values, so that a good share of the requests are valid and reach the store,
the turn runner and the paging code, not only the validation. Some requests go as raw bytes instead: random
ones, and valid requests with bytes flipped, cut or inserted. Connect gets a short random run of frames.

Every call must end OK, or with a status other than UNKNOWN, INTERNAL, UNAVAILABLE, UNIMPLEMENTED (every
RPC is built) and DEADLINE_EXCEEDED (a hang), carrying an ErrorInfo of our domain with a reason; CANCELLED
only where the test cancelled a stream itself (a watch, or a turn it read enough of). Connect error frames
and turn errors follow the same rules. No sessiond logger may log an ERROR (an unexpected failure, see
api/errors.py). Afterwards the server still serves, the messages acknowledged to the fuzzer in the pool's
sessions read back as acknowledged (unless the fuzzer itself deleted, cleared or replaced them), and
witness sessions the fuzzer never names hold exactly what was appended to them.

Before the generated requests: every method gets random bytes, then every field of a valid request of every
method gets, one at a time, each value at or past a bound (EDGE_*): those are certain to be sent, where the
generated requests reach them by chance. Hypothesis runs in a worker thread; every call goes through the
test's event loop (`run`), where the server and a grpc.aio channel live. Runs are repeatable
(`derandomize`), with no example database.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
from assertions import DOMAIN, REASON, SERVED
from google.protobuf import field_mask_pb2, json_format, struct_pb2, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentsessions import AsyncSessionsClient, Message, Part, Role, TextPart, errors
from agentsessions.v1 import (
    admin_service_pb2,
    agent_pb2,
    agent_service_pb2,
    events_pb2,
    message_pb2,
    message_service_pb2,
    session_service_pb2,
    turn_service_pb2,
)

T = TypeVar("T")

METHODS: list[MethodDescriptor] = [
    method
    for module in (
        session_service_pb2,
        message_service_pb2,
        agent_service_pb2,
        admin_service_pb2,
        turn_service_pb2,
    )
    for service in module.DESCRIPTOR.services_by_name.values()
    if service.full_name in SERVED
    for method in service.methods
]
# Never an answer to a request: a crash, a hang, a failure of the database, a method not built.
FORBIDDEN = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
}
DEADLINE = 5.0  # seconds per call; every request here is answered in milliseconds
MAX_DEPTH = 4  # nested messages below the request (JSON values nest deeper, on purpose)
POOL_SESSIONS = 3
WITNESSES = 2

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same requests on every run: CI is repeatable
    database=None,
    suppress_health_check=list(HealthCheck),
)


# --- values ---------------------------------------------------------------------------------------------

# Any character UTF-8 can carry (surrogates cannot): NUL, controls, astral ones included.
any_char = st.characters(codec="utf-8")
printable = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=20)
plain = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=10)
junk = st.one_of(
    st.just(""),
    st.text(any_char, max_size=12),
    st.sampled_from(["a\x00b", "\U0001f600", "é", " ", "\n", "a/b", "../x", "%00", "\ud7ff\ue000", "\x7f"]),
    # Long: a few KB, past every limit on ids and short texts
    st.tuples(st.text(any_char, min_size=1, max_size=4), st.integers(100, 4000)).map(
        lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]]
    ),
)


def with_junk(*likely: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly the plausible values given, sometimes anything."""
    return st.one_of(*likely, *likely, junk)


def ints(bits: int, *, signed: bool = True, near: Sequence[int] = ()) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = sorted({low, high, low + 1, high - 1, 0, 1} | ({-1} if signed else set()) | set(near))
    return st.one_of(
        st.integers(max(low, -2), min(high, 40)),
        st.sampled_from([e for e in edges if low <= e <= high]),
        st.integers(low, high),
    )


JSON_NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 2.0**53 + 1, -0.0, 1e308, 5e-324]),
)
json_keys = st.one_of(st.sampled_from(["topic", "user:lang", "app:model", "temp:x", "step", ""]), junk)
json_data: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), JSON_NUMBERS, st.text(any_char, max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(json_keys, inner, max_size=4)),
    max_leaves=10,
)
# Lists or objects nested around the server's bound of 32 levels, either side of it.
deep_json = st.tuples(st.integers(28, 52), st.booleans()).map(lambda t: _nest(t[0], as_object=t[1]))


def _nest(levels: int, *, as_object: bool) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"k": value} if as_object else [value]
    return value


def to_value(data: Any) -> struct_pb2.Value:
    """Any JSON-ish data as a Value, NaN and infinities included (which `Struct.update` also allows)."""
    value = struct_pb2.Value()
    _fill(value, data)
    return value


def _fill(value: struct_pb2.Value, data: Any) -> None:
    # In place: appending or merging a Value goes through the wire format, which refuses the deepest ones.
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, int | float):
        value.number_value = data
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, list):
        value.list_value.SetInParent()
        for item in data:
            _fill(value.list_value.values.add(), item)
    else:
        value.struct_value.SetInParent()
        for key, item in data.items():
            _fill(value.struct_value.fields[key], item)


values = st.one_of(
    st.builds(to_value, json_data),
    st.builds(to_value, deep_json),
    st.just(struct_pb2.Value()),  # no kind set at all
)


def to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, item in data.items():
        _fill(struct.fields[key], item)
    return struct


structs = st.one_of(
    st.builds(to_struct, st.dictionaries(json_keys, json_data, max_size=5)),
    st.builds(to_struct, st.dictionaries(json_keys, deep_json, min_size=1, max_size=1)),
    st.builds(lambda key: to_struct({key: "x" * 70_000}), json_keys),  # past max_variables_bytes
)
finite_json: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), plain),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(plain, inner, max_size=3)),
    max_leaves=6,
)
tame_values = st.builds(to_value, finite_json)
tame_structs = st.builds(
    to_struct,
    st.dictionaries(st.sampled_from(["topic", "user:lang", "app:model", "temp:x", "step"]), finite_json),
)
SESSION_PATHS = [
    "*", "metadata", "variables", "timeout_policy", "timeout_policy.timeout_minutes",
    "timeout_policy.auto_renew", "timeout_policy.max_duration_minutes",
    "timeout_policy.warning_threshold_minutes", "variables.topic", "variables.`user:lang`",
    "variables.`app:model`", "variables.`temp:x`",
]  # fmt: skip
AGENT_PATHS = [
    "*", "display_name", "echo", "remote", "openai_chat", "timeout_defaults",
    "timeout_defaults.timeout_minutes", "history_window",
]  # fmt: skip
MASK_PATHS = [
    *SESSION_PATHS, *AGENT_PATHS, "variables.`a`b`", "variables.``", "variables.", "variables.`",
    "session_id", "agent_id", "user_id", "etag", "status", "backend", "echo.word_delay_ms", "remote.target",
    "", ".", "timeout_policy.",
]  # fmt: skip
field_masks = st.builds(
    lambda paths: field_mask_pb2.FieldMask(paths=paths),
    st.lists(st.one_of(st.sampled_from(MASK_PATHS), st.sampled_from(MASK_PATHS), junk), max_size=4),
)


tame_field_masks = {
    owner: st.builds(
        lambda paths: field_mask_pb2.FieldMask(paths=paths), st.lists(st.sampled_from(p), max_size=2)
    )
    for owner, p in (("UpdateSessionRequest", SESSION_PATHS), ("UpdateAgentRequest", AGENT_PATHS))
}


def page_token(position: Any, fingerprint: str) -> str:
    raw = json.dumps({"p": position, "f": fingerprint}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Tokens this service might have issued (a position and a fingerprint), and what only looks like one.
deep_tokens = st.builds(  # JSON nested deeper than a parser's recursion limit, or not quite
    lambda n, c: b64(c.encode() * n),
    st.sampled_from([10, 200, 5000, 100_000]),  # clear of the limit either side: the same outcome every run
    st.sampled_from(["[", '{"p":', '{"p":1,"f":[']),
)
page_tokens = st.one_of(
    st.just(""),
    st.builds(page_token, st.one_of(ints(64), plain, st.none(), json_data), st.sampled_from(["", "0" * 12])),
    st.builds(b64, st.binary(max_size=40)),
    deep_tokens,
    deep_tokens,
    junk,
)


# --- requests from descriptors --------------------------------------------------------------------------


@dataclass
class Pools:
    """The ids the fuzzer is steered toward: most of them exist."""

    session_agent: str  # the echo agent of every session, never named in the registry's RPCs
    sessions: list[str]  # the pool: active sessions, renewed before every example
    new_sessions: list[str]  # plausible ids of sessions the fuzzer may create
    agents: list[str]  # agents of the registry pool (never used by a session: their backends vary)
    new_agents: list[str]  # plausible ids of agents the fuzzer may create
    message_ids: list[str]
    call_ids: list[str]
    user_ids: list[str]
    request_ids: list[str]


class Requests:
    """Strategies for the request messages of every method, built from their descriptors. `wild` ones take
    any value a field can hold; tame ones stay with plausible values, so that many of them are valid."""

    def __init__(self, pools: Pools, *, wild: bool) -> None:
        self.pools = pools
        self.wild = wild
        self._cache: dict[tuple[str, int], st.SearchStrategy[ProtoMessage]] = {}

    def either(self, *likely: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        """The plausible values given; the wild ones sometimes anything else."""
        return with_junk(*likely) if self.wild else st.one_of(*likely)

    def message(self, desc: Descriptor, depth: int = 0) -> st.SearchStrategy[ProtoMessage]:
        key = (desc.full_name, depth)
        if key not in self._cache:
            special = {
                "google.protobuf.Struct": structs if self.wild else tame_structs,
                "google.protobuf.Value": values if self.wild else tame_values,
            }.get(desc.full_name)
            self._cache[key] = special if special is not None else self._composite(desc, depth)
        return self._cache[key]

    def _composite(self, desc: Descriptor, depth: int) -> st.SearchStrategy[ProtoMessage]:
        cls = GetMessageClass(desc)
        real_oneofs = [
            o for o in desc.oneofs if not (len(o.fields) == 1 and o.name == f"_{o.fields[0].name}")
        ]
        in_oneof = {f.name for o in real_oneofs for f in o.fields}
        plain_fields = [
            f
            for f in desc.fields
            if f.name not in in_oneof and (f.message_type is None or depth < MAX_DEPTH or _is_map(f))
        ]

        @st.composite
        def build(draw: st.DrawFn) -> ProtoMessage:
            msg = cls()
            for oneof in real_oneofs:
                chosen = draw(st.sampled_from([None, *oneof.fields] if self.wild else list(oneof.fields)))
                if chosen is not None and (chosen.message_type is None or depth < MAX_DEPTH):
                    self._set(msg, chosen, draw(self.value(chosen, depth)))
            for f in plain_fields:
                likely = f.name in (
                    "session_id",
                    "agent_id",
                    "messages",
                    "parts",
                    "message",
                    "session",
                    "agent",
                    "page_token",
                )
                likely = likely and depth < 2
                if self.wild:
                    present = draw(st.sampled_from([False, True, True, True] if likely else [False, True]))
                else:  # most fields set: a required one left out is a refusal at the first check
                    present = (
                        likely or f.message_type is None or draw(st.sampled_from([False, True, True, True]))
                    )
                if present:
                    self._set(msg, f, draw(self.value(f, depth)))
            return msg

        return build()

    @staticmethod
    def _set(msg: ProtoMessage, f: FieldDescriptor, value: Any) -> None:
        if _is_map(f):
            target = getattr(msg, f.name)
            for k, v in value.items():
                if isinstance(v, ProtoMessage):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated and f.message_type is not None:
            for item in value:
                getattr(msg, f.name).add().CopyFrom(item)
        elif f.is_repeated:
            getattr(msg, f.name).extend(value)
        elif f.message_type is not None:
            getattr(msg, f.name).CopyFrom(value)
        else:
            setattr(msg, f.name, value)

    def value(self, f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if _is_map(f):
            key_field, value_field = (
                f.message_type.fields_by_name["key"],
                f.message_type.fields_by_name["value"],
            )
            keys = (
                self.map_keys() if key_field.type == FieldDescriptor.TYPE_STRING else self.scalar(key_field)
            )
            return st.dictionaries(keys, self.single(value_field, depth + 1, f.name), max_size=4)
        one = self.single(f, depth, f.name)
        if f.is_repeated:
            return st.lists(one, max_size=5) if self.wild else st.lists(one, min_size=1, max_size=3)
        return one

    def single(self, f: FieldDescriptor, depth: int, name: str) -> st.SearchStrategy[Any]:
        if f.message_type is not None and f.message_type.full_name == "google.protobuf.FieldMask":
            return field_masks if self.wild else tame_field_masks[f.containing_type.name]
        if f.message_type is not None:
            return self.message(f.message_type, depth + 1)
        return self.scalar(f, name)

    def map_keys(self) -> st.SearchStrategy[str]:
        return self.either(st.sampled_from(["channel", "tier", "a.b", "k:1", "x/y", "0"]), plain)

    def scalar(self, f: FieldDescriptor, name: str | None = None) -> st.SearchStrategy[Any]:
        name = name or f.name
        t = f.type
        if t == FieldDescriptor.TYPE_STRING:
            return self.string(f, name)
        if t == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=64 if self.wild else 8)
        if t == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if t == FieldDescriptor.TYPE_ENUM:
            known = [v.number for v in f.enum_type.values]
            if self.wild:
                return st.one_of(st.sampled_from(known), st.sampled_from(known), ints(32))
            return st.sampled_from([v for v in known if v] or known)  # set, so not UNSPECIFIED
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return st.floats(width=64 if t == FieldDescriptor.TYPE_DOUBLE else 32, allow_nan=self.wild)
        bits = 64 if f.cpp_type in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64) else 32
        signed = f.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64)
        near = {
            "page_size": (2, 50, 999, 1000, 1001),
            "timeout_minutes": (4, 5, 30, 1440, 1441),
            "max_duration_minutes": (5, 60, 720, 10080, 10081),
            "warning_threshold_minutes": (2, 5, 29),
            "history_window": (100, 1000, 1001),
            "word_delay_ms": (10_000, 10_001),
            "timeout_seconds": (86_400, 86_401),
            "after_event_id": (2, 3, 2**53),
        }.get(name, ())
        if not self.wild:
            return st.one_of(st.integers(0, 40), st.sampled_from(near)) if near else st.integers(0, 40)
        return ints(bits, signed=signed, near=near)

    def string(self, f: FieldDescriptor, name: str) -> st.SearchStrategy[str]:
        p = self.pools
        owner = f.containing_type.full_name
        if name == "session_id":
            made_up = [""] if owner == "agentsessions.v1.CreateSessionRequest" else []  # the server makes one
            new = st.sampled_from([*made_up, *p.new_sessions])
            return self.either(st.sampled_from(p.sessions), st.sampled_from(p.sessions), new)
        if name == "agent_id":
            if owner.startswith("agentsessions.v1.") and "Agent" in owner:
                return self.either(st.sampled_from([*p.agents, "echo"]), st.sampled_from(p.new_agents))
            # Sessions run one agent only, an echo agent of the test's own (its app: and user: state is
            # the test's), so that every turn ends at once.
            mine = st.just(p.session_agent)
            return self.either(mine, mine, st.sampled_from([f"{p.session_agent}-none", "no-such"]))
        if name == "message_id":
            return self.either(st.sampled_from(["", *p.message_ids]))
        if name == "call_id":
            return self.either(st.sampled_from(p.call_ids))
        if name == "user_id":
            return self.either(st.sampled_from(p.user_ids))
        if name == "request_id":
            return self.either(st.sampled_from(["", "", *p.request_ids]))
        if name == "page_token":
            return page_tokens if self.wild else st.just("")
        if name == "etag":
            return with_junk(st.sampled_from(["", "v1.00000000", "v2"])) if self.wild else st.just("")
        if name == "target":  # remote agents: a port nothing listens on, refused at once
            return self.either(st.sampled_from(["127.0.0.1:1", "localhost:1", "dns:///127.0.0.1:1"]))
        if name == "base_url":
            return self.either(
                st.sampled_from(["http://127.0.0.1:1/v1", "https://127.0.0.1:1", "ftp://x", "http://"])
            )
        if name == "api_key_env":
            return self.either(st.sampled_from(["", "TEST_LLM_KEY", "TEST_LLM_MISSING_KEY", "HOME"]))
        if name in ("arguments", "output"):
            return self.either(st.builds(json.dumps, finite_json))
        if name in ("text", "name", "model", "display_name", "system_prompt", "uri", "mime_type", "type"):
            # The echo agent's `/hang` waits until the turn is stopped; everything else ends at once.
            text = st.one_of(plain, plain, st.text(any_char, max_size=40), junk) if self.wild else printable
            return text.filter(lambda s: not s.lstrip().startswith("/hang"))
        return self.either(plain)


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


# --- one field at a time -------------------------------------------------------------------------------

# Values at and past every bound, each sent in one field of an otherwise valid request: found for sure,
# where the generated requests find them by chance.
EDGE_STRINGS = [
    "", "\x00", "a\x00b", "\x7f", "a\nb", " ", "é" * 1025, "\U0001f600" * 300, "x" * 10_000, "a/" * 200 + "a",
    b64(b"[" * 5000), b64(b'{"p":' * 5000), page_token(2**70, ""), page_token("\x00", ""), page_token([], ""),
]  # fmt: skip
EDGE_JSON: list[Any] = [
    {"\x00": 1}, {"k": "a\x00b"}, {"k\x00": {"\x00": None}}, {"": ""}, {"\U0001f600": "\ud7ff"},
    {"k": float("nan")}, {"k": float("-inf")}, {"k": 1e308}, {"k": _nest(32, as_object=False)},
    {"k": _nest(33, as_object=True)},
    {"k": _nest(60, as_object=False)}, {"k": "x" * 70_000}, {f"k{i}": i * 1.0 for i in range(2000)},
    {"user:\x00": 1}, {"app:": 1}, {"temp:": "x"}, {"user:k": "é" * 2000},
]  # fmt: skip
EDGE_INTS = {
    32: [-(2**31), -1, 2**31 - 1],
    64: [-(2**63), -1, 2**63 - 1],
}


def base_request(desc: Descriptor, session_id: str, agent_id: str, session_agent: str) -> ProtoMessage:
    """A valid request of the type (as far as a made-up one can be), on a session and an agent that exist."""
    text = {"parts": [{"text": {"text": "hi"}}]}
    bases: dict[str, dict[str, Any]] = {
        "CreateSessionRequest": {"session": {"agent_id": session_agent, "metadata": {"k": "v"}}},
        "UpdateSessionRequest": {"session": {"session_id": session_id, "metadata": {"k": "v"}}},
        "AppendMessagesRequest": {"session_id": session_id, "messages": [{"role": "ROLE_USER", **text}]},
        "RestoreSessionRequest": {"session_id": session_id, "messages": [{"role": "ROLE_USER", **text}]},
        "ListSessionsRequest": {"agent_id": session_agent, "metadata": {"k": "v"}},
        "ExecuteRequest": {"session_id": session_id, "message": text},
        "CreateAgentRequest": {"agent": {"agent_id": f"{agent_id}-new", "echo": {}}},
        "UpdateAgentRequest": {"agent": {"agent_id": agent_id, "display_name": "x"}},
        "ConnectRequest": {"heartbeat": {"session_id": session_id}},
    }
    cls = GetMessageClass(desc)
    fields = desc.fields_by_name
    base = bases.get(desc.name) or {
        name: value for name, value in (("session_id", session_id), ("agent_id", agent_id)) if name in fields
    }
    return json_format.ParseDict(base, cls())


def _edges(f: FieldDescriptor) -> list[Any]:
    if f.type == FieldDescriptor.TYPE_STRING:
        return EDGE_STRINGS
    if f.type == FieldDescriptor.TYPE_ENUM:
        return [-1, 99, 2**31 - 1]
    if f.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64):
        return EDGE_INTS[32 if f.cpp_type == FieldDescriptor.CPPTYPE_INT32 else 64]
    return []


def edge_requests(base: ProtoMessage, depth: int = 0) -> list[ProtoMessage]:
    """`base` with one scalar field (of the request, of a message in it, or of the first of a repeated
    message) set to each of its edge values (a repeated one given one more item); map fields get an entry
    with an edge key or value; Struct and Value fields an edge of JSON."""
    out: list[ProtoMessage] = []
    for f in base.DESCRIPTOR.fields:
        if f.message_type is not None and f.message_type.full_name == "google.protobuf.Struct":
            for data in EDGE_JSON:
                changed = _copy(base)
                getattr(changed, f.name).CopyFrom(to_struct(data))
                out.append(changed)
        elif f.message_type is not None and f.message_type.full_name == "google.protobuf.Value":
            for data in EDGE_JSON:
                changed = _copy(base)
                getattr(changed, f.name).CopyFrom(to_value(data.get("k", data)))
                out.append(changed)
        elif _is_map(f):
            for edge in EDGE_STRINGS:
                for key, value in ((edge, "v"), ("k", edge)):
                    if f.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING:
                        changed = _copy(base)
                        getattr(changed, f.name)[key] = value
                        out.append(changed)
        elif f.message_type is not None and depth == 0:
            present = list(getattr(base, f.name)) if f.is_repeated else [getattr(base, f.name)]
            if not present:
                continue
            for inner in edge_requests(present[0], depth + 1):
                changed = _copy(base)
                target = getattr(changed, f.name)
                (target[0] if f.is_repeated else target).CopyFrom(inner)
                out.append(changed)
        elif f.message_type is None:
            for edge in _edges(f):
                changed = _copy(base)
                if f.is_repeated:
                    getattr(changed, f.name).append(edge)
                else:
                    setattr(changed, f.name, edge)
                out.append(changed)
    return out


def _copy(message: ProtoMessage) -> ProtoMessage:
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


# --- raw bytes --------------------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """Valid bytes with a few flipped, cut or inserted: mostly not a message any more, or another one."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(out)))
        if op == "flip" and out:
            out[min(at, len(out) - 1)] = draw(st.integers(0, 255))
        elif op == "cut":
            del out[at:]
        else:
            out[at:at] = draw(st.binary(min_size=1, max_size=6))
    return bytes(out)


@dataclass(frozen=True)
class Call:
    """One request: a method, and its message (None for raw bytes) with the bytes sent."""

    method: MethodDescriptor
    frames: tuple[tuple[ProtoMessage | None, bytes], ...]  # one for every method but Connect

    def describe(self) -> str:
        shown = []
        for message, data in self.frames:
            try:
                shown_as = (
                    text_format.MessageToString(message, as_one_line=True) if message is not None else None
                )
                text = shown_as or repr(data)
            except Exception:  # nested past what text_format prints
                text = repr(data)
            shown.append(text if len(text) < 2000 else text[:2000] + "...")
        return f"{self.method.full_name}({' | '.join(shown)})"

    __repr__ = describe


def calls(tame: Requests, wild: Requests) -> st.SearchStrategy[Call]:
    @st.composite
    def frame(draw: st.DrawFn, desc: Descriptor) -> tuple[ProtoMessage | None, bytes]:
        message = draw(draw(st.sampled_from([tame, wild])).message(desc))
        data = message.SerializeToString(deterministic=True)  # maps in key order: repeatable mutations
        kind = draw(st.sampled_from(["message"] * 6 + ["mutated", "random"]))
        if kind == "mutated":
            return None, draw(mutated(data))
        if kind == "random":
            return None, draw(st.binary(max_size=48))
        return message, data

    @st.composite
    def build(draw: st.DrawFn) -> Call:
        method = draw(st.sampled_from(METHODS))
        count = draw(st.integers(0, 4)) if method.client_streaming else 1
        return Call(method, tuple(draw(frame(method.input_type)) for _ in range(count)))

    return build()


# --- sending ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    reason: str = ""
    responses: list[bytes] = field(default_factory=list)
    cancelled_by_us: bool = False


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _problem_of_status(err: grpc.aio.AioRpcError) -> tuple[str, str]:
    """(the reason of its ErrorInfo, what is wrong with the status: empty when nothing)."""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError as exc:  # details of another status than the call's (trailers cut off)
        return "", str(exc)
    if status is None:
        return "", "no google.rpc.Status details"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            if info.domain != DOMAIN:
                return info.reason, f"ErrorInfo domain {info.domain!r}"
            if not REASON.fullmatch(info.reason):
                return info.reason, f"ErrorInfo reason {info.reason!r}"
            return info.reason, ""
    return "", "no ErrorInfo in the status details"


async def _read(
    call: Any, *, first_wait: float, next_wait: float, limit: int, quiet_is_fine: bool
) -> tuple[list[bytes], bool]:
    """Reads a server stream: at most `limit` responses, each within its wait. Returns what was read and
    whether the test cancelled the call (a quiet stream where `quiet_is_fine`, or enough read)."""
    got: list[bytes] = []
    stream = call.__aiter__()
    while len(got) < limit:
        try:
            got.append(await asyncio.wait_for(stream.__anext__(), first_wait if not got else next_wait))
        except StopAsyncIteration:
            return got, False
        except TimeoutError:
            if not quiet_is_fine:
                raise AssertionError(f"no response within {first_wait if not got else next_wait} s") from None
            call.cancel()
            return got, True
    call.cancel()
    return got, True


async def send(channel: grpc.aio.Channel, call: Call) -> Outcome:
    path = _path(call.method)
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    try:
        if call.method.client_streaming:  # Connect: the frames, then the end of the input
            stream = channel.stream_stream(path, **raw)(
                iter([data for _, data in call.frames]), timeout=DEADLINE
            )
            got = [response async for response in stream]
            return Outcome(grpc.StatusCode.OK, responses=got)
        (_, data) = call.frames[0]
        if call.method.server_streaming:
            stream = channel.unary_stream(path, **raw)(data, timeout=DEADLINE)
            watch = call.method.name == "WatchSession"  # live events may never come: reading stops
            got, cancelled = await _read(
                stream,
                first_wait=0.3 if watch else 4,
                next_wait=0.3 if watch else 2,
                limit=30,
                quiet_is_fine=watch,
            )
            if cancelled:
                return Outcome(grpc.StatusCode.CANCELLED, responses=got, cancelled_by_us=True)
            return Outcome(grpc.StatusCode.OK, responses=got)
        response = await channel.unary_unary(path, **raw)(data, timeout=DEADLINE)
        return Outcome(grpc.StatusCode.OK, responses=[response])
    except grpc.aio.AioRpcError as err:
        reason, problem = _problem_of_status(err)
        if problem and err.code() not in FORBIDDEN:
            raise AssertionError(
                f"{err.code().name} {err.details()!r}: {problem}, for {call.describe()}"
            ) from None
        return Outcome(err.code(), reason=reason)


def _turn_event_problems(event: events_pb2.TurnEvent) -> list[str]:
    if event.WhichOneof("kind") == "error" and event.error.reason in ("", "INTERNAL"):
        return [f"turn error {event.error.reason!r}: {event.error.message}"]
    return []


def check(call: Call, outcome: Outcome) -> None:
    """The status and what came with it follow the contract (docs/design.md, Errors)."""
    where = call.describe()
    assert outcome.code not in FORBIDDEN, f"{outcome.code.name} for {where}"
    assert outcome.code != grpc.StatusCode.CANCELLED or outcome.cancelled_by_us, where
    if call.method.name == "Execute":
        for data in outcome.responses:
            problems = _turn_event_problems(events_pb2.TurnEvent.FromString(data))
            assert not problems, (problems, where)
    if call.method.name == "Connect":
        for data in outcome.responses:
            frame = turn_service_pb2.ConnectResponse.FromString(data)
            if frame.WhichOneof("frame") == "error":
                code = grpc.StatusCode.OK
                for c in grpc.StatusCode:
                    if c.value[0] == frame.error.code:
                        code = c
                assert code not in FORBIDDEN | {grpc.StatusCode.OK}, (frame, where)
                assert REASON.fullmatch(frame.error.reason), (frame, where)
            elif frame.WhichOneof("frame") == "turn_event":
                problems = _turn_event_problems(frame.turn_event)
                assert not problems, (problems, where)


# --- what the fuzzer was told --------------------------------------------------------------------------


@dataclass
class Acknowledged:
    """The messages acknowledged to the fuzzer in each pool session (by sequence) and still due there:
    appended with an OK answer, and not since deleted, cleared, replaced or deleted with their session by
    an OK answer to the fuzzer itself. (A rollback of a turn deletes that turn's messages only.)"""

    messages: dict[str, dict[int, message_pb2.Message]]

    def record(self, call: Call, outcome: Outcome) -> None:
        message, _ = call.frames[0] if call.frames else (None, b"")
        if outcome.code != grpc.StatusCode.OK or message is None:
            return
        held = self.messages.get(getattr(message, "session_id", ""))
        if held is None:
            return
        name = call.method.name
        if name == "AppendMessages":
            for stored in message_service_pb2.AppendMessagesResponse.FromString(
                outcome.responses[0]
            ).messages:
                held[stored.sequence] = stored
        elif name == "DeleteMessages":
            assert isinstance(message, message_service_pb2.DeleteMessagesRequest)
            if message.WhichOneof("target") == "message_id":
                for sequence in [s for s, m in held.items() if m.message_id == message.message_id]:
                    del held[sequence]
            else:  # after_sequence (0 when neither is set)
                for sequence in [s for s in held if s > message.after_sequence]:
                    del held[sequence]
        elif name in ("ClearSession", "DeleteSession"):
            held.clear()
        elif name == "RestoreSession":
            restored = session_service_pb2.RestoreSessionResponse.FromString(outcome.responses[0]).restored
            if restored:
                held.clear()


# --- the test -----------------------------------------------------------------------------------------------


def text_message(text: str, message_id: str = "") -> Message:
    return Message(message_id=message_id, role=Role.ROLE_USER, parts=[Part(text=TextPart(text=text))])


async def all_messages(client: AsyncSessionsClient, session_id: str) -> list[message_pb2.Message]:
    return [m async for m in await client.list_messages(session_id=session_id, page_size=1000)]


@pytest.mark.timeout(600)  # a passing run takes well under a minute; a failing one needs time to shrink
async def test_generated_requests_get_answers_of_the_contract(
    client: AsyncSessionsClient, target: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    pools = Pools(
        session_agent=f"fz{unique}-s",
        sessions=[f"{unique}/p{i}" for i in range(POOL_SESSIONS)],
        new_sessions=[f"{unique}/n{i}" for i in range(3)] + [f"{unique}/p0/child"],
        agents=[f"fz{unique}-a{i}" for i in range(2)],
        new_agents=[f"fz{unique}-n{i}" for i in range(3)],
        message_ids=[f"m{i}" for i in range(4)] + ["pre-0", "pre-1"],
        call_ids=["c0", "c1", "call_0"],
        user_ids=[f"u-{unique}", "u1"],
        request_ids=[f"r{i}-{unique}" for i in range(3)],
    )
    witnesses = [f"{unique}/w{i}" for i in range(WITNESSES)]
    for agent_id in [pools.session_agent, *pools.agents]:
        await client.create_agent(agent=agent_pb2.Agent(agent_id=agent_id, echo=agent_pb2.EchoBackend()))
    for session_id in witnesses:
        await client.create_session(
            agent_id=pools.session_agent, session_id=session_id, user_id=pools.user_ids[0]
        )
        await client.append_messages(session_id=session_id, messages=[text_message("before", "pre-0")])
    acknowledged = Acknowledged({sid: {} for sid in pools.sessions})
    tame, wild = Requests(pools, wild=False), Requests(pools, wild=True)
    stats: Counter[tuple[str, str]] = Counter()

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    checked = [0]  # records read so far: each is blamed on the call that was running when it came

    def unexpected_logs() -> list[str]:
        records = caplog.records[checked[0] :]
        checked[0] += len(records)
        return [
            f"{r.name}: {r.getMessage()}"
            for r in records
            if r.name.startswith("sessiond") and r.levelno >= logging.ERROR
        ]

    async def refresh_pool(session_ids: list[str]) -> None:
        """Every pool session exists and is active before each example, so requests reach past NOT_FOUND
        and SESSION_ENDED; one the fuzzer ended, cleared or expired is deleted and created again."""
        for session_id in session_ids:
            try:
                s = await client.get_session(session_id=session_id)
            except Exception:
                s = None
            if s is not None and s.status == 1:  # ACTIVE
                continue
            if s is not None:
                await client.delete_session(session_id=session_id, force=True)
            acknowledged.messages.get(session_id, {}).clear()
            await client.create_session(
                agent_id=pools.session_agent, session_id=session_id, user_id=pools.user_ids[0]
            )
            appended = await client.append_messages(
                session_id=session_id, messages=[text_message("one", "pre-0"), text_message("two", "pre-1")]
            )
            for m in appended.messages:
                acknowledged.messages.get(session_id, {})[m.sequence] = m

    async with grpc.aio.insecure_channel(target) as channel:
        # Every method, raw random bytes first (not a message, or by chance one).
        rng = random.Random(20261122)
        for method in METHODS:
            for size in (1, 3, 8, 40):
                payload = bytes(rng.randrange(256) for _ in range(size))
                frames = ((None, payload),)
                call = Call(method, frames)
                check(call, await send(channel, call))
        swept = 0
        for method in METHODS:  # then one field at a time (on a session of its own: the pool's stay intact)
            sweep = f"{unique}/sweep"
            base = base_request(method.input_type, sweep, pools.agents[0], pools.session_agent)
            for request in edge_requests(base):
                await refresh_pool([sweep])
                call = Call(method, ((request, request.SerializeToString(deterministic=True)),))
                check(call, await send(channel, call))
                assert not (logged := unexpected_logs()), (logged, call.describe())
                swept += 1
        print(f"{swept} requests with one edge value each")

        @SETTINGS
        @given(st.lists(calls(tame, wild), min_size=1, max_size=8))
        def fuzz(batch: list[Call]) -> None:
            run(refresh_pool(pools.sessions))
            for call in batch:
                outcome = run(send(channel, call))
                stats[call.method.name, outcome.code.name] += 1
                check(call, outcome)
                logged = unexpected_logs()
                assert not logged, (logged, call.describe())
                acknowledged.record(call, outcome)

        await asyncio.to_thread(fuzz)

        # Still serving.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    ok = sum(n for (_, code), n in stats.items() if code == "OK")
    total = sum(stats.values())
    reached = {name for (name, code), n in stats.items() if code == "OK"}
    print(f"{total} calls, {ok} OK; methods answered OK: {len(reached)} of {len(METHODS)}")
    print(sorted(stats.items()))
    assert ok >= total // 10, stats  # a good share is valid and reaches past validation
    logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name.startswith("sessiond")]
    assert not [r for r in caplog.records if r.name.startswith("sessiond") and r.levelno >= logging.ERROR], (
        logged
    )

    # A normal round trip works.
    s = await client.create_session(agent_id=pools.session_agent, session_id=f"{unique}/after")
    await client.append_messages(session_id=s.session_id, messages=[text_message("hello")])
    assert [m.parts[0].text.text for m in await all_messages(client, s.session_id)] == ["hello"]

    # The witnesses hold exactly what was appended to them.
    for session_id in witnesses:
        await client.append_messages(session_id=session_id, messages=[text_message("after")])
        got = await all_messages(client, session_id)
        assert [(m.sequence, m.parts[0].text.text) for m in got] == [(1, "before"), (2, "after")], got
        assert got[0].message_id == "pre-0"

    # Every message acknowledged to the fuzzer in a pool session and not since deleted by it reads back as
    # acknowledged; every session's history is consistent with its counters.
    for session_id, held in acknowledged.messages.items():
        try:
            session = await client.get_session(session_id=session_id)
        except errors.NotFound:  # the fuzzer deleted it last
            assert not held, (session_id, held)
            continue
        got = await all_messages(client, session_id)
        by_sequence = {m.sequence: m for m in got}
        for sequence, message in held.items():
            assert by_sequence.get(sequence) == message, (session_id, sequence, message)
        sequences = [m.sequence for m in got]
        assert sequences == sorted(set(sequences)), (session_id, sequences)
        assert session.message_count == len(got), session_id
        assert not sequences or session.last_sequence >= sequences[-1], session_id
