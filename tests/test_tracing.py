"""Tracing (SESSIOND_TRACING): spans for RPCs and turns, under the caller's trace, carried on to the agent
over gRPC and over HTTP. A real server with spans kept in memory (an OpenTelemetry SDK provider with the
in-memory exporter), a real remote agent and a local chat-completions endpoint; and `sessiond serve`
itself with the console exporter.

These run on SQLite only: tracing sits in the transport and the turn runner, whatever store is behind."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import DatabaseTarget, make_settings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from turn_support import ChatCompletionsServer, Reply, chunk, kinds

from agentsessions import AsyncSessionsClient, errors
from agentsessions.v1 import agent_service_pb2, agent_service_pb2_grpc, events_pb2
from sessiond.domain.clock import ManualClock
from sessiond.server import RunningServer, start_server
from sessiond.tracing import Tracing

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(
    tmp_path: Path, clock: ManualClock, spans: InMemorySpanExporter
) -> AsyncIterator[RunningServer]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings = make_settings(DatabaseTarget("sqlite", f"sqlite:///{tmp_path / 'traced.db'}"))
    running = await start_server(settings, clock=clock, tracing=Tracing(provider))
    try:
        yield running
    finally:
        await running.stop(0)
        provider.shutdown()


@pytest.fixture
async def caller(traced: RunningServer) -> AsyncIterator[AsyncSessionsClient]:
    """A client whose calls belong to the caller's trace (TRACEPARENT)."""
    target = f"127.0.0.1:{traced.port}"
    async with AsyncSessionsClient(target, metadata=[("traceparent", TRACEPARENT)]) as client:
        yield client


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


async def finished(spans: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    """The spans called `name`, once `count` of them ended (a server span ends just after the answer)."""
    for _ in range(200):
        found = named(spans, name)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {name!r} span ended: {[s.name for s in spans.get_finished_spans()]}")


async def test_rpcs_get_server_spans_under_the_callers_trace_with_their_status(
    traced: RunningServer, caller: AsyncSessionsClient, spans: InMemorySpanExporter, unique: str
) -> None:
    await caller.create_session(agent_id="echo", session_id=f"{unique}/t")
    with pytest.raises(errors.NotFound):
        await caller.get_session(session_id=f"{unique}/missing")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced.port}") as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    (created,) = await finished(spans, "/agentsessions.v1.SessionService/CreateSession")
    assert created.kind is SpanKind.SERVER
    assert created.context is not None and created.context.trace_id == TRACE_ID
    assert created.parent is not None and created.parent.span_id == PARENT_ID and created.parent.is_remote
    attributes = dict(created.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert (attributes["rpc.service"], attributes["rpc.method"]) == (
        "agentsessions.v1.SessionService",
        "CreateSession",
    )
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]

    (missing,) = await finished(spans, "/agentsessions.v1.SessionService/GetSession")
    assert dict(missing.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # A caller's mistake is not the server's error: the semantic conventions mark server spans ERROR only
    # for UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS.
    assert missing.status.status_code is StatusCode.UNSET

    # Probes are not traced.
    assert not [s for s in spans.get_finished_spans() if "Health" in s.name]


class RecordingAgent(agent_service_pb2_grpc.AgentServiceServicer):
    """A remote agent that keeps the metadata of each call and answers with one word."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def Respond(
        self, request: agent_service_pb2.RespondRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_service_pb2.RespondResponse]:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        yield agent_service_pb2.RespondResponse(text_delta=events_pb2.TextDelta(text="traced"))
        yield agent_service_pb2.RespondResponse(
            finished=events_pb2.TurnFinished(reason=events_pb2.FINISH_REASON_STOP)
        )


@pytest.fixture
async def remote_agent() -> AsyncIterator[tuple[RecordingAgent, str]]:
    agent = RecordingAgent()
    server = grpc.aio.server()
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield agent, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def traceparent_ids(header: str) -> tuple[int, int]:
    """(trace id, parent span id) of a W3C traceparent."""
    _, trace_id, span_id, _ = header.split("-")
    return int(trace_id, 16), int(span_id, 16)


async def test_a_turn_has_a_span_and_carries_the_trace_to_a_remote_agent(
    caller: AsyncSessionsClient,
    spans: InMemorySpanExporter,
    remote_agent: tuple[RecordingAgent, str],
    unique: str,
) -> None:
    agent, target = remote_agent
    await caller.create_agent(agent={"agent_id": f"{unique}-remote", "remote": {"target": target}})
    sid = (await caller.create_session(agent_id=f"{unique}-remote", session_id=f"{unique}/r")).session_id
    events = [e async for e in caller.execute(session_id=sid, text="hello")]
    assert kinds(events)[-1] == "turn_finished"

    (execute,) = await finished(spans, "/agentsessions.v1.TurnService/Execute")
    (turn,) = await finished(spans, "turn")
    (respond,) = await finished(spans, "/agentsessions.v1.AgentService/Respond")
    assert execute.context is not None and turn.context is not None and respond.context is not None
    assert {execute.context.trace_id, turn.context.trace_id, respond.context.trace_id} == {TRACE_ID}
    assert turn.parent is not None and turn.parent.span_id == execute.context.span_id
    assert respond.parent is not None and respond.parent.span_id == turn.context.span_id
    assert respond.kind is SpanKind.CLIENT
    attributes = dict(turn.attributes or {})
    assert attributes["sessiond.session_id"] == sid
    assert attributes["sessiond.turn_id"] == events[0].turn_id
    assert (attributes["sessiond.agent_id"], attributes["sessiond.agent_backend"]) == (
        f"{unique}-remote",
        "remote",
    )
    assert attributes["sessiond.turn.finish_reason"] == "STOP"
    assert turn.status.status_code is not StatusCode.ERROR

    # The agent received the trace, its parent being the client span of the call it answered.
    (received,) = agent.metadata
    assert traceparent_ids(received["traceparent"]) == (TRACE_ID, respond.context.span_id)


async def test_a_failed_turn_span_says_why(
    caller: AsyncSessionsClient, spans: InMemorySpanExporter, unique: str
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    await caller.create_agent(
        agent={
            "agent_id": f"{unique}-gone",
            "remote": {"target": f"127.0.0.1:{closed}", "timeout_seconds": 5},
        }
    )
    sid = (await caller.create_session(agent_id=f"{unique}-gone", session_id=f"{unique}/g")).session_id
    events = [e async for e in caller.execute(session_id=sid, text="anyone?")]
    assert "error" in kinds(events)
    (turn,) = await finished(spans, "turn")
    attributes = dict(turn.attributes or {})
    assert attributes["sessiond.turn.finish_reason"] == "ERROR"
    assert attributes["sessiond.turn.error_reason"] == "AGENT_UNAVAILABLE"
    assert turn.status.status_code is StatusCode.ERROR


async def test_a_chat_completions_request_carries_the_trace(
    caller: AsyncSessionsClient, spans: InMemorySpanExporter, unique: str
) -> None:
    async with ChatCompletionsServer() as endpoint:
        endpoint.replies.append(Reply(chunks=[chunk(content="Hi"), chunk(finish="stop")]))
        agent = {"openai_chat": {"base_url": endpoint.base_url, "model": "m"}, "agent_id": f"{unique}-oai"}
        await caller.create_agent(agent=agent)
        sid = (await caller.create_session(agent_id=f"{unique}-oai", session_id=f"{unique}/o")).session_id
        events = [e async for e in caller.execute(session_id=sid, text="hello")]
    assert kinds(events)[-1] == "turn_finished"
    (turn,) = await finished(spans, "turn")
    http = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT and s.name.startswith("POST")]
    assert len(http) == 1 and http[0].parent is not None and turn.context is not None
    assert http[0].parent.span_id == turn.context.span_id
    (request,) = endpoint.received
    assert traceparent_ids(request.headers["traceparent"]) == (TRACE_ID, http[0].context.span_id)


async def test_without_tracing_nothing_is_sent_on_to_agents(
    client: AsyncSessionsClient, remote_agent: tuple[RecordingAgent, str], unique: str
) -> None:
    agent, target = remote_agent
    await client.create_agent(agent={"agent_id": f"{unique}-plain", "remote": {"target": target}})
    sid = (await client.create_session(agent_id=f"{unique}-plain", session_id=f"{unique}/p")).session_id
    [e async for e in client.execute(session_id=sid, text="hello")]
    (received,) = agent.metadata
    assert "traceparent" not in received


def test_sessiond_serve_prints_spans_with_the_console_exporter(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "SESSIOND_TRACING": "console",
        "OTEL_SERVICE_NAME": "sessiond-test",
        "SESSIOND_DATABASE_URL": f"sqlite:///{tmp_path / 'console.db'}",
        "SESSIOND_LISTEN": f"127.0.0.1:{port}",
        "SESSIOND_SWEEPER": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sessiond.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while (
                stub.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING
            ):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            from agentsessions import SessionsClient

            with SessionsClient(channel=channel) as client:
                client.create_session(agent_id="echo", session_id="console/one")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert '"name": "/agentsessions.v1.SessionService/CreateSession"' in text, text[-2000:]
    assert '"service.name": "sessiond-test"' in text
