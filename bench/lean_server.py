"""A reference point between the bare server and sessiond: the least a durable append can do behind grpc.aio.

Run as `python -m bench.lean_server PORT DBFILE`. `MessageService/AppendMessages` decodes the request,
hands it to one writer thread that commits everything queued meanwhile in one SQLite (WAL) transaction
(sequence numbers per session, one row per message), and answers with the messages and their sequences.
No session rules, no expiry, no events, no validation, no idempotency: what is left when sessiond's
features are taken away, so the report can say how much of the gap to the bare server those features
cost and how much any durable append behind grpc.aio costs on this machine.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import sys
import threading
import time
import uuid
from typing import Any

import grpc

from agentsessions.v1 import message_service_pb2

Pending = tuple[message_service_pb2.AppendMessagesRequest, asyncio.Future[list[int]]]


class Writer:
    """One thread, one connection, group commit; results go back to the loop in one hop per group."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, last_sequence INT, updated INT)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS messages (session_id TEXT, sequence INT, message_id TEXT, role INT, "
            "content BLOB, created INT, PRIMARY KEY (session_id, sequence))"
        )
        self._loop = loop
        self._queue: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, request: message_service_pb2.AppendMessagesRequest) -> asyncio.Future[list[int]]:
        future: asyncio.Future[list[int]] = self._loop.create_future()
        self._queue.put((request, future))
        return future

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            results = self._commit(batch)
            self._loop.call_soon_threadsafe(_settle, batch, results)

    def _commit(self, batch: list[Pending]) -> list[list[int]]:
        now = time.time_ns() // 1000
        last: dict[str, int] = {}
        rows = []
        results = []
        self._db.execute("BEGIN IMMEDIATE")
        for request, _ in batch:
            sid = request.session_id
            if sid not in last:
                row = self._db.execute("SELECT last_sequence FROM sessions WHERE id = ?", (sid,)).fetchone()
                if row is None:
                    self._db.execute("INSERT INTO sessions VALUES (?, 0, ?)", (sid, now))
                last[sid] = row[0] if row else 0
            sequences = []
            for message in request.messages:
                last[sid] += 1
                message_id = message.message_id or str(uuid.uuid4())
                rows.append((sid, last[sid], message_id, message.role, message.SerializeToString(), now))
                sequences.append(last[sid])
            results.append(sequences)
        self._db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)", rows)
        self._db.executemany(
            "UPDATE sessions SET last_sequence = ?, updated = ? WHERE id = ?",
            [(sequence, now, sid) for sid, sequence in last.items()],
        )
        self._db.execute("COMMIT")
        return results


def _settle(batch: list[Pending], results: list[list[int]]) -> None:
    for (_, future), sequences in zip(batch, results, strict=True):
        if not future.done():
            future.set_result(sequences)


async def main(port: int, path: str) -> None:
    writer = Writer(path, asyncio.get_running_loop())

    async def append(
        request: message_service_pb2.AppendMessagesRequest, context: Any
    ) -> message_service_pb2.AppendMessagesResponse:
        sequences = await writer.submit(request)
        response = message_service_pb2.AppendMessagesResponse(messages=request.messages)
        for message, sequence in zip(response.messages, sequences, strict=True):
            message.session_id, message.sequence = request.session_id, sequence
        response.session.session_id = request.session_id
        response.session.last_sequence = sequences[-1] if sequences else 0
        return response

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        append,
        request_deserializer=message_service_pb2.AppendMessagesRequest.FromString,
        response_serializer=message_service_pb2.AppendMessagesResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("agentsessions.v1.MessageService", {"AppendMessages": handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
