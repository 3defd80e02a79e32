"""The baseline: a bare grpc.aio server with a no-op unary method and a server-streaming method.

Run as `python -m bench.bare_server PORT`. Bytes in, bytes out: no protobuf, no database, nothing but gRPC.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

SERVICE = "bench.Bare"


async def _noop(request: bytes, context: Any) -> bytes:
    return request


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    count = int(request or b"100")
    for _ in range(count):
        yield b"x" * 8


# Held streams: each waits for the next Fire, then gets one message (the watcher baseline).
_fired = asyncio.Condition()


async def _hold(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"ready"
    async with _fired:
        await _fired.wait()
    yield request or b"event"


async def _fire(request: bytes, context: Any) -> bytes:
    async with _fired:
        _fired.notify_all()
    return b""


async def main(port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Noop": grpc.unary_unary_rpc_method_handler(_noop),
                    "Stream": grpc.unary_stream_rpc_method_handler(_stream),
                    "Hold": grpc.unary_stream_rpc_method_handler(_hold),
                    "Fire": grpc.unary_unary_rpc_method_handler(_fire),
                },
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
