"""Session events at scale: idle watchers, fan-out of one event, and a sweep of a million expired sessions.

Baselines, measured in the same run: a bare grpc.aio server holding the same number of idle server streams
and releasing them with one call (bench.bare_server Hold/Fire); for the sweep, the same GetSession calls on
the same database with no sweep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import asyncpg
import grpc

from agentsessions.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    message_pb2,
    message_service_pb2,
    message_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
)

CHANNELS = 10  # watchers are spread over this many connections


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _open_streams(
    n: int, channels: list[grpc.aio.Channel], open_one: Callable[[grpc.aio.Channel], grpc.aio.UnaryStreamCall]
) -> list[grpc.aio.UnaryStreamCall]:
    """Opens n streams, a thousand at a time, each read up to its first message (so each is live)."""
    calls: list[grpc.aio.UnaryStreamCall] = []
    for start in range(0, n, 1000):
        batch = [open_one(channels[i % len(channels)]) for i in range(start, min(n, start + 1000))]
        await asyncio.gather(*(c.read() for c in batch))
        calls += batch
    return calls


async def _fan_out(calls: list[grpc.aio.UnaryStreamCall], trigger: Callable[[], Awaitable[object]]) -> float:
    """Seconds from the trigger until every stream has received its next message."""
    start = time.perf_counter()
    reads = asyncio.gather(*(c.read() for c in calls))
    await trigger()
    await reads
    return time.perf_counter() - start


async def watchers(target: str, pid: int, bare_target: str, bare_pid: int, n: int) -> dict[str, float]:
    out: dict[str, float] = {"watchers": n}
    # Baseline: n idle streams on the bare server, then one Fire to all of them.
    bare_channels = [grpc.aio.insecure_channel(bare_target) for _ in range(CHANNELS)]
    try:
        hold = [ch.unary_stream("/bench.Bare/Hold") for ch in bare_channels]
        fire = bare_channels[0].unary_unary("/bench.Bare/Fire")
        before = rss_bytes(bare_pid)
        calls = await _open_streams(n, bare_channels, lambda ch: hold[bare_channels.index(ch)](b"event"))
        out["bare_bytes_per_stream"] = (rss_bytes(bare_pid) - before) / n
        out["bare_fan_out_s"] = await _fan_out(calls, lambda: fire(b""))
        for c in calls:
            c.cancel()
    finally:
        for ch in bare_channels:
            await ch.close()

    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    try:
        sessions = session_service_pb2_grpc.SessionServiceStub(channels[0])
        messages = message_service_pb2_grpc.MessageServiceStub(channels[0])
        created = await sessions.CreateSession(
            # A day's timeout, like the probe: the sweep below waits for the expired count to reach zero,
            # and a watched session expiring during a long run would keep it above (it is not yet
            # past retention).
            session_service_pb2.CreateSessionRequest(
                session=session_pb2.Session(
                    agent_id="echo", timeout_policy=session_pb2.TimeoutPolicy(timeout_minutes=1440)
                )
            )
        )
        sid = created.session_id

        async def append() -> object:
            return await messages.AppendMessages(
                message_service_pb2.AppendMessagesRequest(
                    session_id=sid,
                    messages=[
                        message_pb2.Message(
                            role=message_pb2.ROLE_USER,
                            parts=[message_pb2.Part(text=message_pb2.TextPart(text="hi"))],
                        )
                    ],
                )
            )

        await append()  # event 1: every watcher replays it first, which proves it is live
        stubs = [session_service_pb2_grpc.SessionServiceStub(ch) for ch in channels]
        request = session_service_pb2.WatchSessionRequest(session_id=sid, after_event_id=0)
        before = rss_bytes(pid)
        calls = await _open_streams(n, channels, lambda ch: stubs[channels.index(ch)].WatchSession(request))
        out["bytes_per_watcher"] = (rss_bytes(pid) - before) / n
        out["fan_out_s"] = await _fan_out(calls, append)
        for c in calls:
            c.cancel()
    finally:
        for ch in channels:
            await ch.close()
    return out


async def populate_expired(url: str, schema: str | None, n: int, now: datetime) -> None:
    """Inserts n sessions that expired two days ago, in one SQL statement (the schema must exist)."""
    expire = now - timedelta(days=2)
    create = expire - timedelta(minutes=30)
    columns = (
        "session_id, agent_id, user_id, metadata, variables, policy, timeout_minutes, auto_renew, "
        "max_duration_minutes, warning_threshold_minutes, create_time, update_time, last_activity_time, "
        "start_time, anchor_time, expire_time, max_expire_time, warn_time, renewal_count, message_count, "
        "last_sequence, version, last_event_id, next_notify_time"
    )
    if url.startswith("sqlite"):

        def us(t: datetime) -> int:
            return int((t - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)

        c, e, m = us(create), us(expire), us(create + timedelta(hours=12))
        w = us(expire - timedelta(minutes=5))
        path = url.split("///", 1)[1]
        sql = (
            f"WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {n}) "
            f"INSERT INTO sessions ({columns}) SELECT 'sweep-' || i, 'echo', '', '{{}}', '{{}}', "
            f'\'{{"session": {{}}, "agent": {{}}}}\', 30, 1, 720, 5, {c}, {c}, {c}, {c}, {c}, {e}, {m}, '
            f"{w}, 0, 0, 0, 1, 0, {w} FROM k"
        )

        def run() -> None:
            with sqlite3.connect(path) as conn:
                conn.execute(sql)

        await asyncio.to_thread(run)
        return

    conn = await asyncpg.connect(url, server_settings={"search_path": schema or "public"})
    try:
        await conn.execute(
            f"INSERT INTO sessions ({columns}) SELECT 'sweep-' || i, 'echo', '', '{{}}', '{{}}', "
            '\'{"session": {}, "agent": {}}\', 30, true, 720, 5, $1, $1, $1, $1, $1, $2, $3, $4, '
            "0, 0, 0, 1, 0, $4 FROM generate_series(1, $5) AS i",
            create,
            expire,
            create + timedelta(hours=12),
            expire - timedelta(minutes=5),
            n,
        )
    finally:
        await conn.close()


async def get_session_latencies(
    target: str, session_id: str, until: Callable[[], Awaitable[bool]]
) -> list[float]:
    """GetSession latencies, one call after another, until `until()` says stop (checked every 50 calls)."""
    out: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        request = session_service_pb2.GetSessionRequest(session_id=session_id)
        while True:
            for _ in range(50):
                start = time.perf_counter()
                await stub.GetSession(request)
                out.append(time.perf_counter() - start)
            if await until():
                return out


async def remaining_sessions(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stats = await admin_service_pb2_grpc.AdminServiceStub(channel).GetServerStats(
            admin_service_pb2.GetServerStatsRequest()
        )
    return int(stats.expired_sessions)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


async def run(kind: str, h: ModuleType) -> dict[str, float]:
    """All event workloads on one backend. `h` is bench.harness (processes, ports, databases)."""
    out: dict[str, float] = {}
    n_watchers = env_int("BENCH_WATCHERS", 10_000)
    n_sweep = env_int("BENCH_SWEEP_SESSIONS", 1_000_000)
    bare_port = h.free_port()
    async with h.database(kind) as (url, env), contextlib.AsyncExitStack() as stack:
        bare = stack.enter_context(h.process(["-m", "bench.bare_server", str(bare_port)]))
        port = h.free_port()
        serve = ["-m", "sessiond.cli", "serve", "--listen", f"127.0.0.1:{port}", "--database-url", url]
        quiet = {**env, "SESSIOND_LOG_LEVEL": "WARNING", "SESSIOND_SWEEPER": "false"}
        with h.process(serve, quiet) as server:
            target, bare_target = f"127.0.0.1:{port}", f"127.0.0.1:{bare_port}"
            await h.wait_ready(bare_target, health=False)
            await h.wait_ready(target, health=True)
            out.update(await watchers(target, server.pid, bare_target, bare.pid, n_watchers))
            async with grpc.aio.insecure_channel(target) as channel:
                probe = await session_service_pb2_grpc.SessionServiceStub(channel).CreateSession(
                    session_service_pb2.CreateSessionRequest(
                        session=session_pb2.Session(
                            agent_id="echo", timeout_policy=session_pb2.TimeoutPolicy(timeout_minutes=1440)
                        )
                    )
                )
        await populate_expired(url, env.get("SESSIOND_DATABASE_SCHEMA"), n_sweep, datetime.now(UTC))
        out["sweep_sessions"] = n_sweep
        # Baseline: GetSession on the same database, no sweep.
        with h.process(serve, quiet):
            await h.wait_ready(target, health=True)
            calls = 0

            async def enough() -> bool:
                nonlocal calls
                calls += 50
                return calls >= 2000

            quiet_lat = await get_session_latencies(target, probe.session_id, enough)
        # The sweep: notices for every expired session, then the purge (retention one day).
        sweeping = {**quiet, "SESSIOND_SWEEPER": "true", "SESSIOND_RETENTION_MINUTES": "1440"}
        start = time.perf_counter()
        with h.process(serve, sweeping):
            await h.wait_ready(target, health=True)

            async def swept() -> bool:
                return await remaining_sessions(target) == 0

            busy_lat = await get_session_latencies(target, probe.session_id, swept)
        out["sweep_s"] = time.perf_counter() - start
    out["get_p50_quiet"], out["get_p99_quiet"] = _p(quiet_lat, 0.5), _p(quiet_lat, 0.99)
    out["get_p50_sweep"], out["get_p99_sweep"] = _p(busy_lat, 0.5), _p(busy_lat, 0.99)
    out["get_calls_sweep"] = len(busy_lat)
    return out


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(kind: str, r: dict[str, float]) -> None:
    n = int(r["watchers"])
    memory_ratio = r["bytes_per_watcher"] / r["bare_bytes_per_stream"]
    print(f"\n== session events on {kind} (same run) ==")
    print(
        f"idle watchers ({n:,}): {r['bytes_per_watcher'] / 1024:.1f} KiB each; bare grpc.aio idle stream "
        f"{r['bare_bytes_per_stream'] / 1024:.1f} KiB = {memory_ratio:.2f}x"
    )
    print(
        f"one event to all {n:,} watchers: {r['fan_out_s'] * 1e3:.0f} ms; bare broadcast "
        f"{r['bare_fan_out_s'] * 1e3:.0f} ms = {r['fan_out_s'] / r['bare_fan_out_s']:.2f}x"
    )
    print(
        f"sweep of {int(r['sweep_sessions']):,} expired sessions (expiry events + purge): "
        f"{r['sweep_s']:.1f} s; "
        f"GetSession p99 during it {r['get_p99_sweep'] * 1e3:.2f} ms vs {r['get_p99_quiet'] * 1e3:.2f} ms "
        f"without = {r['get_p99_sweep'] / r['get_p99_quiet']:.2f}x (p50 {r['get_p50_sweep'] * 1e3:.2f} vs "
        f"{r['get_p50_quiet'] * 1e3:.2f} ms)"
    )
