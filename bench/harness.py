"""What every benchmark needs: free ports, server processes, fresh databases, readiness checks."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

POSTGRES_URL = os.environ.get("SESSIOND_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(target: str, *, health: bool) -> None:
    """Until the server answers (health SERVING, or just a ready channel)."""
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(target) as channel:
        while True:
            try:
                if health:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                else:
                    await asyncio.wait_for(channel.channel_ready(), 1)
                    return
            except (grpc.aio.AioRpcError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server at {target} did not come up")
            await asyncio.sleep(0.1)


@contextmanager
def process(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A Python process (`python ARGS`), terminated on exit. BENCH_VERBOSE=1 shows its stderr."""
    stderr = None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, *args], env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=stderr
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@asynccontextmanager
async def bare_channel() -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a bare grpc.aio server (`bench.bare_server`) in a process of its own, ready."""
    async with _channel("bench.bare_server") as channel:
        yield channel


@asynccontextmanager
async def lean_channel() -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the minimal durable append server (`bench.lean_server`) on a temporary SQLite file."""
    with tempfile.TemporaryDirectory() as tmp:
        async with _channel("bench.lean_server", str(Path(tmp) / "lean.db")) as channel:
            yield channel


@asynccontextmanager
async def _channel(module: str, *args: str) -> AsyncIterator[grpc.aio.Channel]:
    port = free_port()
    with process(["-m", module, str(port), *args]):
        target = f"127.0.0.1:{port}"
        await wait_ready(target, health=False)
        async with grpc.aio.insecure_channel(target) as channel:
            yield channel


async def pg(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@asynccontextmanager
async def database(kind: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A fresh database: (URL, environment for sessiond). SQLite: a temporary file; PostgreSQL: a new
    schema in the `test` database, dropped afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'bench.db'}", {}
        return
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    await pg(f"CREATE SCHEMA {schema}")
    try:
        yield POSTGRES_URL, {"SESSIOND_DATABASE_SCHEMA": schema}
    finally:
        await pg(f"DROP SCHEMA {schema} CASCADE")
