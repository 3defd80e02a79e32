"""Turns: how fast sessiond relays an agent's deltas through Execute, against a bare grpc.aio server
stream in the same run, and how much time a turn adds before its first delta.

The agent is the built-in echo agent, in the sessiond process: it streams one delta per word as fast as
it can, so the figure is the relay's own cost (a turn event built, kept for followers, published to the
session's bus, serialized and sent). Both streams are read as raw bytes, with the same client loop.

- Relay rate: deltas per second between the first and the last delta of a long answer, against messages
  per second of the bare `Stream` method over the same count.
- Time to first delta: from the call to the first text delta of a short answer, against the first
  message of a bare stream. The difference is what a turn does first: reading the session and agent,
  taking the turn lease, storing the user message, recording the durable turn-started event and reading
  the history window.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from agentsessions.v1 import (
    events_pb2,
    message_pb2,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    turn_service_pb2,
)
from bench import harness

EXECUTE = "/agentsessions.v1.TurnService/Execute"
BARE_STREAM = "/bench.Bare/Stream"


def _execute_request(session_id: str, text: str) -> bytes:
    return turn_service_pb2.ExecuteRequest(
        session_id=session_id,
        message=message_pb2.Message(parts=[message_pb2.Part(text=message_pb2.TextPart(text=text))]),
    ).SerializeToString()


async def _timed(stream: AsyncIterator[bytes]) -> tuple[list[float], list[bytes]]:
    stamps: list[float] = []
    items: list[bytes] = []
    async for item in stream:
        stamps.append(time.perf_counter())
        items.append(item)
    return stamps, items


def _is_delta(raw: bytes) -> bool:
    return events_pb2.TurnEvent.FromString(raw).WhichOneof("kind") == "text_delta"


async def _relay_rate(call: Callable[[], AsyncIterator[bytes]], *, turn: bool) -> float:
    stamps, items = await _timed(call())
    if turn:  # from the first text delta to the last (the turn's set-up and wrap-up left out)
        deltas = [i for i, raw in enumerate(items) if _is_delta(raw)]
        first, last = deltas[0], deltas[-1]
    else:
        first, last = 0, len(items) - 1
    return (last - first) / (stamps[last] - stamps[first])


async def _first_delta(call: Callable[[], AsyncIterator[bytes]], *, turn: bool) -> float:
    start = time.perf_counter()
    first = None
    async for raw in call():
        if first is None and (not turn or _is_delta(raw)):
            first = time.perf_counter() - start
    assert first is not None
    return first


async def measure(
    sessiond_target: str, bare_target: str, *, words: int, rounds: int, firsts: int
) -> dict[str, float]:
    async with (
        grpc.aio.insecure_channel(sessiond_target) as turns_channel,
        grpc.aio.insecure_channel(bare_target) as bare_channel,
    ):
        sessions = session_service_pb2_grpc.SessionServiceStub(turns_channel)
        execute = turns_channel.unary_stream(EXECUTE)
        bare = bare_channel.unary_stream(BARE_STREAM)
        run = uuid.uuid4().hex[:8]

        async def session(name: str) -> str:
            created = await sessions.CreateSession(
                session_service_pb2.CreateSessionRequest(
                    session=session_pb2.Session(agent_id="echo"), session_id=f"bench-{run}/{name}"
                )
            )
            return created.session_id

        long_sid, short_sid = await session("long"), await session("short")
        long_answer = _execute_request(long_sid, " ".join(f"w{i}" for i in range(words)))
        short_answer = _execute_request(short_sid, "hello there")

        def long_turn() -> AsyncIterator[bytes]:
            return execute(long_answer)  # type: ignore[no-any-return]

        def long_bare() -> AsyncIterator[bytes]:
            return bare(str(words).encode())  # type: ignore[no-any-return]

        def short_turn() -> AsyncIterator[bytes]:
            return execute(short_answer)  # type: ignore[no-any-return]

        def short_bare() -> AsyncIterator[bytes]:
            return bare(b"2")  # type: ignore[no-any-return]

        for _ in range(2):  # warm-up
            await _relay_rate(long_turn, turn=True)
            await _relay_rate(long_bare, turn=False)
        turn_rates: list[float] = []
        bare_rates: list[float] = []
        for _ in range(rounds):  # interleaved, so drift in machine load hits both alike
            turn_rates.append(await _relay_rate(long_turn, turn=True))
            bare_rates.append(await _relay_rate(long_bare, turn=False))

        turn_first: list[float] = []
        bare_first: list[float] = []
        probes: list[tuple[list[float], Callable[[], Awaitable[float]]]] = [
            (turn_first, lambda: _first_delta(short_turn, turn=True)),
            (bare_first, lambda: _first_delta(short_bare, turn=False)),
        ]
        for _ in range(10):
            for _out, probe in probes:
                await probe()
        for _ in range(firsts):
            for out, probe in probes:
                out.append(await probe())
    return {
        "words": words,
        "turn_rate": statistics.median(turn_rates),
        "bare_rate": statistics.median(bare_rates),
        # Each round pairs the two streams back to back; the median of the pairs' ratios shrugs off the
        # drift of a machine whose load changes during the run.
        "rate_ratio": statistics.median(t / b for t, b in zip(turn_rates, bare_rates, strict=True)),
        "turn_first_p50": statistics.median(turn_first),
        "bare_first_p50": statistics.median(bare_first),
        "turn_first_p90": sorted(turn_first)[int(0.9 * len(turn_first))],
        "bare_first_p90": sorted(bare_first)[int(0.9 * len(bare_first))],
    }


async def workloads(kind: str, *, scale: float) -> dict[str, float]:
    """`measure` against a bare server and a sessiond of its own, on a fresh database of `kind`."""
    bare_port, port = harness.free_port(), harness.free_port()
    serve = ["-m", "sessiond.cli", "serve", "--listen", f"127.0.0.1:{port}", "--database-url"]
    async with harness.database(kind) as (url, env):
        with (
            harness.process(["-m", "bench.bare_server", str(bare_port)]),
            harness.process([*serve, url], {**env, "SESSIOND_LOG_LEVEL": "WARNING"}),
        ):
            target, bare_target = f"127.0.0.1:{port}", f"127.0.0.1:{bare_port}"
            await harness.wait_ready(bare_target, health=False)
            await harness.wait_ready(target, health=True)
            return await measure(
                target,
                bare_target,
                words=max(500, int(5000 * scale)),
                rounds=11,
                firsts=max(20, int(200 * scale)),
            )


def report(r: dict[str, float]) -> None:
    ratio = r["rate_ratio"]
    print(
        f"Execute deltas relayed ({int(r['words']):,}-word echo answer): {r['turn_rate']:,.0f} deltas/s, "
        f"bare stream {r['bare_rate']:,.0f} msgs/s  = {ratio:.2f}x (median of paired rounds)  target >= 0.7x"
    )
    added = r["turn_first_p50"] - r["bare_first_p50"]
    print(
        f"time to first delta, p50: Execute {r['turn_first_p50'] * 1e3:.2f} ms, bare stream "
        f"{r['bare_first_p50'] * 1e3:.2f} ms  = +{added * 1e3:.2f} ms added by a turn "
        f"(p90 {r['turn_first_p90'] * 1e3:.2f} vs {r['bare_first_p90'] * 1e3:.2f} ms)"
    )
