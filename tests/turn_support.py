"""Helpers of the turn tests: reading turn streams, and a local chat-completions server that speaks the
real streaming wire format (HTTP/1.1, chunked, server-sent events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from agentsessions import AsyncStream, TurnEvent
from agentsessions.v1 import events_pb2


def message_text(message: Any) -> str:
    """The text parts of a message (a stored one, or one a turn event carries), joined."""
    return "".join(p.text.text for p in message.parts if p.WhichOneof("kind") == "text")


def kinds(events: list[TurnEvent]) -> list[str]:
    return [e.WhichOneof("kind") or "" for e in events]


def text_of(events: list[TurnEvent], kind: str = "text_delta") -> str:
    return "".join(getattr(e, kind).text for e in events if e.WhichOneof("kind") == kind)


def only(events: list[TurnEvent], kind: str) -> Any:
    found = [getattr(e, kind) for e in events if e.WhichOneof("kind") == kind]
    assert len(found) == 1, (kind, kinds(events))
    return found[0]


def reason(events: list[TurnEvent]) -> int:
    assert events and events[-1].WhichOneof("kind") == "turn_finished", kinds(events)
    return int(events[-1].turn_finished.reason)


class Reader:
    """Reads a stream a piece at a time: up to an event that matches, then the rest."""

    def __init__(self, stream: AsyncStream[Any]) -> None:
        self.stream = stream
        self.items: AsyncIterator[Any] = stream.__aiter__()
        self.seen: list[Any] = []

    async def until(self, match: Callable[[Any], bool]) -> list[Any]:
        got = []
        async for item in self.items:
            got.append(item)
            self.seen.append(item)
            if match(item):
                return got
        raise AssertionError(f"the stream ended before the awaited item; saw {got}")

    async def until_kind(self, kind: str) -> list[Any]:
        return await self.until(lambda e: e.WhichOneof("kind") == kind)

    async def rest(self) -> list[Any]:
        got = [item async for item in self.items]
        self.seen += got
        return got


STOP = events_pb2.FINISH_REASON_STOP
CLIENT_TOOL_CALLS = events_pb2.FINISH_REASON_CLIENT_TOOL_CALLS
CANCELLED = events_pb2.FINISH_REASON_CANCELLED
LENGTH = events_pb2.FINISH_REASON_LENGTH
ERROR = events_pb2.FINISH_REASON_ERROR


# --- a local OpenAI-compatible endpoint ------------------------------------------------------------------


def chunk(
    *,
    content: str | None = None,
    reasoning: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    role: str | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk`, as OpenAI and vLLM send it."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "test-model",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


@dataclass
class Reply:
    """What the endpoint answers to one request: an error status with a body, or a stream of chunks."""

    chunks: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    # A JSON body: an error's, or a whole completion from a server that ignores `stream: true`.
    body: dict[str, Any] | None = None
    done: bool = True  # end with `data: [DONE]`
    # The stream's bytes as they are, each one TCP write (framing, comments, split events), for `chunks`.
    raw: list[bytes] | None = None
    drop: bool = False  # close the connection after the events, without the end of the chunked body
    interval: float = 0  # seconds between two writes


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class ChatCompletionsServer:
    """A local HTTP/1.1 server for POST /v1/chat/completions with stream=true. Answers each request with
    the next scripted Reply: the status line and headers, then each chunk as one `data: {...}` event in
    chunked transfer encoding, then `data: [DONE]`."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.received: list[Received] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> ChatCompletionsServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.received.append(Received(method, path, headers, json.loads(body or b"{}")))
                reply = self.replies.pop(0) if self.replies else Reply(status=500, body={"error": "no reply"})
                await self._answer(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        if reply.status != 200 or reply.body is not None:
            payload = json.dumps(reply.body or {}).encode()
            writer.write(
                f"HTTP/1.1 {reply.status} Error\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        events = [f"data: {json.dumps(c)}\n\n".encode() for c in reply.chunks]
        if reply.raw is not None:
            events = list(reply.raw)
        elif reply.done:
            events.append(b"data: [DONE]\n\n")
        for event in events:
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
            if reply.interval:
                await asyncio.sleep(reply.interval)
        if reply.drop:
            writer.transport.abort()
            return
        writer.write(b"0\r\n\r\n")
        await writer.drain()
