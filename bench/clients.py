"""The framework adapters against the frameworks' own local stores, measured in the same run.

- Google ADK: `DatabaseSessionService` on sqlite+aiosqlite (in this process, a file in a temporary folder)
  against `agentsessions.integrations.adk.AgentSessionsService` over gRPC to a sessiond process.
  * append_event throughput: 8 sessions written at once, each by one sequential writer, as a Runner
    appends a session's events. Events are ~200-character text events; every 4th carries a session state
    delta (as an `output_key` does), which the adapter writes with a second call.
  * get_session with the last 20 events (GetSessionConfig(num_recent_events=20)) of a 2,000-event session:
    sequential calls, median latency.
- OpenAI Agents SDK: `SQLiteSession` (in this process, a file) against
  `agentsessions.integrations.openai_agents.AgentSessionsSession`.
  * add_items throughput: 8 sessions written at once, each call adding one turn (a user item and an
    assistant item).
  * get_items(limit=20) on a 2,000-item session: sequential calls, median latency.

Both sides run their client code in this one event loop; sessiond runs in its own process, as in production.

The gRPC ceiling: the same two shapes (8 writers at once, sequential reads) against a bare grpc.aio no-op
server, one call each, measured in the same run. No service reached over gRPC from Python can pass it; where
a target asks for more, the report says so.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agents.memory import SQLiteSession
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.sessions import DatabaseSessionService
from google.adk.sessions.base_session_service import BaseSessionService, GetSessionConfig
from google.genai import types

from agentsessions import AsyncSessionsClient
from agentsessions.integrations.adk import AgentSessionsService
from agentsessions.integrations.openai_agents import AgentSessionsSession
from bench import harness

WRITERS = 8
HISTORY = 2000
LAST = 20
APP = "bench_adk"
TEXT = "The quick brown fox jumps over the lazy dog. " * 4  # ~180 characters


def _event(i: int) -> Event:
    return Event(
        author="user" if i % 2 == 0 else "assistant",
        invocation_id=f"inv-{i // 2}",
        content=types.Content(role="user" if i % 2 == 0 else "model", parts=[types.Part(text=f"{i} {TEXT}")]),
        actions=EventActions(state_delta={"last_answer": f"answer {i}"} if i % 4 == 3 else {}),
    )


def _turn(i: int) -> list[Any]:
    return [
        {"role": "user", "content": f"{i} {TEXT}"},
        {
            "id": f"msg_{i}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": f"{i} {TEXT}", "annotations": []}],
        },
    ]


async def _concurrently(
    writers: int, per_writer: int, write: Callable[[int, int], Awaitable[object]]
) -> float:
    """Operations per second: `writers` tasks at once, each doing `per_writer` operations in order."""

    async def writer(w: int) -> None:
        for i in range(per_writer):
            await write(w, i)

    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return writers * per_writer / (time.perf_counter() - start)


async def _median_latency(rounds: int, call: Callable[[], Awaitable[object]]) -> float:
    for _ in range(10):  # warm-up
        await call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _adk(service: BaseSessionService, *, per_writer: int, rounds: int) -> dict[str, float]:
    run = uuid.uuid4().hex[:8]
    sessions = [
        await service.create_session(app_name=APP, user_id=f"u{w}", session_id=f"{run}-w{w}")
        for w in range(WRITERS)
    ]

    async def append(w: int, i: int) -> None:
        await service.append_event(sessions[w], _event(i))

    rate = await _concurrently(WRITERS, per_writer, append)
    big = await service.create_session(app_name=APP, user_id="reader", session_id=f"{run}-big")
    for i in range(HISTORY):
        await service.append_event(big, _event(i))
    config = GetSessionConfig(num_recent_events=LAST)

    async def read() -> None:
        got = await service.get_session(app_name=APP, user_id="reader", session_id=big.id, config=config)
        assert got is not None and len(got.events) == LAST

    return {"append_rps": rate, "last20_p50": await _median_latency(rounds, read)}


async def _openai(make: Callable[[str], Any], *, per_writer: int, rounds: int) -> dict[str, float]:
    run = uuid.uuid4().hex[:8]
    sessions = [make(f"{run}-w{w}") for w in range(WRITERS)]

    async def add(w: int, i: int) -> None:
        await sessions[w].add_items(_turn(i))

    rate = await _concurrently(WRITERS, per_writer, add)
    big = make(f"{run}-big")
    for start in range(0, HISTORY, 100):
        await big.add_items([item for i in range(start, start + 100, 2) for item in _turn(i)])

    async def read() -> None:
        assert len(await big.get_items(limit=LAST)) == LAST

    return {"add_calls_rps": rate, "last20_p50": await _median_latency(rounds, read)}


async def workloads(kind: str, *, scale: float) -> dict[str, float]:
    """Each framework's local store, then the adapters against a sessiond of its own on `kind`."""
    per_writer = max(20, int(250 * scale))
    rounds = max(30, int(300 * scale))
    out: dict[str, float] = {"per_writer": per_writer}
    with tempfile.TemporaryDirectory() as tmp:
        adk_local = DatabaseSessionService(db_url=f"sqlite+aiosqlite:///{Path(tmp) / 'adk.db'}")
        try:
            local = await _adk(adk_local, per_writer=per_writer, rounds=rounds)
        finally:
            await adk_local.close()
        out |= {f"adk_db_{k}": v for k, v in local.items()}

        opened: list[SQLiteSession] = []

        def sqlite_session(session_id: str) -> SQLiteSession:
            opened.append(SQLiteSession(session_id, Path(tmp) / "agents.db"))
            return opened[-1]

        try:
            local = await _openai(sqlite_session, per_writer=per_writer, rounds=rounds)
        finally:
            for s in opened:
                s.close()
        out |= {f"oai_sqlite_{k}": v for k, v in local.items()}

    out |= await _bare_ceiling(per_writer=per_writer, rounds=rounds)
    port = harness.free_port()
    serve = ["-m", "sessiond.cli", "serve", "--listen", f"127.0.0.1:{port}", "--database-url"]
    async with harness.database(kind) as (url, env):
        with harness.process([*serve, url], {**env, "SESSIOND_LOG_LEVEL": "WARNING"}):
            target = f"127.0.0.1:{port}"
            await harness.wait_ready(target, health=True)
            async with AsyncSessionsClient(target) as client:
                ours = await _adk(AgentSessionsService(client=client), per_writer=per_writer, rounds=rounds)
                out |= {f"adk_ours_{k}": v for k, v in ours.items()}

                def remote_session(session_id: str) -> AgentSessionsSession:
                    return AgentSessionsSession(session_id, client=client)

                ours = await _openai(remote_session, per_writer=per_writer, rounds=rounds)
                out |= {f"oai_ours_{k}": v for k, v in ours.items()}
    return out


async def _bare_ceiling(*, per_writer: int, rounds: int) -> dict[str, float]:
    """A bare grpc.aio no-op unary call (a turn's worth of bytes each way), 8 at once and one at a time."""
    async with harness.bare_channel() as channel:
        noop = channel.unary_unary("/bench.Bare/Noop")
        payload = json.dumps(_turn(0)).encode()

        async def call(w: int = 0, i: int = 0) -> None:
            await noop(payload)

        await _concurrently(WRITERS, 50, call)  # warm-up
        rate = await _concurrently(WRITERS, per_writer, call)
        return {"bare_rps": rate, "bare_p50": await _median_latency(rounds, call)}


def report(kind: str, r: dict[str, float]) -> None:
    print(f"-- framework adapters over gRPC (sessiond on {kind}) vs the frameworks' own SQLite stores --")
    ratio = r["adk_ours_append_rps"] / r["adk_db_append_rps"]
    print(
        f"ADK append_event, {WRITERS} sessions at once: adapter {r['adk_ours_append_rps']:,.0f} events/s, "
        f"DatabaseSessionService {r['adk_db_append_rps']:,.0f} events/s  = {ratio:.2f}x  target >= 5x"
    )
    ratio = r["adk_ours_last20_p50"] / r["adk_db_last20_p50"]
    print(
        f"ADK get_session last {LAST} of {HISTORY:,} events, p50: "
        f"adapter {r['adk_ours_last20_p50'] * 1e3:.2f} ms, "
        f"DatabaseSessionService {r['adk_db_last20_p50'] * 1e3:.2f} ms  = {ratio:.2f}x  target <= 0.5x"
    )
    ratio = r["oai_ours_add_calls_rps"] / r["oai_sqlite_add_calls_rps"]
    print(
        f"Agents SDK add_items (2 items/call), {WRITERS} sessions at once: adapter "
        f"{r['oai_ours_add_calls_rps']:,.0f} calls/s, "
        f"SQLiteSession {r['oai_sqlite_add_calls_rps']:,.0f} calls/s  = {ratio:.2f}x  target >= 1x"
    )
    ceiling = r["bare_rps"] / r["oai_sqlite_add_calls_rps"]
    print(
        f"gRPC ceiling, bare grpc.aio no-op: {r['bare_rps']:,.0f} calls/s with {WRITERS} at once "
        f"(= {ceiling:.2f}x SQLiteSession's add rate), p50 {r['bare_p50'] * 1e3:.2f} ms one at a time"
    )
    ratio = r["oai_ours_last20_p50"] / r["oai_sqlite_last20_p50"]
    print(
        f"Agents SDK get_items(limit={LAST}) of {HISTORY:,} items, p50: adapter "
        f"{r['oai_ours_last20_p50'] * 1e3:.2f} ms, SQLiteSession {r['oai_sqlite_last20_p50'] * 1e3:.2f} ms"
        f"  = {ratio:.2f}x"
    )


if __name__ == "__main__":  # python -m bench.clients [sqlite|postgresql]: this workload alone
    import os
    import sys

    kind = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    report(kind, asyncio.run(workloads(kind, scale=float(os.environ.get("BENCH_SCALE", "1.0")))))
