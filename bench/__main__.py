"""`make bench`: sessiond against a bare grpc.aio server, measured in one run on this machine.

Each server runs in its own process; this process is the load generator and uses the same raw grpc.aio
stubs against both, so the ratios compare what the servers do, not client libraries. Figures are
throughput (calls/s, a fixed number of calls with a fixed number in flight) and latency (sequential
calls, median and p99). Environment: BENCH_DATABASE=sqlite|postgresql|both (default both),
BENCH_SCALE (default 1.0) scales call counts, BENCH_LARGE_HISTORY (100000) is the long history of the
"last 50" read, BENCH_WATCHERS (10000) the idle watchers, BENCH_SWEEP_SESSIONS (1000000) the expired
sessions swept, BENCH_ONLY (core,turns,clients,events) picks parts. At the defaults a full run takes
about half an hour on 2 cores, most of it the sweeps.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc

from agentsessions.v1 import (
    message_pb2,
    message_service_pb2,
    message_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
)
from bench import clients, events, harness, turns

SCALE = float(os.environ.get("BENCH_SCALE", "1.0"))

IN_FLIGHT = 64


async def throughput(calls: int, in_flight: int, call: Callable[[int], Awaitable[object]]) -> float:
    """Calls per second for `calls` calls with `in_flight` running at once."""
    counter = iter(range(calls))

    async def worker() -> None:
        for i in counter:
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return calls / (time.perf_counter() - start)


async def latencies(calls: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        out.append(time.perf_counter() - start)
    return out


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _n(base: int) -> int:
    return max(10, int(base * SCALE))


async def bare_baseline() -> dict[str, float]:
    port = harness.free_port()
    with harness.process(["-m", "bench.bare_server", str(port)]):
        target = f"127.0.0.1:{port}"
        await harness.wait_ready(target, health=False)
        async with grpc.aio.insecure_channel(target) as channel:
            noop = channel.unary_unary("/bench.Bare/Noop")
            payload = b"x" * 64
            await throughput(200, IN_FLIGHT, lambda i: noop(payload))  # warm-up
            # The bare rate is the denominator of every ratio and varies by a third from run to run on
            # this machine: the median of three rounds, with the spread reported.
            rates = sorted(
                [await throughput(_n(20000), IN_FLIGHT, lambda i: noop(payload)) for _ in range(3)]
            )
            lat = await latencies(_n(500), lambda: noop(payload))
    return {"unary_rps": rates[1], "unary_min": rates[0], "unary_max": rates[2], "unary_p50": _p(lat, 0.5)}


def _text(text: str, message_id: str = "") -> message_pb2.Message:
    return message_pb2.Message(
        message_id=message_id,
        role=message_pb2.ROLE_USER,
        parts=[message_pb2.Part(text=message_pb2.TextPart(text=text))],
    )


async def sessiond_workloads(kind: str) -> dict[str, float]:
    port = harness.free_port()
    async with harness.database(kind) as (url, env):
        args = ["-m", "sessiond.cli", "serve", "--listen", f"127.0.0.1:{port}", "--database-url", url]
        with harness.process(args, {**env, "SESSIOND_LOG_LEVEL": "WARNING", "SESSIOND_SWEEPER": "false"}):
            target = f"127.0.0.1:{port}"
            await harness.wait_ready(target, health=True)
            return await _measure(target)


async def _measure(target: str) -> dict[str, float]:
    out: dict[str, float] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        messages = message_service_pb2_grpc.MessageServiceStub(channel)
        run = uuid.uuid4().hex[:8]

        def create(i: int) -> Awaitable[object]:
            return sessions.CreateSession(
                session_service_pb2.CreateSessionRequest(
                    session=session_pb2.Session(agent_id="echo", user_id=f"user-{i % 100}")
                )
            )

        await throughput(200, IN_FLIGHT, create)  # warm-up
        out["create_rps"] = await throughput(_n(5000), IN_FLIGHT, create)

        # Appends: one message per call, 64 in flight, spread over 64 sessions (one per in-flight caller).
        ids = [f"bench-{run}/append-{k}" for k in range(IN_FLIGHT)]
        for sid in ids:
            await sessions.CreateSession(
                session_service_pb2.CreateSessionRequest(
                    session=session_pb2.Session(agent_id="echo"), session_id=sid
                )
            )

        def append(i: int) -> Awaitable[object]:
            return messages.AppendMessages(
                message_service_pb2.AppendMessagesRequest(
                    session_id=ids[i % IN_FLIGHT], messages=[_text(f"m{i}")]
                )
            )

        await throughput(200, IN_FLIGHT, append)
        out["append_rps"] = await throughput(_n(10000), IN_FLIGHT, append)

        # The same, all 64 callers on one session (contention on one row).
        def append_one(i: int) -> Awaitable[object]:
            return messages.AppendMessages(
                message_service_pb2.AppendMessagesRequest(session_id=ids[0], messages=[_text(f"o{i}")])
            )

        out["append_one_session_rps"] = await throughput(_n(5000), IN_FLIGHT, append_one)

        # "Last 50" on a small and on a large history.
        small, large = f"bench-{run}/small", f"bench-{run}/large"
        large_count = int(os.environ.get("BENCH_LARGE_HISTORY", "100000"))
        for sid, count in ((small, 100), (large, large_count)):
            await sessions.CreateSession(
                session_service_pb2.CreateSessionRequest(
                    session=session_pb2.Session(agent_id="echo"), session_id=sid
                )
            )
            batches = [
                message_service_pb2.AppendMessagesRequest(
                    session_id=sid, messages=[_text(f"history {j}") for j in range(k, min(count, k + 100))]
                )
                for k in range(0, count, 100)
            ]
            for start in range(0, len(batches), 8):
                await asyncio.gather(*(messages.AppendMessages(b) for b in batches[start : start + 8]))

        def last50(sid: str) -> Callable[[], Awaitable[object]]:
            request = message_service_pb2.ListMessagesRequest(
                session_id=sid, page_size=50, order=message_pb2.MESSAGE_ORDER_DESCENDING
            )
            return lambda: messages.ListMessages(request)

        for sid in (small, large):
            await latencies(50, last50(sid))  # warm-up
        rounds = _n(400)
        small_lat: list[float] = []
        large_lat: list[float] = []
        for _ in range(4):  # interleave, so drift in machine load hits both alike
            small_lat += await latencies(rounds // 4, last50(small))
            large_lat += await latencies(rounds // 4, last50(large))
        out["last50_small_p50"] = _p(small_lat, 0.5)
        out["last50_large_p50"] = _p(large_lat, 0.5)
        out["last50_small_p99"] = _p(small_lat, 0.99)
        out["last50_large_p99"] = _p(large_lat, 0.99)
        out["large_history"] = large_count
    return out


def _report(kind: str, bare: dict[str, float], r: dict[str, float]) -> None:
    print(f"\n== sessiond on {kind} vs bare grpc.aio (same run) ==")
    print(
        f"bare no-op unary: {bare['unary_rps']:,.0f} calls/s ({IN_FLIGHT} in flight; median of 3 rounds, "
        f"{bare['unary_min']:,.0f} to {bare['unary_max']:,.0f}), p50 {bare['unary_p50'] * 1e3:.3f} ms"
    )
    rows = [
        ("CreateSession", r["create_rps"], 0.5),
        ("AppendMessages (1 msg/call, 64 sessions)", r["append_rps"], 0.6),
        ("AppendMessages (1 msg/call, 1 session)", r["append_one_session_rps"], None),
    ]
    for name, rate, target in rows:
        ratio = rate / bare["unary_rps"]
        goal = f"  target >= {target:.1f}x" if target else ""
        print(f"{name:44s} {rate:9,.0f} calls/s  = {ratio:.2f}x bare{goal}")
    ratio = r["last50_large_p50"] / r["last50_small_p50"]
    print(
        f"ListMessages last 50, p50: {int(r['large_history']):,} msgs {r['last50_large_p50'] * 1e3:.3f} ms, "
        f"100 msgs {r['last50_small_p50'] * 1e3:.3f} ms  = {ratio:.2f}x  target <= 1.2x"
    )
    print(
        f"ListMessages last 50, p99: {r['last50_large_p99'] * 1e3:.3f} ms "
        f"vs {r['last50_small_p99'] * 1e3:.3f} ms"
    )


async def main() -> None:
    kinds = os.environ.get("BENCH_DATABASE", "both")
    selected = ["sqlite", "postgresql"] if kinds == "both" else [kinds]
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, grpcio {grpc.__version__}")
    parts = set(os.environ.get("BENCH_ONLY", "core,turns,clients,events").split(","))
    for kind in selected:
        if "core" in parts:
            bare = await bare_baseline()
            _report(kind, bare, await sessiond_workloads(kind))
        if "turns" in parts:
            turns.report(await turns.workloads(kind, scale=SCALE))
        if "clients" in parts:
            clients.report(kind, await clients.workloads(kind, scale=SCALE))
        if "events" in parts:
            events.report(kind, await events.run(kind, harness))


if __name__ == "__main__":
    asyncio.run(main())
