"""Prometheus metrics (SESSIOND_METRICS_LISTEN): what an operator's scrape of /metrics shows after calls of
every kind, read from a real server's HTTP endpoint."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from conftest import DatabaseTarget, make_settings, serving
from prometheus_client.parser import text_string_to_metric_families
from turn_support import Reader

from agentsessions import AsyncSessionsClient, Message, Part, Role, TextPart, errors
from agentsessions.v1 import message_service_pb2, message_service_pb2_grpc
from sessiond.cli import _settings, build_parser
from sessiond.domain.clock import ManualClock
from sessiond.server import RunningServer

SESSIONS = "agentsessions.v1.SessionService"
MESSAGES = "agentsessions.v1.MessageService"
TURNS = "agentsessions.v1.TurnService"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(running: RunningServer) -> Samples:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{running.metrics_port}/metrics")
    assert reply.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series not there yet (a counter nothing has counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, service: str, method: str, code: str, kind: str = "unary") -> float:
    return value(
        samples,
        "grpc_server_handled_total",
        grpc_type=kind,
        grpc_service=service,
        grpc_method=method,
        grpc_code=code,
    )


@pytest.fixture
async def metered(database: DatabaseTarget, clock: ManualClock) -> AsyncIterator[RunningServer]:
    async with serving(make_settings(database, metrics_listen="127.0.0.1:0"), clock) as running:
        yield running


async def test_rpcs_are_counted_by_method_and_status_code_and_timed(
    metered: RunningServer, unique: str
) -> None:
    before = await scrape(metered)
    async with AsyncSessionsClient(f"127.0.0.1:{metered.port}") as client:
        await client.create_session(agent_id="echo", session_id=f"{unique}/a")
        await client.create_session(agent_id="echo", session_id=f"{unique}/b")
        with pytest.raises(errors.NotFound):
            await client.get_session(session_id=f"{unique}/missing")
        with pytest.raises(errors.InvalidArgument):
            await client.get_session(session_id="")
        with pytest.raises(errors.AlreadyExists):
            await client.create_session(agent_id="echo", session_id=f"{unique}/a")
        events = [e async for e in client.execute(session_id=f"{unique}/a", text="counted words")]
    after = await scrape(metered)

    def delta(method: str, code: str, service: str = SESSIONS, kind: str = "unary") -> float:
        return handled(after, service, method, code, kind) - handled(before, service, method, code, kind)

    assert delta("CreateSession", "OK") == 2
    assert delta("CreateSession", "ALREADY_EXISTS") == 1
    assert delta("GetSession", "NOT_FOUND") == 1
    assert delta("GetSession", "INVALID_ARGUMENT") == 1
    assert delta("Execute", "OK", TURNS, "server_stream") == 1
    unary = {"grpc_type": "unary", "grpc_service": SESSIONS, "grpc_method": "CreateSession"}
    assert (
        value(after, "grpc_server_started_total", **unary)
        - value(before, "grpc_server_started_total", **unary)
        == 3
    )
    timed = value(after, "grpc_server_handling_seconds_count", **unary) - value(
        before, "grpc_server_handling_seconds_count", **unary
    )
    assert timed == 3
    assert value(after, "grpc_server_handling_seconds_sum", **unary) > value(
        before, "grpc_server_handling_seconds_sum", **unary
    )
    # Every event the caller received was counted as sent on the stream; unary calls have no such series.
    stream = {"grpc_type": "server_stream", "grpc_service": TURNS, "grpc_method": "Execute"}
    sent = value(after, "grpc_server_msg_sent_total", **stream) - value(
        before, "grpc_server_msg_sent_total", **stream
    )
    assert sent == len(events) > 0
    assert ("grpc_server_msg_sent_total", frozenset(unary.items())) not in after


async def test_a_stream_the_client_cancels_is_counted_cancelled(metered: RunningServer, unique: str) -> None:
    sid = f"{unique}/watched"
    before = await scrape(metered)
    async with AsyncSessionsClient(f"127.0.0.1:{metered.port}") as client:
        await client.create_session(agent_id="echo", session_id=sid)
        watch = client.watch_session(session_id=sid, after_event_id=0, resume=False)
        reader = Reader(watch)
        await client.append_text(session_id=sid, role="user", text="hi")
        await reader.until(lambda e: e.HasField("messages_appended"))
        assert value(await scrape(metered), "sessiond_watch_subscriptions") >= 1
        watch.cancel()
    # The server learns of the cancellation a moment later; nothing here waits on a clock.
    for _ in range(200):
        after = await scrape(metered)
        if handled(after, SESSIONS, "WatchSession", "CANCELLED", "server_stream") > handled(
            before, SESSIONS, "WatchSession", "CANCELLED", "server_stream"
        ):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the cancelled watch was never counted")
    assert value(after, "sessiond_watch_subscriptions") == 0


async def test_a_batchs_entries_are_counted_by_the_code_each_ended_with(
    metered: RunningServer, unique: str
) -> None:
    """A BatchAppendMessages call counts once, OK, whatever its entries did; its entries count in
    sessiond_batch_append_entries by their own codes, so a failing entry is not hidden in an OK call."""
    ok = f"{unique}/batched"
    hello = Message(role=Role.ROLE_USER, parts=[Part(text=TextPart(text="hello"))])
    request = message_service_pb2.BatchAppendMessagesRequest(
        requests=[
            message_service_pb2.AppendMessagesRequest(session_id=ok, messages=[hello]),
            message_service_pb2.AppendMessagesRequest(session_id=ok, messages=[hello]),
            message_service_pb2.AppendMessagesRequest(session_id=f"{unique}/missing", messages=[hello]),
            message_service_pb2.AppendMessagesRequest(session_id=ok, messages=[Message(role=Role.ROLE_USER)]),
        ]
    )
    async with AsyncSessionsClient(f"127.0.0.1:{metered.port}") as client:
        await client.create_session(agent_id="echo", session_id=ok)
        before = await scrape(metered)
        response = await message_service_pb2_grpc.MessageServiceStub(client.channel).BatchAppendMessages(
            request
        )
    after = await scrape(metered)
    assert [o.WhichOneof("outcome") for o in response.outcomes] == ["response", "response", "error", "error"]

    def entries(code: str) -> float:
        name = "sessiond_batch_append_entries_total"
        return value(after, name, grpc_code=code) - value(before, name, grpc_code=code)

    assert (entries("OK"), entries("NOT_FOUND"), entries("INVALID_ARGUMENT")) == (2, 1, 1)
    batches = handled(after, MESSAGES, "BatchAppendMessages", "OK") - handled(
        before, MESSAGES, "BatchAppendMessages", "OK"
    )
    assert batches == 1


async def test_server_state_is_read_at_scrape_time(metered: RunningServer, unique: str) -> None:
    before = await scrape(metered)
    async with AsyncSessionsClient(f"127.0.0.1:{metered.port}") as client:
        for name in ("one", "two", "three"):
            await client.create_session(agent_id="echo", session_id=f"{unique}/{name}")
        await client.end_session(session_id=f"{unique}/three")
    after = await scrape(metered)

    def grew(status: str) -> float:
        gauge = "sessiond_sessions"
        return value(after, gauge, status=status) - value(before, gauge, status=status)

    assert (grew("active"), grew("ended")) == (2, 1)
    assert value(after, "sessiond_turns_running") == 0


async def test_metrics_are_off_unless_an_address_is_given(server: RunningServer) -> None:
    assert server.metrics_port is None
    parse = build_parser().parse_args
    assert _settings(parse(["serve"])).metrics_listen == ""
    chosen = _settings(parse(["serve", "--metrics-listen", "127.0.0.1:9464"]))
    assert chosen.metrics_listen == "127.0.0.1:9464"


# A client that reads the first event of a turn and dies (as `buf curl ... | head -1` does): its
# connection closes under the stream, with no cancel of the call first.
DYING_CLIENT = """
import os, sys, grpc
from agentsessions.v1 import message_pb2, turn_service_pb2, turn_service_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
request = turn_service_pb2.ExecuteRequest(
    session_id=sys.argv[2],
    message=message_pb2.Message(parts=[message_pb2.Part(text=message_pb2.TextPart(text="/hang"))]),
)
next(iter(turn_service_pb2_grpc.TurnServiceStub(channel).Execute(request)))
os._exit(0)
"""


async def test_a_stream_whose_client_dies_is_counted_cancelled(metered: RunningServer, unique: str) -> None:
    """Before, the turn stream of a client whose connection closed mid-stream was counted UNKNOWN."""
    target = f"127.0.0.1:{metered.port}"
    async with AsyncSessionsClient(target) as client:
        sid = (await client.create_session(agent_id="echo", session_id=f"{unique}/dies")).session_id
    before = await scrape(metered)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", DYING_CLIENT, target, sid)
    assert await proc.wait() == 0
    for _ in range(300):
        after = await scrape(metered)
        if handled(after, TURNS, "Execute", "CANCELLED", "server_stream") > handled(
            before, TURNS, "Execute", "CANCELLED", "server_stream"
        ):
            break
        assert handled(after, TURNS, "Execute", "UNKNOWN", "server_stream") == handled(
            before, TURNS, "Execute", "UNKNOWN", "server_stream"
        ), "counted UNKNOWN"
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the dead client's turn stream was never counted")
