"""The built-in `echo` agent: deterministic, streamed word by word, with commands that reach every path of
a turn, so that each can be tried by hand (grpcurl) and tested.

What it answers to the text of the user message:

- any text: the same text, one word (with its trailing space) per delta; finishes with STOP.
- `/think TEXT`: TEXT as reasoning deltas, then TEXT as text.
- `/tool NAME [JSON]`: a client tool request, a call of NAME with JSON as arguments (default `{}`); the
  turn pauses (CLIENT_TOOL_CALLS). Several `/tool` lines ask for several calls; other lines are echoed.
- `/length TEXT`: TEXT, then finishes with LENGTH, as a model that hit its output limit.
- `/fail TEXT`: TEXT, then an error event (reason AGENT_FAILED, not retryable).
- `/hang TEXT`: TEXT, then waits until the turn is stopped (to try StopTurn, interrupt, disconnect).

A continue answers `NAME returned OUTPUT` for each tool result; a trigger answers
`trigger NAME INPUT-AS-JSON`. Every answer ends with a usage event counting words.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator

from google.protobuf import json_format

from agentsessions.v1 import agent_service_pb2, events_pb2, message_pb2

Response = agent_service_pb2.RespondResponse
_WORDS = re.compile(r"\s*\S+\s*")
PAUSE_EVERY = 16


def _text_of(message: message_pb2.Message) -> str:
    return "\n".join(p.text.text for p in message.parts if p.WhichOneof("kind") == "text")


def _words(text: str) -> list[str]:
    return _WORDS.findall(text) or [text]


class EchoBackend:
    uses_history = False

    def __init__(self, *, word_delay_ms: int = 0) -> None:
        self.delay = word_delay_ms / 1000

    async def respond(self, request: agent_service_pb2.RespondRequest) -> AsyncGenerator[Response, None]:
        kind = request.WhichOneof("input")
        reasoning = ""
        calls: list[message_pb2.ToolCallPart] = []
        reason = events_pb2.FINISH_REASON_STOP
        then = ""
        if kind == "continue_turn":
            text = "\n".join(
                f"{r.name or r.call_id} returned {r.output}" for r in request.continue_turn.tool_results
            )
        elif kind == "trigger":
            payload = json_format.MessageToDict(request.trigger.input)
            text = f"trigger {request.trigger.name} {json.dumps(payload, sort_keys=True)}"
        else:
            text = _text_of(request.message)
            command, _, rest = text.partition(" ")
            if command == "/think":
                reasoning = text = rest
            elif command == "/length":
                text, reason = rest, events_pb2.FINISH_REASON_LENGTH
            elif command in ("/fail", "/hang"):
                text, then = rest, command
            elif any(line.startswith("/tool ") for line in text.splitlines()):
                kept = []
                for line in text.splitlines():
                    name, _, arguments = line.removeprefix("/tool ").strip().partition(" ")
                    if not line.startswith("/tool ") or not name:
                        kept.append(line)
                        continue
                    calls.append(
                        message_pb2.ToolCallPart(
                            call_id=f"call-{request.turn_id}-{len(calls) + 1}",
                            name=name,
                            arguments=arguments.strip() or "{}",
                            client_side=True,
                        )
                    )
                text = "\n".join(kept)
        out_words = 0
        if reasoning:
            for i, word in enumerate(_words(reasoning)):
                response = Response()
                response.reasoning_delta.text = word
                yield response
                await self._pause(i)
        if text or not calls:
            for i, word in enumerate(_words(text or "(no text)")):
                out_words += 1
                response = Response()
                response.text_delta.text = word
                yield response
                await self._pause(i)
        in_words = sum(len(_text_of(m).split()) for m in request.history)
        yield Response(
            usage=events_pb2.Usage(
                input_tokens=in_words, output_tokens=out_words, total_tokens=in_words + out_words
            )
        )
        if then == "/fail":
            yield Response(
                error=events_pb2.TurnError(
                    reason="AGENT_FAILED", message="the echo agent was asked to fail", retryable=False
                )
            )
            return
        if then == "/hang":
            await asyncio.Event().wait()  # until the turn is stopped
        if calls:
            yield Response(client_tool_request=events_pb2.ClientToolRequest(calls=calls))
            reason = events_pb2.FINISH_REASON_CLIENT_TOOL_CALLS
        yield Response(finished=events_pb2.TurnFinished(reason=reason))

    async def _pause(self, i: int) -> None:
        # Without a delay, still let the event loop run every few words: the answer streams out while it
        # is produced, and a stop lands mid-answer.
        if self.delay:
            await asyncio.sleep(self.delay)
        elif i % PAUSE_EVERY == PAUSE_EVERY - 1:
            await asyncio.sleep(0)
