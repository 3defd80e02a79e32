"""`make bench`: sessiond against a bare grpc.aio server, measured in one run on this machine.

Each server runs in its own process; this process is the load generator and uses the same raw grpc.aio
stubs against both, so the ratios compare what the servers do, not client libraries. Figures are
throughput (calls/s, a fixed number of calls with a fixed number in flight) and latency (sequential
calls, median and p99). Throughput is measured in alternating rounds (bare, then each sessiond workload,
three times) and each ratio is the median of the rounds' ratios, printed with their range: this
machine's speed drifts by a third within minutes.

Environment: BENCH_DATABASE=sqlite|postgresql|both (default both),
BENCH_SCALE (default 1.0) scales call counts, BENCH_LARGE_HISTORY (100000) is the long history of the
"last 50" read, BENCH_WATCHERS (10000) the idle watchers, BENCH_SWEEP_SESSIONS (1000000) the expired
sessions swept, BENCH_ONLY (core,turns,clients,events) picks parts. At the defaults a full run takes
about half an hour on 2 cores, most of it the sweeps.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc

from agentsessions import AsyncSessionsClient
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


# Alternating rounds: bare, CreateSession, AppendMessages (64 sessions), AppendMessages (1), GetSession (not
# a target, but the floor under every call that touches the store), and the same appends against
# bench.lean_server (raw sqlite3 and group commit, no session rules: a durable append with nothing else).
ROUNDS = 3


def _text(text: str, message_id: str = "") -> message_pb2.Message:
    return message_pb2.Message(
        message_id=message_id,
        role=message_pb2.ROLE_USER,
        parts=[message_pb2.Part(text=message_pb2.TextPart(text=text))],
    )


async def sessiond_workloads(kind: str) -> dict[str, float]:
    """sessiond on `kind` and the bare server, each in a process of its own, measured in alternating
    rounds: the machine's speed drifts by a third within minutes, so each ratio compares rounds run next
    to each other."""
    port = harness.free_port()
    async with (
        harness.database(kind) as (url, env),
        harness.bare_channel() as bare,
        harness.lean_channel() as lean,
    ):
        args = ["-m", "sessiond.cli", "serve", "--listen", f"127.0.0.1:{port}", "--database-url", url]
        with harness.process(args, {**env, "SESSIOND_LOG_LEVEL": "WARNING", "SESSIOND_SWEEPER": "false"}):
            target = f"127.0.0.1:{port}"
            await harness.wait_ready(target, health=True)
            return await _measure(target, bare, lean)


async def _measure(target: str, bare: grpc.aio.Channel, lean: grpc.aio.Channel) -> dict[str, float]:
    out: dict[str, float] = {}
    noop = bare.unary_unary("/bench.Bare/Noop")
    lean_messages = message_service_pb2_grpc.MessageServiceStub(lean)
    payload = b"x" * 64
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

        # Appends: one message per call, 64 in flight, spread over 64 sessions (one per in-flight caller),
        # and all 64 callers on one session (contention on one row).
        ids = [f"bench-{run}/append-{k}" for k in range(IN_FLIGHT)]
        for sid in ids:
            await sessions.CreateSession(
                session_service_pb2.CreateSessionRequest(
                    session=session_pb2.Session(agent_id="echo"), session_id=sid
                )
            )

        def appending(
            stub: message_service_pb2_grpc.MessageServiceStub,
        ) -> Callable[[int], Awaitable[object]]:
            """Appends to `stub`'s server: the i-th call one message to the i-th of the 64 sessions."""

            def append(i: int) -> Awaitable[object]:
                return stub.AppendMessages(
                    message_service_pb2.AppendMessagesRequest(
                        session_id=ids[i % IN_FLIGHT], messages=[_text(f"m{i}")]
                    )
                )

            return append

        # The same appends from 64 callers through the published async client, whose append batching sends
        # those made while one is under way together (BatchAppendMessages): not the target's shape (one
        # message per call), but what a service using the client gets. With message ids: only appends
        # that carry them are batched.
        client = AsyncSessionsClient(channel=channel)

        def append_client(i: int) -> Awaitable[object]:
            return client.append_messages(
                session_id=ids[i % IN_FLIGHT],
                messages=[_text(f"c{i}", f"c-{run}-{i}-{uuid.uuid4().hex[:6]}")],
            )

        def append_one(i: int) -> Awaitable[object]:
            return messages.AppendMessages(
                message_service_pb2.AppendMessagesRequest(session_id=ids[0], messages=[_text(f"o{i}")])
            )

        def get(i: int) -> Awaitable[object]:
            return sessions.GetSession(session_service_pb2.GetSessionRequest(session_id=ids[i % IN_FLIGHT]))

        workloads: dict[str, tuple[Callable[[int], Awaitable[object]], int]] = {
            "unary": (lambda i: noop(payload), _n(20000) // ROUNDS),
            "create": (create, _n(5000) // ROUNDS),
            "append": (appending(messages), _n(10000) // ROUNDS),
            "append_one": (append_one, _n(5000) // ROUNDS),
            "append_client": (append_client, _n(10000) // ROUNDS),
            "append_floor": (appending(lean_messages), _n(10000) // ROUNDS),
            "get": (get, _n(10000) // ROUNDS),
        }
        for call, _ in workloads.values():
            await throughput(200, IN_FLIGHT, call)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in workloads}
        for _ in range(ROUNDS):
            for name, (call, calls) in workloads.items():
                rates[name].append(await throughput(max(calls, IN_FLIGHT), IN_FLIGHT, call))
        for name, values in rates.items():
            out[f"{name}_rps"] = statistics.median(values)
            if name != "unary":
                paired = [v / b for v, b in zip(values, rates["unary"], strict=True)]
                out[f"{name}_ratio"] = statistics.median(paired)
                out[f"{name}_min"], out[f"{name}_max"] = min(paired), max(paired)
        out["unary_p50"] = _p(await latencies(_n(500), lambda: noop(payload)), 0.5)

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


def _report(kind: str, r: dict[str, float]) -> None:
    print(f"\n== sessiond on {kind} vs bare grpc.aio (same run, {ROUNDS} alternating rounds) ==")
    print(
        f"bare no-op unary: {r['unary_rps']:,.0f} calls/s ({IN_FLIGHT} in flight; median of rounds), "
        f"p50 {r['unary_p50'] * 1e3:.3f} ms"
    )
    rows = [
        ("CreateSession", "create", 0.5),
        ("AppendMessages (1 msg/call, 64 sessions)", "append", 0.6),
        ("AppendMessages (1 msg/call, 1 session)", "append_one", None),
        ("AppendMessages via the client (batching), 64", "append_client", None),
        ("GetSession (a point read, for scale)", "get", None),
        ("minimal durable append (bench.lean_server)", "append_floor", None),
    ]
    for name, key, target in rows:
        goal = f"  target >= {target:.1f}x" if target else ""
        print(
            f"{name:44s} {r[key + '_rps']:9,.0f} calls/s  = {r[key + '_ratio']:.2f}x bare "
            f"(rounds {r[key + '_min']:.2f} to {r[key + '_max']:.2f}){goal}"
        )
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
            _report(kind, await sessiond_workloads(kind))
        if "turns" in parts:
            turns.report(await turns.workloads(kind, scale=SCALE))
        if "clients" in parts:
            clients.report(kind, await clients.workloads(kind, scale=SCALE))
        if "events" in parts:
            events.report(kind, await events.run(kind, harness))


if __name__ == "__main__":
    asyncio.run(main())
