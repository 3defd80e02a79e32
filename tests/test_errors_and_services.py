"""Errors on every RPC (the turn RPCs' too), agents, server stats, reflection, the sync client, and a
server that survives malformed requests."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from assertions import DOMAIN, REASON, SERVED, nested_json, raises
from conftest import POSTGRES_URL, DatabaseTarget, make_settings
from google.protobuf import descriptor_pb2, field_mask_pb2, struct_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from sqlalchemy.engine import make_url
from turn_support import Reader

from agentsessions import (
    Agent,
    AgentOrigin,
    AsyncSessionsClient,
    DataPart,
    EchoBackend,
    Message,
    MessageOrder,
    MessageView,
    OpenAIChatBackend,
    Part,
    PolicySource,
    RemoteBackend,
    RetryPolicy,
    Role,
    SessionsClient,
    SessionStatus,
    TextPart,
    errors,
)
from agentsessions.v1 import (
    admin_service_pb2,
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    events_pb2,
    message_service_pb2,
    message_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    turn_service_pb2,
    turn_service_pb2_grpc,
)
from sessiond.domain import paging
from sessiond.domain.clock import ManualClock
from sessiond.server import start_server


def text_message(text: str = "x") -> Message:
    return Message(role=Role.ROLE_USER, parts=[Part(text=TextPart(text=text))])


async def raw(method: Callable[[Any], Awaitable[Any]], request: Any) -> Any:
    """A call on a generated stub, with the client's exceptions."""
    try:
        return await method(request)
    except grpc.RpcError as err:
        raise errors.from_grpc_error(err) from err


# --- bad input on every RPC ---------------------------------------------------------------------------


@dataclass
class Ctx:
    client: AsyncSessionsClient
    sessions: session_service_pb2_grpc.SessionServiceStub
    messages: message_service_pb2_grpc.MessageServiceStub
    agents: agent_service_pb2_grpc.AgentRegistryServiceStub
    session_id: str  # an ACTIVE session


Call = Callable[[Ctx], Awaitable[Any]]


@dataclass(frozen=True)
class Case:
    service: str
    rpc: str
    what: str
    call: Call
    field: str


# A page token is base64 of JSON: 5,000 nested lists made json.loads raise RecursionError, answered INTERNAL
# (found by test_fuzz_requests.py).
DEEP_TOKEN = base64.urlsafe_b64encode(b"[" * 5000).decode()

BAD_SESSION_IDS = {
    "empty": "",
    "double slash": "a//b",
    "leading slash": "/x",
    "trailing slash": "x/",
    "300 chars": "x" * 300,
    "257 chars": "y" * 257,
    "NUL": "a\x00b",
    "newline": "a\nb",
    "tab": "a\tb",
    "DEL": "a\x7fb",
    "space": "a b",
    "non-ASCII": "sessão",
    "starts with dot": ".x",
    "segment starts with dash": "org/-x",
}

BAD_AGENT_IDS = {
    "empty": "",
    "slash": "a/b",
    "leading dash": "-x",
    "65 chars": "a" * 65,
    "space": "a b",
    "NUL": "a\x00",
    "newline": "a\n",
    "non-ASCII": "agént",
    "colon": "a:b",
}


async def _watch(c: Ctx, session_id: str, after_event_id: int | None = None) -> None:
    """Opens a watch and reads its first event (a refused watch fails at once; the guard keeps a watch
    that was wrongly accepted from waiting for events forever)."""

    async def first() -> None:
        async for _ in c.client.watch_session(
            session_id=session_id, after_event_id=after_event_id, resume=False
        ):
            return

    await asyncio.wait_for(first(), timeout=30)


# RPC -> (call with a session id, the field named in the violation)
SESSION_ID_RPCS: dict[tuple[str, str], tuple[Callable[[Ctx, str], Awaitable[Any]], str]] = {
    ("SessionService", "CreateSession"): (
        lambda c, sid: c.client.create_session(agent_id="echo", session_id=sid),
        "session_id",
    ),
    ("SessionService", "GetSession"): (lambda c, sid: c.client.get_session(session_id=sid), "session_id"),
    ("SessionService", "UpdateSession"): (
        lambda c, sid: c.client.update_session(session_id=sid, metadata={"a": "b"}),
        "session.session_id",
    ),
    ("SessionService", "EndSession"): (lambda c, sid: c.client.end_session(session_id=sid), "session_id"),
    ("SessionService", "DeleteSession"): (
        lambda c, sid: c.client.delete_session(session_id=sid, force=True),
        "session_id",
    ),
    ("SessionService", "RenewSession"): (lambda c, sid: c.client.renew_session(session_id=sid), "session_id"),
    ("SessionService", "Heartbeat"): (lambda c, sid: c.client.heartbeat(session_id=sid), "session_id"),
    ("SessionService", "ClearSession"): (lambda c, sid: c.client.clear_session(session_id=sid), "session_id"),
    ("SessionService", "RestoreSession"): (
        lambda c, sid: c.client.restore_session(session_id=sid, messages=[text_message()]),
        "session_id",
    ),
    ("SessionService", "WatchSession"): (lambda c, sid: _watch(c, sid), "session_id"),
    ("MessageService", "AppendMessages"): (
        lambda c, sid: c.client.append_messages(session_id=sid, messages=[text_message()]),
        "session_id",
    ),
    ("MessageService", "ListMessages"): (lambda c, sid: c.client.list_messages(session_id=sid), "session_id"),
    ("MessageService", "DeleteMessages"): (
        lambda c, sid: c.client.delete_messages(session_id=sid, after_sequence=0),
        "session_id",
    ),
}

AGENT_ID_RPCS: dict[tuple[str, str], tuple[Callable[[Ctx, str], Awaitable[Any]], str]] = {
    ("SessionService", "CreateSession"): (
        lambda c, aid: c.client.create_session(agent_id=aid),
        "session.agent_id",
    ),
    ("SessionService", "ListSessions"): (lambda c, aid: c.client.list_sessions(agent_id=aid), "agent_id"),
    ("AgentRegistryService", "CreateAgent"): (
        lambda c, aid: c.client.create_agent(agent=Agent(agent_id=aid, echo=EchoBackend())),
        "agent_id",
    ),
    ("AgentRegistryService", "GetAgent"): (lambda c, aid: c.client.get_agent(agent_id=aid), "agent_id"),
    ("AgentRegistryService", "UpdateAgent"): (
        lambda c, aid: c.client.update_agent(agent=Agent(agent_id=aid, display_name="x")),
        "agent.agent_id",
    ),
    ("AgentRegistryService", "DeleteAgent"): (lambda c, aid: c.client.delete_agent(agent_id=aid), "agent_id"),
}


def _policy(**fields: int) -> session_pb2.TimeoutPolicy:
    return session_pb2.TimeoutPolicy(**fields)  # type: ignore[arg-type]


def _meta(n: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(n)}


def _data_message(value: struct_pb2.Value) -> Message:
    return Message(role=Role.ROLE_USER, parts=[Part(data=DataPart(value=value))])


def _openai_agent(agent_id: str, **fields: Any) -> dict[str, Any]:
    return {"agentId": agent_id, "openaiChat": {"baseUrl": "http://127.0.0.1:9/v1", "model": "m", **fields}}


OTHER_CASES: list[tuple[str, str, str, Call, str]] = [
    # SessionService
    (
        "SessionService",
        "CreateSession",
        "no session at all",
        lambda c: raw(c.sessions.CreateSession, session_service_pb2.CreateSessionRequest()),
        "session.agent_id",
    ),
    (
        "SessionService",
        "CreateSession",
        "user_id with a control character",
        lambda c: c.client.create_session(agent_id="echo", user_id="u\x01"),
        "session.user_id",
    ),
    (
        "SessionService",
        "CreateSession",
        "user_id of 257 chars",
        lambda c: c.client.create_session(agent_id="echo", user_id="u" * 257),
        "session.user_id",
    ),
    (
        "SessionService",
        "CreateSession",
        "request_id of 129 chars",
        lambda c: c.client.create_session(agent_id="echo", request_id="r" * 129),
        "request_id",
    ),
    (
        "SessionService",
        "CreateSession",
        "65 metadata entries",
        lambda c: c.client.create_session(agent_id="echo", metadata=_meta(65)),
        "session.metadata",
    ),
    (
        "SessionService",
        "CreateSession",
        "bad metadata key",
        lambda c: c.client.create_session(agent_id="echo", metadata={"bad key": "v"}),
        "session.metadata['bad key']",
    ),
    (
        "SessionService",
        "CreateSession",
        "metadata value too long",
        lambda c: c.client.create_session(agent_id="echo", metadata={"k": "v" * 1025}),
        "session.metadata['k']",
    ),
    (
        "SessionService",
        "CreateSession",
        "metadata value with NUL",
        lambda c: c.client.create_session(agent_id="echo", metadata={"k": "a\x00b"}),
        "session.metadata['k']",
    ),
    (
        "SessionService",
        "CreateSession",
        "variables over 64 KiB",
        lambda c: c.client.create_session(agent_id="echo", variables={"blob": "x" * 70_000}),
        "session.variables",
    ),
    (
        "SessionService",
        "CreateSession",
        "timeout below the minimum",
        lambda c: c.client.create_session(agent_id="echo", timeout_policy=_policy(timeout_minutes=1)),
        "session.timeout_policy.timeout_minutes",
    ),
    (
        "SessionService",
        "CreateSession",
        "max duration above the maximum",
        lambda c: c.client.create_session(
            agent_id="echo", timeout_policy=_policy(max_duration_minutes=100_000)
        ),
        "session.timeout_policy.max_duration_minutes",
    ),
    (
        "SessionService",
        "CreateSession",
        "warning threshold of 0",
        lambda c: c.client.create_session(
            agent_id="echo", timeout_policy=_policy(warning_threshold_minutes=0)
        ),
        "session.timeout_policy.warning_threshold_minutes",
    ),
    (
        "SessionService",
        "ListSessions",
        "page_size over 1000",
        lambda c: c.client.list_sessions(page_size=1001),
        "page_size",
    ),
    (
        "SessionService",
        "ListSessions",
        "negative page_size",
        lambda c: c.client.list_sessions(page_size=-5),
        "page_size",
    ),
    (
        "SessionService",
        "ListSessions",
        "unknown status",
        lambda c: c.client.list_sessions(status=SessionStatus.ValueType(42)),
        "status",
    ),
    (
        "SessionService",
        "ListSessions",
        "negative status",
        lambda c: c.client.list_sessions(status=SessionStatus.ValueType(-1)),
        "status",
    ),
    (
        "SessionService",
        "ListSessions",
        "garbage page token",
        lambda c: c.client.list_sessions(page_token="garbage"),
        "page_token",
    ),
    (
        "SessionService",
        "ListSessions",
        "page token of JSON nested past the parser's limit",
        lambda c: c.client.list_sessions(page_token=DEEP_TOKEN),
        "page_token",
    ),
    (
        "SessionService",
        "ListSessions",
        "user_id filter with NUL",
        lambda c: c.client.list_sessions(user_id="u\x00"),
        "user_id",
    ),
    (
        "SessionService",
        "ListSessions",
        "metadata filter with a bad key",
        lambda c: c.client.list_sessions(metadata={"bad key": "v"}),
        "metadata['bad key']",
    ),
    (
        "SessionService",
        "ListSessions",
        "metadata filter value with NUL",
        lambda c: c.client.list_sessions(metadata={"k": "\x00"}),
        "metadata['k']",
    ),
    (
        "SessionService",
        "UpdateSession",
        "unknown update_mask path",
        lambda c: c.client.update_session(session_id=c.session_id, update_mask=["agent_id"]),
        "update_mask",
    ),
    (
        "SessionService",
        "UpdateSession",
        "empty update_mask",
        lambda c: raw(
            c.sessions.UpdateSession,
            session_service_pb2.UpdateSessionRequest(
                session=session_pb2.Session(session_id=c.session_id), update_mask=field_mask_pb2.FieldMask()
            ),
        ),
        "update_mask",
    ),
    (
        "SessionService",
        "UpdateSession",
        "no session at all",
        lambda c: raw(
            c.sessions.UpdateSession,
            session_service_pb2.UpdateSessionRequest(
                update_mask=field_mask_pb2.FieldMask(paths=["metadata"])
            ),
        ),
        "session.session_id",
    ),
    (
        "SessionService",
        "UpdateSession",
        "timeout above the maximum",
        lambda c: c.client.update_session(
            session_id=c.session_id, timeout_policy=_policy(timeout_minutes=5000)
        ),
        "session.timeout_policy.timeout_minutes",
    ),
    (
        "SessionService",
        "UpdateSession",
        "'*' with another path",
        lambda c: c.client.update_session(
            session_id=c.session_id, metadata={"a": "b"}, update_mask=["*", "colour"]
        ),
        "update_mask",
    ),
    (
        "SessionService",
        "UpdateSession",
        "bad metadata key",
        lambda c: c.client.update_session(session_id=c.session_id, metadata={"": "v"}),
        "session.metadata['']",
    ),
    (
        "SessionService",
        "UpdateSession",
        "variables over 64 KiB",
        lambda c: c.client.update_session(session_id=c.session_id, variables={"b": "x" * 70_000}),
        "session.variables",
    ),
    (
        "SessionService",
        "WatchSession",
        "negative after_event_id",
        lambda c: _watch(c, c.session_id, after_event_id=-1),
        "after_event_id",
    ),
    (
        "SessionService",
        "RestoreSession",
        "message without parts",
        lambda c: c.client.restore_session(session_id=c.session_id, messages=[Message(role=Role.ROLE_USER)]),
        "messages[0].parts",
    ),
    (
        "SessionService",
        "RestoreSession",
        "101 messages",
        lambda c: c.client.restore_session(session_id=c.session_id, messages=[text_message()] * 101),
        "messages",
    ),
    # MessageService
    (
        "MessageService",
        "AppendMessages",
        "no messages",
        lambda c: c.client.append_messages(session_id=c.session_id, messages=[]),
        "messages",
    ),
    (
        "MessageService",
        "AppendMessages",
        "unspecified role",
        lambda c: c.client.append_messages(
            session_id=c.session_id, messages=[Message(parts=[Part(text=TextPart(text="x"))])]
        ),
        "messages[0].role",
    ),
    (
        "MessageService",
        "AppendMessages",
        "unknown role",
        lambda c: c.client.append_messages(
            session_id=c.session_id,
            messages=[Message(role=Role.ValueType(99), parts=[Part(text=TextPart())])],
        ),
        "messages[0].role",
    ),
    (
        "MessageService",
        "AppendMessages",
        "empty part",
        lambda c: c.client.append_messages(
            session_id=c.session_id, messages=[Message(role=Role.ROLE_USER, parts=[Part()])]
        ),
        "messages[0].parts[0]",
    ),
    (
        "MessageService",
        "ListMessages",
        "unknown view",
        lambda c: c.client.list_messages(session_id=c.session_id, view=MessageView.ValueType(3)),
        "view",
    ),
    (
        "MessageService",
        "ListMessages",
        "unknown order",
        lambda c: c.client.list_messages(session_id=c.session_id, order=MessageOrder.ValueType(-2)),
        "order",
    ),
    (
        "MessageService",
        "ListMessages",
        "page_size over 1000",
        lambda c: c.client.list_messages(session_id=c.session_id, page_size=1001),
        "page_size",
    ),
    (
        "MessageService",
        "ListMessages",
        "negative after_sequence",
        lambda c: c.client.list_messages(session_id=c.session_id, after_sequence=-1),
        "after_sequence",
    ),
    (
        "MessageService",
        "ListMessages",
        "negative before_sequence",
        lambda c: c.client.list_messages(session_id=c.session_id, before_sequence=-(2**63)),
        "before_sequence",
    ),
    (
        "MessageService",
        "ListMessages",
        "garbage page token",
        lambda c: c.client.list_messages(session_id=c.session_id, page_token="%%%"),
        "page_token",
    ),
    (
        "MessageService",
        "ListMessages",
        "page token of JSON nested past the parser's limit",
        lambda c: c.client.list_messages(session_id=c.session_id, page_token=DEEP_TOKEN),
        "page_token",
    ),
    (
        "MessageService",
        "BatchAppendMessages",
        "no requests",
        lambda c: raw(c.messages.BatchAppendMessages, message_service_pb2.BatchAppendMessagesRequest()),
        "requests",
    ),
    (
        "MessageService",
        "BatchAppendMessages",
        "101 requests",
        lambda c: raw(
            c.messages.BatchAppendMessages,
            message_service_pb2.BatchAppendMessagesRequest(
                requests=[
                    message_service_pb2.AppendMessagesRequest(
                        session_id=c.session_id, messages=[text_message()]
                    )
                ]
                * 101
            ),
        ),
        "requests",
    ),
    (
        "MessageService",
        "DeleteMessages",
        "no target",
        lambda c: raw(
            c.messages.DeleteMessages, message_service_pb2.DeleteMessagesRequest(session_id=c.session_id)
        ),
        "target",
    ),
    (
        "MessageService",
        "DeleteMessages",
        "empty message_id",
        lambda c: raw(
            c.messages.DeleteMessages,
            message_service_pb2.DeleteMessagesRequest(session_id=c.session_id, message_id=""),
        ),
        "message_id",
    ),
    (
        "MessageService",
        "DeleteMessages",
        "message_id with NUL",
        lambda c: c.client.delete_messages(session_id=c.session_id, message_id="m\x00"),
        "message_id",
    ),
    (
        "MessageService",
        "DeleteMessages",
        "message_id of 129 chars",
        lambda c: c.client.delete_messages(session_id=c.session_id, message_id="m" * 129),
        "message_id",
    ),
    (
        "MessageService",
        "DeleteMessages",
        "negative after_sequence",
        lambda c: c.client.delete_messages(session_id=c.session_id, after_sequence=-3),
        "after_sequence",
    ),
    # AgentRegistryService
    (
        "AgentRegistryService",
        "CreateAgent",
        "no agent at all",
        lambda c: raw(c.agents.CreateAgent, agent_service_pb2.CreateAgentRequest()),
        "agent_id",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "no backend",
        lambda c: c.client.create_agent(agent=Agent(agent_id=f"nb-{uuid.uuid4().hex[:8]}")),
        "agent.backend",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "remote backend without target",
        lambda c: c.client.create_agent(agent=Agent(agent_id="r-x", remote=RemoteBackend())),
        "agent.remote.target",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "openai backend without base_url",
        lambda c: c.client.create_agent(agent={"agentId": "o-x", "openaiChat": {"model": "m"}}),
        "agent.openai_chat",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "remote target with a control character",
        lambda c: c.client.create_agent(agent={"agentId": "r-y", "remote": {"target": "host\x00:1"}}),
        "agent.remote.target",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "openai base_url with a control character",
        lambda c: c.client.create_agent(
            agent={"agentId": "o-y", "openaiChat": {"baseUrl": "http://\x00host/v1", "model": "m"}}
        ),
        "agent.openai_chat.base_url",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "openai base_url that is not http(s)",
        lambda c: c.client.create_agent(
            agent={"agentId": "o-z", "openaiChat": {"baseUrl": "ftp://host/v1", "model": "m"}}
        ),
        "agent.openai_chat.base_url",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "openai base_url without a host",
        lambda c: c.client.create_agent(
            agent={"agentId": "o-h", "openaiChat": {"baseUrl": "http:///v1", "model": "m"}}
        ),
        "agent.openai_chat.base_url",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "openai base_url with a bad port",
        lambda c: c.client.create_agent(
            agent={"agentId": "o-p", "openaiChat": {"baseUrl": "http://host:99999/v1", "model": "m"}}
        ),
        "agent.openai_chat.base_url",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "openai model with a control character",
        lambda c: c.client.create_agent(
            agent={"agentId": "o-m", "openaiChat": {"baseUrl": "http://host/v1", "model": "m\n"}}
        ),
        "agent.openai_chat.model",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "negative history_window",
        lambda c: c.client.create_agent(agent=Agent(agent_id="h-x", echo=EchoBackend(), history_window=-1)),
        "agent.history_window",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "display_name with a control character",
        lambda c: c.client.create_agent(
            agent=Agent(agent_id="d-x", echo=EchoBackend(), display_name="a\x1b")
        ),
        "agent.display_name",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "timeout defaults out of range",
        lambda c: c.client.create_agent(
            agent=Agent(agent_id="t-x", echo=EchoBackend(), timeout_defaults=_policy(timeout_minutes=2))
        ),
        "agent.timeout_defaults.timeout_minutes",
    ),
    (
        "AgentRegistryService",
        "ListAgents",
        "page_size over 1000",
        lambda c: c.client.list_agents(page_size=1001),
        "page_size",
    ),
    (
        "AgentRegistryService",
        "ListAgents",
        "garbage page token",
        lambda c: c.client.list_agents(page_token="nope"),
        "page_token",
    ),
    (
        "AgentRegistryService",
        "ListAgents",
        "page token of JSON nested past the parser's limit",
        lambda c: c.client.list_agents(page_token=DEEP_TOKEN),
        "page_token",
    ),
    # Tokens are not signed: one built by hand must not carry text a query cannot take.
    (
        "AgentRegistryService",
        "ListAgents",
        "forged token with a NUL",
        lambda c: c.client.list_agents(
            page_token=paging.encode_token("a\x00b", paging.fingerprint("agents"))
        ),
        "page_token",
    ),
    (
        "AgentRegistryService",
        "ListAgents",
        "forged token with a lone surrogate",
        lambda c: c.client.list_agents(
            page_token=paging.encode_token("\ud800x", paging.fingerprint("agents"))
        ),
        "page_token",
    ),
    (
        "AgentRegistryService",
        "UpdateAgent",
        "unknown update_mask path",
        lambda c: c.client.update_agent(agent=Agent(agent_id="echo"), update_mask=["origin"]),
        "update_mask",
    ),
    (
        "AgentRegistryService",
        "UpdateAgent",
        "'*' with another path",
        lambda c: c.client.update_agent(agent=Agent(agent_id="echo"), update_mask=["*", "display_name"]),
        "update_mask",
    ),
    (
        "AgentRegistryService",
        "UpdateAgent",
        "empty update_mask",
        lambda c: raw(
            c.agents.UpdateAgent,
            agent_service_pb2.UpdateAgentRequest(agent=agent_pb2.Agent(agent_id="echo")),
        ),
        "update_mask",
    ),
    (
        "AgentRegistryService",
        "UpdateAgent",
        "negative history_window",
        lambda c: c.client.update_agent(agent=Agent(agent_id="echo", history_window=-4)),
        "agent.history_window",
    ),
    (
        "AgentRegistryService",
        "UpdateAgent",
        "backend masked but missing",
        lambda c: c.client.update_agent(agent=Agent(agent_id="echo"), update_mask=["backend"]),
        "agent.backend",
    ),
    (
        "AgentRegistryService",
        "UpdateAgent",
        "timeout defaults out of range",
        lambda c: c.client.update_agent(
            agent=Agent(agent_id="echo", timeout_defaults=_policy(max_duration_minutes=1))
        ),
        "agent.timeout_defaults.max_duration_minutes",
    ),
    # JSON values (Struct, Value): what JSON cannot hold, or nests past what stays decodable in events.
    (
        "SessionService",
        "CreateSession",
        "variables with NaN",
        lambda c: c.client.create_session(agent_id="echo", variables={"x": float("nan")}),
        "session.variables",
    ),
    (
        "SessionService",
        "CreateSession",
        "variables with Infinity",
        lambda c: c.client.create_session(agent_id="echo", variables={"x": {"y": [float("-inf")]}}),
        "session.variables",
    ),
    (
        "SessionService",
        "CreateSession",
        "variables nested 33 deep",
        lambda c: raw(
            c.sessions.CreateSession,
            session_service_pb2.CreateSessionRequest(
                session=session_pb2.Session(
                    agent_id="echo", variables=struct_pb2.Struct(fields={"deep": nested_json(32)})
                )
            ),
        ),
        "session.variables",
    ),
    (
        "SessionService",
        "UpdateSession",
        "a variable set to NaN",
        lambda c: c.client.update_session(
            session_id=c.session_id, variables={"x": float("nan")}, update_mask=["variables.x"]
        ),
        "session.variables",
    ),
    (
        "SessionService",
        "RestoreSession",
        "a data part with Infinity",
        lambda c: c.client.restore_session(
            session_id=c.session_id, messages=[_data_message(struct_pb2.Value(number_value=float("inf")))]
        ),
        "messages[0].parts[0].data.value",
    ),
    (
        "MessageService",
        "AppendMessages",
        "set_variables with NaN",
        lambda c: c.client.append_messages(
            session_id=c.session_id, messages=[text_message()], set_variables={"x": float("nan")}
        ),
        "set_variables",
    ),
    (
        "MessageService",
        "AppendMessages",
        "a data part with NaN",
        lambda c: c.client.append_messages(
            session_id=c.session_id, messages=[_data_message(struct_pb2.Value(number_value=float("nan")))]
        ),
        "messages[0].parts[0].data.value",
    ),
    (
        "MessageService",
        "AppendMessages",
        "a data part nested 33 deep",
        lambda c: c.client.append_messages(
            session_id=c.session_id, messages=[_data_message(nested_json(33))]
        ),
        "messages[0].parts[0].data.value",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "a tool with NaN",
        lambda c: c.client.create_agent(
            agent=_openai_agent("nan-x", tools=[{"type": "function", "weight": float("nan")}])
        ),
        "agent.openai_chat.tools[0]",
    ),
    # Backend numbers: 0 means none or the server default; below it means nothing.
    (
        "AgentRegistryService",
        "CreateAgent",
        "negative echo word delay",
        lambda c: c.client.create_agent(agent=Agent(agent_id="w-x", echo=EchoBackend(word_delay_ms=-1000))),
        "agent.echo.word_delay_ms",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "negative remote timeout",
        lambda c: c.client.create_agent(
            agent=Agent(agent_id="rt-x", remote=RemoteBackend(target="127.0.0.1:9", timeout_seconds=-5))
        ),
        "agent.remote.timeout_seconds",
    ),
    (
        "AgentRegistryService",
        "CreateAgent",
        "negative max_tokens",
        lambda c: c.client.create_agent(agent=_openai_agent("mt-x", maxTokens=-1)),
        "agent.openai_chat.max_tokens",
    ),
    (
        "AgentRegistryService",
        "UpdateAgent",
        "negative openai timeout",
        lambda c: c.client.update_agent(
            agent=_openai_agent("echo", timeoutSeconds=-1), update_mask=["backend"]
        ),
        "agent.openai_chat.timeout_seconds",
    ),
]


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for (service, rpc), (call, field) in SESSION_ID_RPCS.items():
        for what, bad in BAD_SESSION_IDS.items():
            if rpc == "CreateSession" and not bad:
                continue  # an empty id asks for a generated one
            cases.append(Case(service, rpc, f"session id {what}", lambda c, f=call, b=bad: f(c, b), field))
    for (service, rpc), (call, field) in AGENT_ID_RPCS.items():
        for what, bad in BAD_AGENT_IDS.items():
            if rpc == "ListSessions" and not bad:
                continue  # an empty filter matches any agent
            cases.append(Case(service, rpc, f"agent id {what}", lambda c, f=call, b=bad: f(c, b), field))
    cases += [Case(*row) for row in OTHER_CASES]
    return cases


CASES = all_cases()


def test_the_table_covers_every_rpc() -> None:
    expected = {
        (service.name, method.name)
        for module in (session_service_pb2, message_service_pb2, agent_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        if service.full_name in SERVED
        for method in service.methods
    }
    assert {(c.service, c.rpc) for c in CASES} == expected


@pytest.mark.parametrize("service", ["SessionService", "MessageService", "AgentRegistryService"])
async def test_bad_input_is_invalid_argument_naming_the_field(
    client: AsyncSessionsClient, unique: str, service: str
) -> None:
    session = await client.create_session(agent_id="echo", session_id=f"{unique}/ok")
    ctx = Ctx(
        client=client,
        sessions=session_service_pb2_grpc.SessionServiceStub(client.channel),
        messages=message_service_pb2_grpc.MessageServiceStub(client.channel),
        agents=agent_service_pb2_grpc.AgentRegistryServiceStub(client.channel),
        session_id=session.session_id,
    )
    failures: list[str] = []
    cases = [c for c in CASES if c.service == service]
    assert cases
    for case in cases:
        label = f"{case.rpc} / {case.what}"
        try:
            await case.call(ctx)
        except errors.AgentSessionsError as err:
            fields = [f for f, _ in err.field_violations]
            if not isinstance(err, errors.InvalidArgument):
                failures.append(f"{label}: {err.code.name} {err.reason} {err.message}")
            elif err.domain != DOMAIN or not err.reason or not REASON.fullmatch(err.reason):
                failures.append(f"{label}: ErrorInfo domain={err.domain!r} reason={err.reason!r}")
            elif case.field not in fields:
                failures.append(f"{label}: violations {fields}, expected {case.field!r}")
            elif not err.message:
                failures.append(f"{label}: empty status message")
        else:
            failures.append(f"{label}: succeeded")
    assert not failures, "\n".join(failures)
    # Nothing those requests carried was applied to the session that exists.
    after = await client.get_session(session_id=session.session_id)
    assert after.etag == session.etag
    assert after.message_count == 0


async def test_longest_valid_ids_are_accepted(client: AsyncSessionsClient, unique: str) -> None:
    long_id = f"{unique}/" + "x" * (256 - len(unique) - 1)
    assert len(long_id) == 256
    created = await client.create_session(agent_id="echo", session_id=long_id)
    assert (await client.get_session(session_id=long_id)).session_id == created.session_id == long_id
    hierarchical = f"org-1/team.2/user_3:{unique}/conv@7"
    assert (await client.create_session(agent_id="echo", session_id=hierarchical)).session_id == hierarchical
    agent_id = f"a{unique}".ljust(64, "z")
    assert (
        await client.create_agent(agent=Agent(agent_id=agent_id, echo=EchoBackend()))
    ).agent_id == agent_id
    await client.delete_agent(agent_id=agent_id)


def _random_text(first: int, last: int, count: int, seed: int) -> str:
    """`count` random characters from a Unicode range: text PostgreSQL cannot compress into its index."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(first, last)) for _ in range(count))


async def test_largest_metadata_values_are_stored_and_filterable(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Values at the byte bound fit the label index on every backend, and ListSessions finds them."""
    values = {
        "two-byte": _random_text(0x0400, 0x0500, 1024, 1),  # Cyrillic: 1,024 characters, 2,048 bytes
        "cjk": _random_text(0x4E00, 0x9FFF, 682, 2),  # 3 bytes each: 2,046 bytes
        "astral": _random_text(0x20000, 0x2A6DF, 512, 3),  # 4 bytes each: 2,048 bytes
    }
    for name, value in values.items():
        sid = f"{unique}/meta-{name}"
        await client.create_session(agent_id="echo", session_id=sid, metadata={"k": value})
        found = [s.session_id async for s in await client.list_sessions(metadata={"k": value})]
        assert found == [sid]
    with pytest.raises(errors.InvalidArgument) as refused:
        await client.update_session(
            session_id=f"{unique}/meta-cjk", metadata={"k": _random_text(0x4E00, 0x9FFF, 683, 4)}
        )
    assert refused.value.field_violations[0][0] == "session.metadata['k']"
    assert "2048 bytes" in refused.value.field_violations[0][1]


async def test_not_found_errors(client: AsyncSessionsClient, unique: str) -> None:
    missing = f"{unique}/missing"
    calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("SESSION_NOT_FOUND", lambda: client.get_session(session_id=missing)),
        ("SESSION_NOT_FOUND", lambda: client.end_session(session_id=missing)),
        ("SESSION_NOT_FOUND", lambda: client.heartbeat(session_id=missing)),
        ("SESSION_NOT_FOUND", lambda: client.renew_session(session_id=missing)),
        ("SESSION_NOT_FOUND", lambda: client.clear_session(session_id=missing)),
        ("SESSION_NOT_FOUND", lambda: client.delete_session(session_id=missing)),
        ("SESSION_NOT_FOUND", lambda: client.update_session(session_id=missing, metadata={})),
        ("SESSION_NOT_FOUND", lambda: client.restore_session(session_id=missing, messages=[])),
        ("SESSION_NOT_FOUND", lambda: client.append_messages(session_id=missing, messages=[text_message()])),
        ("SESSION_NOT_FOUND", lambda: client.list_messages(session_id=missing)),
        ("SESSION_NOT_FOUND", lambda: client.delete_messages(session_id=missing, message_id="m")),
        ("AGENT_NOT_FOUND", lambda: client.create_session(agent_id=f"nope-{unique}")),
        ("AGENT_NOT_FOUND", lambda: client.get_agent(agent_id=f"nope-{unique}")),
        ("AGENT_NOT_FOUND", lambda: client.delete_agent(agent_id=f"nope-{unique}")),
        (
            "AGENT_NOT_FOUND",
            lambda: client.update_agent(agent=Agent(agent_id=f"nope-{unique}", display_name="x")),
        ),
    ]
    for reason, call in calls:
        with pytest.raises(errors.NotFound) as info:
            await call()
        assert info.value.reason == reason
        assert info.value.domain == DOMAIN
        key = "session_id" if reason.startswith("SESSION") else "agent_id"
        assert info.value.metadata[key] in (missing, f"nope-{unique}")
    await client.delete_session(session_id=missing, allow_missing=True)
    await client.delete_agent(agent_id=f"nope-{unique}", allow_missing=True)


# --- turn RPCs: errors before a turn starts are statuses; on Connect, error frames ----------------------


async def test_turn_rpcs_answer_rich_errors(client: AsyncSessionsClient, target: str, unique: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        turns = turn_service_pb2_grpc.TurnServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in turns.Execute(turn_service_pb2.ExecuteRequest(session_id=f"{unique}/x")):
                pass
        err = errors.from_grpc_error(info.value)
        assert isinstance(err, errors.InvalidArgument)
        assert (err.domain, err.reason, err.field_violations[0][0]) == (DOMAIN, "INVALID_ARGUMENT", "input")

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await turns.StopTurn(turn_service_pb2.StopTurnRequest(session_id="bad id"))
        assert errors.from_grpc_error(info.value).field_violations[0][0] == "session_id"

        # On Connect an error is a frame with the status code the same request would have failed with.
        call = turns.Connect()
        await call.write(
            turn_service_pb2.ConnectRequest(
                heartbeat=turn_service_pb2.HeartbeatFrame(session_id=f"{unique}/x")
            )
        )
        frame = await call.read()
        assert frame.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert frame.error.reason == "SESSION_NOT_FOUND"
        assert isinstance(errors.from_connect_error(frame.error), errors.NotFound)
        # A trigger whose input JSON cannot hold (NaN) is one more refused frame; the stream stays open.
        live = (await client.create_session(agent_id="echo", session_id=f"{unique}/connect")).session_id
        nan_input = struct_pb2.Struct(fields={"x": struct_pb2.Value(number_value=float("nan"))})
        await call.write(
            turn_service_pb2.ConnectRequest(
                execute=turn_service_pb2.ExecuteRequest(
                    session_id=live, trigger=turn_service_pb2.Trigger(name="go", input=nan_input)
                )
            )
        )
        frame = await call.read()
        assert frame.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "trigger.input" in frame.error.message
        await call.write(
            turn_service_pb2.ConnectRequest(heartbeat=turn_service_pb2.HeartbeatFrame(session_id=live))
        )
        assert (await call.read()).session.session_id == live
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
    # A refused Execute stored nothing.
    sid = (await client.create_session(agent_id="echo", session_id=f"{unique}/turns")).session_id
    with pytest.raises(errors.InvalidArgument):
        async for _ in client.execute(session_id=sid, message={"role": "ROLE_TOOL", "parts": [{"text": {}}]}):
            pass
    assert (await client.get_session(session_id=sid)).message_count == 0


# --- agents -------------------------------------------------------------------------------------------


async def test_echo_is_built_in(client: AsyncSessionsClient) -> None:
    echo = await client.get_agent(agent_id="echo")
    assert echo.origin == AgentOrigin.AGENT_ORIGIN_BUILT_IN
    assert echo.WhichOneof("backend") == "echo"
    assert echo.etag
    listed = [a async for a in await client.list_agents()]
    assert "echo" in [a.agent_id for a in listed]
    with pytest.raises(errors.FailedPrecondition) as info:
        await client.delete_agent(agent_id="echo")
    assert info.value.reason == "AGENT_BUILT_IN"
    assert info.value.domain == DOMAIN
    assert (await client.get_agent(agent_id="echo")).origin == AgentOrigin.AGENT_ORIGIN_BUILT_IN


async def test_names_and_ids_refuse_invisible_controls_and_parts_their_bad_values(
    client: AsyncSessionsClient, unique: str
) -> None:
    """Ids, names and labels refuse C1 controls, line separators and bidirectional overrides as they
    refuse C0 ones (U+202E shows a name reversed); a tool's name is bounded; a file's size is not
    negative; a continue's bad result is named as the caller sent it, tool_results[i]. Before, these
    were stored, and the continue's violations named continue_turn.parts[i].tool_result."""
    sid = f"{unique}/names"
    for bad in ("user\u202eevil", "two\u2028lines", "nel\x85"):
        with pytest.raises(errors.InvalidArgument) as caught:
            await client.create_session(agent_id="echo", session_id=sid, user_id=bad)
        assert caught.value.field_violations[0][0] == "session.user_id"
    await client.create_session(agent_id="echo", session_id=sid, user_id="plain")

    def call(name: str) -> dict[str, Any]:
        return {"role": "ROLE_ASSISTANT", "parts": [{"toolCall": {"callId": "c1", "name": name}}]}

    file = {"role": "ROLE_USER", "parts": [{"file": {"uri": "s3://b/k", "sizeBytes": "-5"}}]}
    for message, field in (
        (call("f" * 257), "messages[0].parts[0].tool_call.name"),
        (call("f\x00"), "messages[0].parts[0].tool_call.name"),
        (file, "messages[0].parts[0].file.size_bytes"),
    ):
        with pytest.raises(errors.InvalidArgument) as caught:
            await client.append_messages(session_id=sid, messages=[message])
        assert caught.value.field_violations[0][0] == field
    await client.append_messages(session_id=sid, messages=[call("f" * 256)])
    assert (await client.get_session(session_id=sid)).message_count == 1

    for results, field in (
        ([{"callId": "c" * 200, "output": "x"}], "continue_turn.tool_results[0].call_id"),
        ([{"callId": f"c{i}", "output": "x"} for i in range(300)], "continue_turn.tool_results"),
    ):
        with pytest.raises(errors.InvalidArgument) as caught:
            async for _ in client.execute(
                session_id=sid, continue_turn={"turn_id": "t", "tool_results": results}
            ):
                pass
        assert caught.value.field_violations[0][0] == field
        assert f": {field}: " in str(caught.value)  # the message names it too


async def test_large_agents_are_bounded_and_list_in_pages_any_client_can_read(
    client: AsyncSessionsClient, target: str, unique: str
) -> None:
    """An agent's backend (system prompt and tools) is at most 256 KiB, and ListAgents pages stay under a
    few MiB whatever page size is asked, as ListMessages pages do. Before, neither was bounded: three
    agents with 12 MiB prompts made every ListAgents fail in the published client (32 MiB limit), and a
    few large ones failed any client with grpc's default 4 MiB."""

    def agent(agent_id: str, prompt: str) -> dict[str, Any]:
        chat = {"baseUrl": "http://127.0.0.1:9/v1", "model": "m", "systemPrompt": prompt}
        return {"agentId": agent_id, "openaiChat": chat}

    with pytest.raises(errors.InvalidArgument) as caught:
        await client.create_agent(agent=agent(f"big-{unique}", "x" * 300_000))
    assert caught.value.field_violations[0][0] == "agent.openai_chat"
    ids = {f"a{i:02d}-{unique}" for i in range(25)}
    for agent_id in sorted(ids):
        await client.create_agent(agent=agent(agent_id, "y" * 200_000))  # 5 MB in all
    async with grpc.aio.insecure_channel(target) as channel:  # grpc's defaults: at most 4 MiB an answer
        stub = agent_service_pb2_grpc.AgentRegistryServiceStub(channel)
        listed: set[str] = set()
        token, pages = "", 0
        while True:
            request = agent_service_pb2.ListAgentsRequest(page_size=1000, page_token=token)
            page = await stub.ListAgents(request)
            listed |= {a.agent_id for a in page.agents}
            pages += 1
            if not (token := page.next_page_token):
                break
    assert ids <= listed and pages > 1


async def test_agent_crud(client: AsyncSessionsClient, clock: ManualClock, unique: str) -> None:
    agent_id = f"agent-{unique}"
    created = await client.create_agent(
        agent={
            "agentId": agent_id,
            "displayName": "Support bot",
            "remote": {"target": "127.0.0.1:7000", "timeoutSeconds": 30},
            "timeoutDefaults": {"timeoutMinutes": 45, "autoRenew": False},
            "historyWindow": 20,
        }
    )
    assert created.agent_id == agent_id
    assert created.origin == AgentOrigin.AGENT_ORIGIN_API
    assert created.display_name == "Support bot"
    assert created.remote.target == "127.0.0.1:7000"
    assert created.remote.timeout_seconds == 30
    assert created.timeout_defaults.timeout_minutes == 45
    assert created.timeout_defaults.HasField("auto_renew") and not created.timeout_defaults.auto_renew
    assert not created.timeout_defaults.HasField("max_duration_minutes")
    assert created.history_window == 20
    assert created.HasField("create_time") and created.etag
    assert await client.get_agent(agent_id=agent_id) == created

    with pytest.raises(errors.AlreadyExists) as info:
        await client.create_agent(agent=Agent(agent_id=agent_id, echo=EchoBackend()))
    assert info.value.reason == "AGENT_ALREADY_EXISTS"
    with pytest.raises(errors.FailedPrecondition) as info:
        await client.delete_agent(agent_id="echo")
    assert info.value.reason == "AGENT_BUILT_IN"

    # Listed, in pages, each agent once.
    pager = await client.list_agents(page_size=1)
    listed = [a.agent_id async for a in pager]
    assert listed == sorted(set(listed))
    assert {"echo", agent_id} <= set(listed)

    updated = await client.update_agent(agent=Agent(agent_id=agent_id, display_name="Renamed"))
    assert updated.display_name == "Renamed"
    assert updated.remote.target == "127.0.0.1:7000"
    assert updated.history_window == 20
    assert updated.etag != created.etag
    assert updated.origin == AgentOrigin.AGENT_ORIGIN_API
    with pytest.raises(errors.Aborted) as info:
        await client.update_agent(agent=Agent(agent_id=agent_id, display_name="Stale", etag=created.etag))
    assert info.value.reason == "ETAG_MISMATCH"
    switched = await client.update_agent(
        agent={"agentId": agent_id, "openaiChat": {"baseUrl": "http://127.0.0.1:11434/v1", "model": "llama"}},
        update_mask=["backend"],
    )
    assert switched.WhichOneof("backend") == "openai_chat"
    assert switched.openai_chat.model == "llama"
    assert await client.get_agent(agent_id=agent_id) == switched

    # A session of the agent takes its timeout defaults.
    session = await client.create_session(agent_id=agent_id, session_id=f"{unique}/agent-session")
    assert session.effective_timeout_policy.timeout_minutes == 45
    assert session.effective_timeout_policy.timeout_minutes_source == PolicySource.POLICY_SOURCE_AGENT
    assert session.effective_timeout_policy.max_duration_minutes_source == PolicySource.POLICY_SOURCE_GLOBAL

    with pytest.raises(errors.FailedPrecondition) as info:
        await client.delete_agent(agent_id=agent_id)
    assert info.value.reason == "AGENT_IN_USE"
    assert info.value.metadata["agent_id"] == agent_id
    await client.end_session(session_id=session.session_id)
    with pytest.raises(errors.FailedPrecondition) as info:
        await client.delete_agent(agent_id=agent_id)
    assert info.value.reason == "AGENT_IN_USE"
    assert (await client.get_agent(agent_id=agent_id)).display_name == "Renamed"

    await client.delete_session(session_id=session.session_id)
    await client.delete_agent(agent_id=agent_id)
    with pytest.raises(errors.NotFound) as info:
        await client.get_agent(agent_id=agent_id)
    assert info.value.reason == "AGENT_NOT_FOUND"
    with pytest.raises(errors.NotFound):
        await client.delete_agent(agent_id=agent_id)
    await client.delete_agent(agent_id=agent_id, allow_missing=True)
    with pytest.raises(errors.NotFound) as info:
        await client.create_session(agent_id=agent_id)
    assert info.value.reason == "AGENT_NOT_FOUND"
    assert agent_id not in [a.agent_id async for a in await client.list_agents()]

    # An agent created again under the same id does not take the old one's etags.
    clock.advance(timedelta(seconds=1))
    again = await client.create_agent(agent_id=agent_id, agent=Agent(display_name="Again", echo={}))
    assert again.etag != created.etag
    with pytest.raises(errors.Aborted) as info:
        await client.update_agent(agent=Agent(agent_id=agent_id, display_name="Stale", etag=created.etag))
    assert info.value.reason == "ETAG_MISMATCH"
    await client.delete_agent(agent_id=agent_id)


async def test_update_agent_with_a_wildcard_mask_replaces_every_mutable_field(
    client: AsyncSessionsClient, unique: str
) -> None:
    agent_id = f"wild-{unique}"
    await client.create_agent(
        agent={
            "agentId": agent_id,
            "displayName": "Before",
            "remote": {"target": "127.0.0.1:7000"},
            "timeoutDefaults": {"timeoutMinutes": 45},
            "historyWindow": 20,
        }
    )
    replaced = await client.update_agent(
        agent=Agent(agent_id=agent_id, display_name="After", echo=EchoBackend(), history_window=3),
        update_mask=["*"],
    )
    assert replaced.display_name == "After"
    assert replaced.WhichOneof("backend") == "echo"
    assert replaced.history_window == 3
    assert not replaced.timeout_defaults.HasField("timeout_minutes")
    assert replaced.origin == AgentOrigin.AGENT_ORIGIN_API
    assert await client.get_agent(agent_id=agent_id) == replaced
    await client.delete_agent(agent_id=agent_id)


# --- server stats -------------------------------------------------------------------------------------


async def test_server_stats(fresh_database: DatabaseTarget, clock: ManualClock) -> None:
    running = await start_server(make_settings(fresh_database), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            stats = await client.get_server_stats()
            assert (stats.active_sessions, stats.expiring_soon_sessions) == (0, 0)
            assert (stats.expired_sessions, stats.ended_sessions) == (0, 0)
            assert stats.version
            assert stats.database == fresh_database.backend
            assert stats.running_turns == 0
            assert stats.HasField("start_time") and stats.HasField("uptime")
            assert stats.uptime.seconds >= 0

            async def create(name: str, minutes: int) -> str:
                policy = {"timeoutMinutes": minutes, "autoRenew": False, "warningThresholdMinutes": 5}
                s = await client.create_session(agent_id="echo", session_id=name, timeout_policy=policy)
                return s.session_id

            await create("s60", 60)
            await create("s30", 30)
            s10 = await create("s10", 10)
            await client.end_session(session_id=await create("ended60", 60))
            await client.end_session(session_id=await create("ended10", 10))

            async def counts() -> tuple[int, int, int, int]:
                s = await client.get_server_stats()
                by_status = {}
                for status in (
                    SessionStatus.SESSION_STATUS_ACTIVE,
                    SessionStatus.SESSION_STATUS_EXPIRED,
                    SessionStatus.SESSION_STATUS_ENDED,
                ):
                    pager = await client.list_sessions(status=status)
                    by_status[status] = len([x async for x in pager])
                # The stats agree with what ListSessions finds.
                assert (s.active_sessions, s.expired_sessions, s.ended_sessions) == tuple(by_status.values())
                pager = await client.list_sessions(status=SessionStatus.SESSION_STATUS_ACTIVE)
                near = len([x async for x in pager if x.near_expiration])
                assert s.expiring_soon_sessions == near, "expiring soon must match near_expiration"
                return (s.active_sessions, s.expiring_soon_sessions, s.expired_sessions, s.ended_sessions)

            assert await counts() == (3, 0, 0, 2)
            clock.advance(minutes=5)  # s10 has exactly the warning threshold left: not under it yet
            assert not (await client.get_session(session_id=s10)).near_expiration
            assert await counts() == (3, 0, 0, 2)
            clock.advance(minutes=1)  # 4 minutes left: expiring soon
            assert (await client.get_session(session_id=s10)).near_expiration
            assert await counts() == (3, 1, 0, 2)
            clock.advance(minutes=4)  # s10 expires
            assert await counts() == (2, 0, 1, 2)
            clock.advance(minutes=16)  # s30 has 4 minutes left
            assert await counts() == (2, 1, 1, 2)
            clock.advance(minutes=35)  # minute 61: every session has expired or ended
            assert await counts() == (0, 0, 3, 2)
            await client.delete_session(session_id=s10)
            assert await counts() == (0, 0, 2, 2)
    finally:
        await running.stop(0)


# --- reflection ---------------------------------------------------------------------------------------


def _reflect(target: str) -> tuple[list[str], list[str]]:
    with grpc.insecure_channel(target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        pool = DescriptorPool(db)
        session_service = pool.FindServiceByName("agentsessions.v1.SessionService")
        methods = [m.name for m in session_service.methods]
        # The request types resolve through reflection too.
        request = pool.FindMessageTypeByName("agentsessions.v1.AppendMessagesRequest")
        assert "messages" in request.fields_by_name
    return services, methods


async def test_reflection_lists_every_service(target: str) -> None:
    services, methods = await asyncio.to_thread(_reflect, target)
    assert len(services) == len(set(services))
    assert set(services) >= {
        *SERVED,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    assert {"CreateSession", "GetSession", "ListSessions", "WatchSession"} <= set(methods)


async def _reflection_v1(target: str, *requests: reflection_pb2.ServerReflectionRequest) -> list[Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return [r async for r in call(iter(requests))]


async def test_reflection_v1_raw(target: str) -> None:
    listed, found, missing, itself = await _reflection_v1(
        target,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="agentsessions.v1.SessionService"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="agentsessions.v1.NoSuchThing"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert names >= {*SERVED, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"}

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw_file)
        for raw_file in found.file_descriptor_response.file_descriptor_proto
    ]
    session_file = next(f for f in files if f.name == "agentsessions/v1/session_service.proto")
    assert session_file.package == "agentsessions.v1"
    service = next(s for s in session_file.service if s.name == "SessionService")
    assert {"CreateSession", "AppendMessages"} & {m.name for m in service.method} == {"CreateSession"}
    # Its dependencies come along, so a client can build the types with no proto files at hand.
    assert {"agentsessions/v1/session.proto", "agentsessions/v1/message.proto"} <= {f.name for f in files}

    assert missing.HasField("error_response")
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]

    v1_files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw_file)
        for raw_file in itself.file_descriptor_response.file_descriptor_proto
    ]
    assert any(f.package == "grpc.reflection.v1" for f in v1_files)


# --- the sync client ----------------------------------------------------------------------------------


def _sync_round_trip(target: str, unique: str) -> dict[str, Any]:
    with SessionsClient(target) as client:
        session = client.create_session(
            agent_id="echo", session_id=f"{unique}/sync", user_id=f"sync-{unique}"
        )
        first = client.append_text(session_id=session.session_id, role="user", text="hello", message_id="m1")
        again = client.append_text(session_id=session.session_id, role="user", text="hello", message_id="m1")
        batch = client.append_messages(
            session_id=session.session_id,
            messages=[{"role": "ROLE_ASSISTANT", "parts": [{"text": {"text": f"a{i}"}}]} for i in range(4)],
            set_variables={"step": 4},
        )
        with_session = client.list_messages(session_id=session.session_id, page_size=1, include_session=True)
        listed = [m.sequence for m in client.list_messages(session_id=session.session_id, page_size=2)]
        pages = len(list(client.list_messages(session_id=session.session_id, page_size=2).pages))
        last = [m.sequence for m in client.last_messages(session_id=session.session_id, n=2)]
        sessions = [s.session_id for s in client.list_sessions(user_id=f"sync-{unique}")]
        try:
            client.get_session(session_id="a//b")
        except errors.InvalidArgument as err:
            error: errors.AgentSessionsError = err
        deleted = client.delete_messages(session_id=session.session_id, after_sequence=3)
        stats = client.get_server_stats()
    return {
        "first": first,
        "again": again,
        "batch": [m.sequence for m in batch.messages],
        "count": batch.session.message_count,
        "listed": listed,
        "pages": pages,
        "last": last,
        "sessions": sessions,
        "error": error,
        "deleted": deleted.deleted_count,
        "database": stats.database,
        "variables": dict(with_session.first_page.session.variables),
        "page_session": with_session.first_page.session.message_count,
    }


async def test_sync_client_round_trip(target: str, unique: str, database: DatabaseTarget) -> None:
    # The server runs on this test's event loop: the blocking client must run in another thread.
    result = await asyncio.to_thread(_sync_round_trip, target, unique)
    assert result["first"].sequence == 1
    assert result["again"] == result["first"]
    assert result["batch"] == [2, 3, 4, 5]
    assert result["count"] == 5
    assert result["listed"] == [1, 2, 3, 4, 5]
    assert result["pages"] == 3
    assert result["variables"] == {"step": 4}
    assert result["page_session"] == 5
    assert result["last"] == [4, 5]
    assert result["sessions"] == [f"{unique}/sync"]
    assert result["error"].field_violations[0][0] == "session_id"
    assert result["error"].domain == DOMAIN
    assert result["deleted"] == 2
    assert result["database"] == database.backend


# --- no request crashes the server --------------------------------------------------------------------

GARBAGE = [
    b"\xff\xff\xff\xff",
    b"\x0a\xff\xff\xff\xff\x0f",  # field 1, a length far past the end
    b"\x0a\x05ab",  # field 1, truncated
    b"\x0a\x02\xc3\x28",  # field 1, invalid UTF-8 in a string
    b"\x08",  # a tag with no value
    b"\x12\x03\x0a\x01",  # a nested message cut short
    bytes(range(256)),
    b"\x80" * 12,  # a varint that never ends
    b"",
]


def _served_method_descriptors() -> list[MethodDescriptor]:
    """Every method the server serves, from the generated descriptors."""
    modules = (
        session_service_pb2,
        message_service_pb2,
        agent_service_pb2,
        admin_service_pb2,
        turn_service_pb2,
    )
    return [
        method
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
        if service.full_name in SERVED
        for method in service.methods
    ]


def _served_methods() -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every method the server serves."""
    return [
        (f"/{m.containing_service.full_name}/{m.name}", m.client_streaming, m.server_streaming)
        for m in _served_method_descriptors()
    ]


async def _send_raw(
    channel: grpc.aio.Channel, path: str, cs: bool, ss: bool, payload: bytes
) -> grpc.StatusCode:
    try:
        if not cs and not ss:
            await channel.unary_unary(path)(payload, timeout=10)
        elif not cs:
            async for _ in channel.unary_stream(path)(payload, timeout=10):
                pass
        else:
            async for _ in channel.stream_stream(path)(iter([payload]), timeout=10):
                pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# Bytes that no message type of ours decodes: an invalid wire type, a varint that never ends, a length
# past the end of the input.
UNDECODABLE = [b"\xff\xff\xff\xff", b"\x80" * 12, b"\x0a\xff\xff\xff\xff\x0f"]


def _error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError(f"no ErrorInfo in {err}")


@pytest.mark.parametrize("payload", UNDECODABLE, ids=["wire-type", "endless-varint", "past-the-end"])
async def test_undecodable_requests_are_invalid_argument_with_error_info(target: str, payload: bytes) -> None:
    """grpcio answers UNKNOWN when a request does not parse; the server's own decoders turn that into
    INVALID_ARGUMENT with an ErrorInfo naming the message type, on every RPC (Connect: an error frame, and
    the stream goes on)."""
    methods = _served_method_descriptors()
    async with grpc.aio.insecure_channel(target) as channel:
        for method in methods:
            path = f"/{method.containing_service.full_name}/{method.name}"
            if method.client_streaming:
                call = channel.stream_stream(
                    path, response_deserializer=turn_service_pb2.ConnectResponse.FromString
                )
                frames = [frame async for frame in call(iter([payload]), timeout=10)]
                assert [f.error.reason for f in frames] == ["MALFORMED_REQUEST"], (path, frames)
                assert frames[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                continue
            with pytest.raises(grpc.aio.AioRpcError) as info:
                if method.server_streaming:
                    async for _ in channel.unary_stream(path)(payload, timeout=10):
                        pass
                else:
                    await channel.unary_unary(path)(payload, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, info.value)
            error = _error_info(info.value)
            assert (error.reason, error.domain) == ("MALFORMED_REQUEST", DOMAIN), path
            assert error.metadata["message_type"] == method.input_type.full_name, path


def _tampered(token: str, position: object) -> str:
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    data["p"] = position
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


async def test_malformed_requests_do_not_crash_the_server(
    client: AsyncSessionsClient, target: str, unique: str
) -> None:
    sid = (await client.create_session(agent_id="echo", session_id=f"{unique}/burst")).session_id
    await client.append_messages(session_id=sid, messages=[text_message(str(i)) for i in range(3)])
    async with grpc.aio.insecure_channel(target) as channel:
        sends = [
            _send_raw(channel, path, cs, ss, payload)
            for path, cs, ss in _served_methods()
            for payload in GARBAGE
        ]
        codes = await asyncio.gather(*sends)
        # Undecodable requests are refused as bad input; bytes that happen to parse get an answer of the
        # contract; never a crash, never a hang, never UNKNOWN.
        assert set(codes) <= {
            grpc.StatusCode.OK,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.UNIMPLEMENTED,
        }, set(codes)
        assert grpc.StatusCode.INVALID_ARGUMENT in codes

    # Decodable but hostile values: each answers with a status of the contract, never INTERNAL.
    messages_token = (await client.list_messages(session_id=sid, page_size=1)).first_page.next_page_token
    await client.create_session(agent_id="echo", session_id=f"{unique}/burst2", user_id=f"u-{unique}")
    await client.create_session(agent_id="echo", session_id=f"{unique}/burst3", user_id=f"u-{unique}")
    sessions_token = (
        await client.list_sessions(user_id=f"u-{unique}", page_size=1)
    ).first_page.next_page_token
    hostile: list[Callable[[], Awaitable[Any]]] = [
        lambda: client.list_messages(session_id=sid, after_sequence=2**63 - 1),
        lambda: client.list_messages(session_id=sid, before_sequence=2**63 - 1, order="descending"),
        lambda: client.delete_messages(session_id=sid, after_sequence=2**63 - 1),
        lambda: client.list_messages(session_id=sid, page_size=2**31 - 1),
        lambda: client.list_sessions(page_size=-(2**31)),
        lambda: client.list_sessions(user_id="x" * 100_000),
        lambda: client.list_sessions(metadata={"k" * 500: "v" * 5000}),
        lambda: client.create_session(agent_id="echo", user_id="é" * 256),
        lambda: client.create_session(agent_id="echo", variables={"deep": [[[[[[[[[[{}]]]]]]]]]]}),
        lambda: client.create_session(agent_id="echo", variables={"nul": "a\x00b"}),
        lambda: client.append_text(session_id=sid, role="user", text="a\x00b"),
        lambda: client.list_messages(
            session_id=sid, page_size=1, page_token=_tampered(messages_token, 2**70)
        ),
        lambda: client.list_messages(session_id=sid, page_size=1, page_token=_tampered(messages_token, -5)),
        lambda: client.list_messages(session_id=sid, page_size=1, page_token=_tampered(messages_token, "1")),
        lambda: client.list_sessions(
            user_id=f"u-{unique}", page_size=1, page_token=_tampered(sessions_token, 2**64)
        ),
        lambda: client.list_agents(page_size=1, page_token=_tampered(messages_token, 7)),
    ]
    outcomes = await asyncio.gather(*(call() for call in hostile), return_exceptions=True)
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, errors.AgentSessionsError), (i, outcome)
            assert not isinstance(outcome, errors.Internal | errors.Unknown), (i, outcome)
            assert outcome.domain == DOMAIN, (i, outcome)

    # Still serving, and the data is intact.
    async with grpc.aio.insecure_channel(target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    messages = [m async for m in await client.list_messages(session_id=sid)]
    assert [m.parts[0].text.text for m in messages][:3] == ["0", "1", "2"]
    assert (await client.get_server_stats()).version


async def test_errors_quoting_long_input_reach_a_default_client_whole(
    client: AsyncSessionsClient, unique: str
) -> None:
    """A status travels in trailers, which a gRPC client with default settings refuses past 8 KiB
    (RESOURCE_EXHAUSTED, the status lost). Messages that quote what the caller sent are cut so that the
    status arrives; before, a 10,000-character etag came back RESOURCE_EXHAUSTED with no ErrorInfo
    (found by test_fuzz_requests.py)."""
    sid = (await client.create_session(agent_id="echo", session_id=f"{unique}/long")).session_id
    await client.end_session(session_id=sid)
    long_etag = "x" * 10_000
    with raises(errors.Aborted, "ETAG_MISMATCH") as info:
        await client.delete_session(session_id=sid, etag=long_etag)
    assert info.value.metadata["resource"] == "session"
    agent_id = f"long-{unique}"
    await client.create_agent(agent=Agent(agent_id=agent_id, echo=EchoBackend()))
    with raises(errors.Aborted, "ETAG_MISMATCH"):
        await client.update_agent(agent=Agent(agent_id=agent_id, etag="é" * 5000, display_name="x"))
    long_url = OpenAIChatBackend(base_url="ftp://" + "é" * 2000, model="m")
    with raises(errors.InvalidArgument, "INVALID_ARGUMENT") as invalid:
        await client.create_agent(agent=Agent(agent_id=f"{agent_id}-2", openai_chat=long_url))
    assert [f for f, _ in invalid.value.field_violations] == ["agent.openai_chat.base_url"]
    long_key = OpenAIChatBackend(base_url="http://127.0.0.1:1", model="m", api_key_env="K" * 10_000)
    with raises(errors.PermissionDenied, "API_KEY_VARIABLE_NOT_ALLOWED"):
        await client.create_agent(agent=Agent(agent_id=f"{agent_id}-3", openai_chat=long_key))


async def test_the_client_retries_only_calls_whose_repeat_changes_nothing() -> None:
    """Against a server that answers UNAVAILABLE to everything: reads and safe writes are tried again;
    DeleteMessages never is (a repeat of "everything after N" whose first attempt landed would delete
    what others appended in between), nor an append without message ids, nor an update with an etag, nor
    a renewal or a heartbeat (each renewal counts in renewal_count)."""
    calls: dict[str, int] = {}

    def unavailable(method: str) -> grpc.RpcMethodHandler:
        async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            calls[method] = calls.get(method, 0) + 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
            raise AssertionError("unreachable")

        return grpc.unary_unary_rpc_method_handler(handler)

    server = grpc.aio.server()
    for service, methods in (
        ("agentsessions.v1.SessionService", ["GetSession", "RenewSession", "Heartbeat"]),
        ("agentsessions.v1.MessageService", ["DeleteMessages", "AppendMessages"]),
        ("agentsessions.v1.AgentRegistryService", ["UpdateAgent"]),
    ):
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service, {m: unavailable(m) for m in methods})]
        )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{port}", retry=retry) as client:
            with pytest.raises(errors.Unavailable):
                await client.get_session(session_id="s")
            with pytest.raises(errors.Unavailable):
                await client.delete_messages(session_id="s", after_sequence=3)
            with pytest.raises(errors.Unavailable):
                await client.delete_messages(session_id="s", message_id="m")
            with pytest.raises(errors.Unavailable):
                await client.append_messages(session_id="s", messages=[text_message()])
            # An update without an etag sets the same values again; with one, a repeat of an update
            # that landed would fail ETAG_MISMATCH against its own write.
            with pytest.raises(errors.Unavailable):
                await client.update_agent(agent=Agent(agent_id="a", display_name="x"))
            with pytest.raises(errors.Unavailable):
                await client.update_agent(agent=Agent(agent_id="a", display_name="x", etag="v1"))
            with pytest.raises(errors.Unavailable):
                await client.renew_session(session_id="s")
            with pytest.raises(errors.Unavailable):
                await client.heartbeat(session_id="s")
    finally:
        await server.stop(0)
    assert calls == {
        "GetSession": 3,
        "DeleteMessages": 2,
        "AppendMessages": 1,
        "UpdateAgent": 4,
        "RenewSession": 1,
        "Heartbeat": 1,
    }


async def test_a_lost_database_connection_is_unavailable_and_the_client_retries(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """The database restarting under the server (its connections cut) is UNAVAILABLE with
    DATABASE_UNAVAILABLE and a retry delay, not INTERNAL; the published client retries idempotent calls
    through it, and the server goes on on fresh connections."""
    if database.backend != "postgresql":
        pytest.skip("cuts the server's PostgreSQL connections")
    running = await start_server(make_settings(database), clock=clock)
    try:
        target = f"127.0.0.1:{running.port}"
        async with AsyncSessionsClient(target) as client, grpc.aio.insecure_channel(target) as channel:
            sid = (await client.create_session(agent_id="echo", session_id=f"{unique}/db")).session_id
            get = session_service_pb2_grpc.SessionServiceStub(channel).GetSession
            await get(session_service_pb2.GetSessionRequest(session_id=sid))  # a pooled connection in use

            # As a restart does: every connection of the server's (the suite runs one server at a time).
            conn = await asyncpg.connect(POSTGRES_URL)
            try:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            finally:
                await conn.close()
            with pytest.raises(grpc.aio.AioRpcError) as cut:  # the raw stub does not retry
                await get(session_service_pb2.GetSessionRequest(session_id=sid))
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            status = rpc_status.from_call(cut.value)
            assert status is not None
            details = {d.type_url.rsplit("/", 1)[-1]: d for d in status.details}
            info = error_details_pb2.ErrorInfo()
            details["google.rpc.ErrorInfo"].Unpack(info)
            assert info.reason == "DATABASE_UNAVAILABLE"
            assert "google.rpc.RetryInfo" in details

            assert (await client.get_session(session_id=sid)).session_id == sid
            await client.append_text(session_id=sid, role="user", text="after the restart")
            assert (await client.get_session(session_id=sid)).message_count == 1
    finally:
        await running.stop(0)


@pytest.mark.parametrize("limit", ["database_lock_timeout_seconds", "database_statement_timeout_seconds"])
async def test_a_row_locked_by_another_client_fails_only_its_own_writes(
    database: DatabaseTarget, clock: ManualClock, unique: str, limit: str
) -> None:
    """PostgreSQL: while another client keeps a session's row locked (an open transaction, a stuck job),
    writes to that session fail UNAVAILABLE / DATABASE_UNAVAILABLE once the lock timeout (or, with none,
    the statement timeout) passes, and the writes to other sessions grouped behind them land. Before, no
    timeout was set, and every append and create of the server waited behind that one lock for as long
    as it was held."""
    if database.backend != "postgresql":
        pytest.skip("holds a PostgreSQL row lock")
    limits = {"database_lock_timeout_seconds": 0, "database_statement_timeout_seconds": 0, limit: 0.2}
    running = await start_server(make_settings(database, **limits), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}") as client:
            locked, free = f"{unique}/locked", f"{unique}/free"
            for sid in (locked, free):
                await client.create_session(agent_id="echo", session_id=sid)
            holder = await asyncpg.connect(POSTGRES_URL, server_settings={"search_path": database.schema})
            try:
                lock = holder.transaction()
                await lock.start()
                await holder.execute("SELECT 1 FROM sessions WHERE session_id = $1 FOR UPDATE", locked)
                blocked = asyncio.create_task(client.append_text(session_id=locked, role="user", text="x"))
                for _ in range(1000):  # until the server's write waits for the lock
                    if await holder.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the append never waited for the lock")
                await client.append_text(session_id=free, role="user", text="lands")
                await client.create_session(agent_id="echo", session_id=f"{unique}/new")
                with pytest.raises(errors.Unavailable) as timed_out:
                    await blocked
                assert timed_out.value.reason == "DATABASE_UNAVAILABLE"
                assert "locked by another client" in str(timed_out.value)
                await lock.rollback()
            finally:
                await holder.close()
            # Released: the session takes writes again, and the failed append left nothing behind.
            await client.append_text(session_id=locked, role="user", text="after")
            stored = [m async for m in await client.list_messages(session_id=locked)]
            assert [m.parts[0].text.text for m in stored] == ["after"]
            assert (await client.get_session(session_id=free)).message_count == 1
            assert (await client.get_session(session_id=f"{unique}/new")).session_id == f"{unique}/new"
    finally:
        await running.stop(0)


async def test_sqlite_locked_by_another_process_is_unavailable_and_loses_nothing(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """SQLite: while another process holds the database's write lock (a backup, a stuck job) past the lock
    timeout, the writes waiting for it fail UNAVAILABLE / DATABASE_UNAVAILABLE with a retry delay, all of
    them, a group of concurrent ones included. Before, the lock's error left the writer unwrapped and
    they failed INTERNAL, and a failed group waited for the lock again once per write. Once the lock is
    let go, writes land, and the failed ones left nothing behind."""
    if database.backend != "sqlite":
        pytest.skip("holds SQLite's write lock")
    running = await start_server(make_settings(database, database_lock_timeout_seconds=0.2), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}", retry=None) as client:
            sid = f"{unique}/locked"
            await client.create_session(agent_id="echo", session_id=sid)
            holder = sqlite3.connect(make_url(database.url).database or "", isolation_level=None)
            try:
                holder.execute("BEGIN IMMEDIATE")  # the write lock, until ROLLBACK
                writes = [client.append_text(session_id=sid, role="user", text=f"x{i}") for i in range(8)]
                outcomes = await asyncio.gather(
                    *writes,
                    client.create_session(agent_id="echo", session_id=f"{unique}/new"),
                    return_exceptions=True,
                )
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            for outcome in outcomes:
                assert isinstance(outcome, errors.Unavailable), outcome
                assert outcome.reason == "DATABASE_UNAVAILABLE"
            # Released: the session takes writes again, and the failed ones left nothing behind.
            await client.append_text(session_id=sid, role="user", text="after")
            stored = [m async for m in await client.list_messages(session_id=sid)]
            assert [m.parts[0].text.text for m in stored] == ["after"]
            with pytest.raises(errors.NotFound):
                await client.get_session(session_id=f"{unique}/new")
    finally:
        await running.stop(0)


async def test_a_batch_the_database_fails_logs_one_traceback_not_one_per_entry(
    database: DatabaseTarget, clock: ManualClock, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A BatchAppendMessages call whose entries all fail because the database is unavailable (here: another
    process holds SQLite's write lock past the lock timeout) answers each entry with its own
    UNAVAILABLE / DATABASE_UNAVAILABLE error, and logs the failure once, with a count, rather than a
    traceback per entry (64 of them for a full batch from the client)."""
    if database.backend != "sqlite":
        pytest.skip("holds SQLite's write lock")
    running = await start_server(make_settings(database, database_lock_timeout_seconds=0.2), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}", retry=None) as client:
            sids = [f"{unique}/batch-{i}" for i in range(8)]
            for sid in sids:
                await client.create_session(agent_id="echo", session_id=sid)
            stub = message_service_pb2_grpc.MessageServiceStub(client.channel)
            request = message_service_pb2.BatchAppendMessagesRequest(
                requests=[
                    message_service_pb2.AppendMessagesRequest(
                        session_id=sid,
                        messages=[Message(role=Role.ROLE_USER, parts=[Part(text=TextPart(text="x"))])],
                    )
                    for sid in sids
                ]
            )
            holder = sqlite3.connect(make_url(database.url).database or "", isolation_level=None)
            caplog.set_level(logging.WARNING, logger="sessiond")
            try:
                holder.execute("BEGIN IMMEDIATE")  # the write lock, until ROLLBACK
                response = await stub.BatchAppendMessages(request)
            finally:
                holder.execute("ROLLBACK")
                holder.close()
    finally:
        await running.stop(0)
    assert [o.WhichOneof("outcome") for o in response.outcomes] == ["error"] * 8
    assert {o.error.reason for o in response.outcomes} == {"DATABASE_UNAVAILABLE"}
    mine = [
        r for r in caplog.records if r.name == "sessiond.api.errors" or r.name == "sessiond.api.servicers"
    ]
    tracebacks = [r for r in mine if r.exc_info]
    assert len(tracebacks) == 1, [r.getMessage() for r in mine]
    assert "database unavailable in MessageServicer.BatchAppendMessages" in tracebacks[0].getMessage()
    assert any("8 entries of a BatchAppendMessages call failed with" in r.getMessage() for r in mine)


async def test_a_connect_frame_the_database_fails_is_an_unavailable_frame_and_the_stream_goes_on(
    database: DatabaseTarget, clock: ManualClock, unique: str
) -> None:
    """A heartbeat frame whose write fails because the database is busy (here its lock is held elsewhere
    past the lock timeout) gets an UNAVAILABLE / DATABASE_UNAVAILABLE error frame, and the stream and
    the turn running on it go on. Before, the stream ended there with status OK after an INTERNAL
    frame, and its running turn was stopped."""
    running = await start_server(make_settings(database, database_lock_timeout_seconds=0.2), clock=clock)
    try:
        async with AsyncSessionsClient(f"127.0.0.1:{running.port}", retry=None) as client:
            sid = f"{unique}/connect"
            await client.create_session(agent_id="echo", session_id=sid)
            conn = client.connect(session_id=sid)
            reader = Reader(conn)
            await conn.send_execute(text="/hang still here")
            await reader.until(lambda r: r.HasField("turn_event") and r.turn_event.text_delta.text == "here")
            if database.backend == "sqlite":
                holder = sqlite3.connect(make_url(database.url).database or "", isolation_level=None)
                holder.execute("BEGIN IMMEDIATE")
                try:
                    await conn.send_heartbeat()
                    failed = await reader.until(lambda r: r.HasField("error"))
                finally:
                    holder.execute("ROLLBACK")
                    holder.close()
            else:
                pg = await asyncpg.connect(POSTGRES_URL, server_settings={"search_path": database.schema})
                try:
                    async with pg.transaction():
                        await pg.execute("SELECT 1 FROM sessions WHERE session_id = $1 FOR UPDATE", sid)
                        await conn.send_heartbeat()
                        failed = await reader.until(lambda r: r.HasField("error"))
                finally:
                    await pg.close()
            err = errors.from_connect_error(failed[-1].error)
            assert isinstance(err, errors.Unavailable) and err.reason == "DATABASE_UNAVAILABLE"
            assert err.retry_delay == 1  # the frame carries the status's RetryInfo
            # The stream is still open and its turn still running: a heartbeat works, a stop ends the turn.
            await conn.send_heartbeat()
            await reader.until(lambda r: r.HasField("session"))
            await conn.send_stop()
            stopped = await reader.until(
                lambda r: r.HasField("turn_event") and r.turn_event.HasField("turn_finished")
            )
            assert stopped[-1].turn_event.turn_finished.reason == events_pb2.FINISH_REASON_CANCELLED
            await conn.done_writing()
            await reader.rest()
    finally:
        await running.stop(0)


async def test_a_closed_client_raises_client_closed_for_waiting_and_later_calls(
    target: str, unique: str
) -> None:
    """Closing a client while other tasks read its streams ends them with `Cancelled` / CLIENT_CLOSED,
    and so are calls made afterwards. Before, the readers got a bare CancelledError, as if their own task
    had been cancelled, and later calls raised grpc's UsageError, outside the client's exceptions."""
    client = AsyncSessionsClient(target)
    sid = (await client.create_session(agent_id="echo", session_id=f"{unique}/closing")).session_id
    watch = client.watch_session(session_id=sid, after_event_id=0, resume=False)
    await client.append_text(session_id=sid, role="user", text="hi")
    turn = client.execute(session_id=sid, text="/hang still going")
    readers = []
    for stream in (watch, turn):
        first = await stream.__anext__()
        assert first.session_id == sid
        readers.append(asyncio.create_task(Reader(stream).rest()))
    await client.close()
    for reader in readers:
        with pytest.raises(errors.Cancelled) as ended:
            await reader
        assert ended.value.reason == errors.CLIENT_CLOSED
    later: list[Callable[[], Awaitable[object]]] = [
        lambda: client.get_session(session_id=sid),
        lambda: Reader(client.watch_session(session_id=sid)).rest(),
        lambda: Reader(client.connect(session_id=sid)).rest(),
    ]
    for call in later:
        with pytest.raises(errors.Cancelled) as closed:
            await call()
        assert closed.value.reason == errors.CLIENT_CLOSED

    sync = SessionsClient(target)
    sync.close()
    for sync_call in (
        lambda: sync.get_session(session_id=sid),
        lambda: list(sync.watch_session(session_id=sid)),
        lambda: list(sync.connect(session_id=sid)),
    ):
        with pytest.raises(errors.Cancelled) as sync_closed:
            sync_call()
        assert sync_closed.value.reason == errors.CLIENT_CLOSED


async def test_a_sync_client_whose_channel_its_owner_closed_raises_client_closed(target: str) -> None:
    """A channel passed in and closed by its owner: the sync client's calls raise `Cancelled` /
    CLIENT_CLOSED, as the async client's do. Before, unary calls raised grpc's bare ValueError ("Cannot
    invoke RPC on closed channel!")."""
    channel = grpc.insecure_channel(target)
    client = SessionsClient(channel=channel)
    channel.close()
    for call in (
        lambda: client.get_session(session_id="any"),
        lambda: list(client.list_sessions()),
        lambda: client.append_text(session_id="any", role="user", text="hi", message_id="m1"),
        lambda: list(client.watch_session(session_id="any")),
        lambda: list(client.connect(session_id="any")),
    ):
        with pytest.raises(errors.Cancelled) as closed:
            call()
        assert closed.value.reason == errors.CLIENT_CLOSED
    client.close()  # the channel is its owner's: nothing to do, and no error
