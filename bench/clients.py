"""The framework adapters against the frameworks' own local stores, measured in the same run.

- Google ADK: `DatabaseSessionService` on sqlite+aiosqlite (in this process, a file in a temporary folder)
  against `agentsessions.integrations.adk.AgentSessionsService` over gRPC to a sessiond process.
  * append_event throughput: 8 sessions written at once, each by one sequential writer, as a Runner
    appends a session's events. Events are ~200-character text events; every 4th carries a session state
    delta (as an `output_key` does), which the adapter sends with the event (`set_variables`).
  * get_session with the last 20 events (GetSessionConfig(num_recent_events=20)) of a 2,000-event session:
    sequential calls, median latency.
- OpenAI Agents SDK: `SQLiteSession` (in this process, a file) against
  `agentsessions.integrations.openai_agents.AgentSessionsSession`.
  * add_items throughput: 8 sessions written at once, each call adding one turn (a user item and an
    assistant item).
  * get_items(limit=20) on a 2,000-item session: sequential calls, median latency.

Both sides run their client code in this one event loop; sessiond runs in its own process, as in production.
All stores are set up first, then measured in alternating rounds (ADK: local, adapter; Agents SDK: local,
adapter, bare), so that each ratio compares rounds run next to each other in time: on this machine the
speed drifts by a third within minutes, which moved one-shot ratios by as much as the changes measured.

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

import grpc
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
ROUNDS = 4  # alternating rounds per side
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
    writers: int, per_writer: int, write: Callable[[int, int], Awaitable[object]], first: int = 0
) -> float:
    """Operations per second: `writers` tasks at once, each doing `per_writer` operations in order
    (numbered from `first`)."""

    async def writer(w: int) -> None:
        for i in range(first, first + per_writer):
            await write(w, i)

    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return writers * per_writer / (time.perf_counter() - start)


async def _latencies(rounds: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return times


class _Side:
    """One store under one workload: set up once, then measured round by round."""

    async def setup(self) -> None:
        raise NotImplementedError

    async def write(self, w: int, i: int) -> None:
        raise NotImplementedError

    async def read(self) -> None:
        raise NotImplementedError


class _Adk(_Side):
    def __init__(self, service: BaseSessionService) -> None:
        self.service = service
        self.run = uuid.uuid4().hex[:8]

    async def setup(self) -> None:
        self.sessions = [
            await self.service.create_session(app_name=APP, user_id=f"u{w}", session_id=f"{self.run}-w{w}")
            for w in range(WRITERS)
        ]
        self.big = await self.service.create_session(
            app_name=APP, user_id="reader", session_id=f"{self.run}-big"
        )
        for i in range(HISTORY):
            await self.service.append_event(self.big, _event(i))
        self.config = GetSessionConfig(num_recent_events=LAST)

    async def write(self, w: int, i: int) -> None:
        await self.service.append_event(self.sessions[w], _event(i))

    async def read(self) -> None:
        got = await self.service.get_session(
            app_name=APP, user_id="reader", session_id=self.big.id, config=self.config
        )
        assert got is not None and len(got.events) == LAST


class _Agents(_Side):
    def __init__(self, make: Callable[[str], Any]) -> None:
        self.make = make
        self.run = uuid.uuid4().hex[:8]

    async def setup(self) -> None:
        self.sessions = [self.make(f"{self.run}-w{w}") for w in range(WRITERS)]
        self.big = self.make(f"{self.run}-big")
        for start in range(0, HISTORY, 100):
            await self.big.add_items([item for i in range(start, start + 100, 2) for item in _turn(i)])

    async def write(self, w: int, i: int) -> None:
        await self.sessions[w].add_items(_turn(i))

    async def read(self) -> None:
        assert len(await self.big.get_items(limit=LAST)) == LAST


class _Bare(_Side):
    """The gRPC ceiling: a bare no-op call with a turn's worth of bytes each way."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.noop = channel.unary_unary("/bench.Bare/Noop")
        self.payload = json.dumps(_turn(0)).encode()

    async def setup(self) -> None:
        """Nothing to store: `_paired` warms every side up alike."""

    async def write(self, w: int = 0, i: int = 0) -> None:
        await self.noop(self.payload)

    async def read(self) -> None:
        await self.noop(self.payload)


async def _paired(
    sides: dict[str, _Side], *, per_writer: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Write rates and read latencies of every side, in ROUNDS alternating rounds: this machine's speed
    drifts by a third within minutes, and rounds next to each other in time see the same machine."""
    for side in sides.values():
        await side.setup()
        await _concurrently(WRITERS, 10, side.write, first=-10)  # warm-up
        await _latencies(10, side.read)
    out: dict[str, dict[str, list[float]]] = {name: {"rates": [], "reads": []} for name in sides}
    step = max(1, per_writer // ROUNDS)
    for r in range(ROUNDS):
        for name, side in sides.items():
            out[name]["rates"].append(await _concurrently(WRITERS, step, side.write, first=r * step))
            out[name]["reads"].append(
                statistics.median(await _latencies(max(1, rounds // ROUNDS), side.read))
            )
    return out


def _ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """Ours over theirs, round by round (the report gives their median and range)."""
    return [a / b for a, b in zip(ours, theirs, strict=True)]


async def workloads(kind: str, *, scale: float) -> dict[str, float]:
    """Each framework's local store and the adapters against a sessiond of its own on `kind`, measured
    in alternating rounds (and the bare ceiling with them)."""
    per_writer = max(20, int(250 * scale))
    rounds = max(30, int(300 * scale))
    out: dict[str, float] = {"per_writer": per_writer}
    port = harness.free_port()
    serve = ["-m", "sessiond.cli", "serve", "--listen", f"127.0.0.1:{port}", "--database-url"]
    with tempfile.TemporaryDirectory() as tmp:
        adk_local = DatabaseSessionService(db_url=f"sqlite+aiosqlite:///{Path(tmp) / 'adk.db'}")
        opened: list[SQLiteSession] = []

        def sqlite_session(session_id: str) -> SQLiteSession:
            opened.append(SQLiteSession(session_id, Path(tmp) / "agents.db"))
            return opened[-1]

        try:
            async with harness.database(kind) as (url, env), harness.bare_channel() as bare:
                with harness.process([*serve, url], {**env, "SESSIOND_LOG_LEVEL": "WARNING"}):
                    target = f"127.0.0.1:{port}"
                    await harness.wait_ready(target, health=True)
                    async with AsyncSessionsClient(target) as client:
                        adk = await _paired(
                            {"db": _Adk(adk_local), "ours": _Adk(AgentSessionsService(client=client))},
                            per_writer=per_writer,
                            rounds=rounds,
                        )
                        agents = await _paired(
                            {
                                "sqlite": _Agents(sqlite_session),
                                "ours": _Agents(lambda sid: AgentSessionsSession(sid, client=client)),
                                "bare": _Bare(bare),
                            },
                            per_writer=per_writer,
                            rounds=rounds,
                        )
        finally:
            await adk_local.close()
            for s in opened:
                s.close()
    for name, got in (("adk_db", adk["db"]), ("adk_ours", adk["ours"])):
        out[f"{name}_append_rps"] = statistics.median(got["rates"])
        out[f"{name}_last20_p50"] = statistics.median(got["reads"])
    for name, got in (("oai_sqlite", agents["sqlite"]), ("oai_ours", agents["ours"])):
        out[f"{name}_add_calls_rps"] = statistics.median(got["rates"])
        out[f"{name}_last20_p50"] = statistics.median(got["reads"])
    out["bare_rps"] = statistics.median(agents["bare"]["rates"])
    out["bare_p50"] = statistics.median(agents["bare"]["reads"])
    pairs = {
        "adk_append": _ratios(adk["ours"]["rates"], adk["db"]["rates"]),
        "adk_read": _ratios(adk["ours"]["reads"], adk["db"]["reads"]),
        "oai_add": _ratios(agents["ours"]["rates"], agents["sqlite"]["rates"]),
        "oai_read": _ratios(agents["ours"]["reads"], agents["sqlite"]["reads"]),
        "ceiling": _ratios(agents["bare"]["rates"], agents["sqlite"]["rates"]),
    }
    for key, values in pairs.items():
        out[f"{key}_ratio"] = statistics.median(values)
        out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    return out


def _range(r: dict[str, float], key: str) -> str:
    return f"{r[key + '_ratio']:.2f}x (rounds {r[key + '_min']:.2f} to {r[key + '_max']:.2f})"


def report(kind: str, r: dict[str, float]) -> None:
    print(f"-- framework adapters over gRPC (sessiond on {kind}) vs the frameworks' own SQLite stores --")
    print(
        f"   ({ROUNDS} alternating rounds per side; figures are medians, ratios the median of paired rounds)"
    )
    print(
        f"ADK append_event, {WRITERS} sessions at once: adapter {r['adk_ours_append_rps']:,.0f} events/s, "
        f"DatabaseSessionService {r['adk_db_append_rps']:,.0f} events/s  = {_range(r, 'adk_append')}"
        "  target >= 5x"
    )
    print(
        f"ADK get_session last {LAST} of {HISTORY:,} events, p50: "
        f"adapter {r['adk_ours_last20_p50'] * 1e3:.2f} ms, "
        f"DatabaseSessionService {r['adk_db_last20_p50'] * 1e3:.2f} ms  = {_range(r, 'adk_read')}"
        "  target <= 0.5x"
    )
    print(
        f"Agents SDK add_items (2 items/call), {WRITERS} sessions at once: adapter "
        f"{r['oai_ours_add_calls_rps']:,.0f} calls/s, "
        f"SQLiteSession {r['oai_sqlite_add_calls_rps']:,.0f} calls/s  = {_range(r, 'oai_add')}  target >= 1x"
    )
    print(
        f"gRPC ceiling, bare grpc.aio no-op: {r['bare_rps']:,.0f} calls/s with {WRITERS} at once "
        f"(= {_range(r, 'ceiling')} SQLiteSession's add rate), p50 {r['bare_p50'] * 1e3:.2f} ms one at a time"
    )
    print(
        f"Agents SDK get_items(limit={LAST}) of {HISTORY:,} items, p50: adapter "
        f"{r['oai_ours_last20_p50'] * 1e3:.2f} ms, SQLiteSession {r['oai_sqlite_last20_p50'] * 1e3:.2f} ms"
        f"  = {_range(r, 'oai_read')}"
    )


if __name__ == "__main__":  # python -m bench.clients [sqlite|postgresql]: this workload alone
    import os
    import sys

    kind = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    report(kind, asyncio.run(workloads(kind, scale=float(os.environ.get("BENCH_SCALE", "1.0")))))
