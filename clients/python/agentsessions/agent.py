"""Write a remote agent for Agent Sessions in a few lines.

sessiond calls ``agentsessions.v1.AgentService.Respond`` once per turn (and once per continue) with the
session, the recent history (oldest first, the new user message last) and the turn's input, and relays
the streamed answer to the caller of Execute. This module turns an async generator function into that
service::

    from agentsessions.agent import run_agent, text_of

    async def shout(request):
        for word in text_of(request.message).split():
            yield word.upper() + " "

    run_agent(shout, port=7000)   # then declare an agent with backend remote, target 127.0.0.1:7000

The function receives the :class:`RespondRequest` and yields, in any mix:

- ``str``: a piece of the answer's text (a text delta);
- ``ReasoningDelta``, ``ToolCallEvent`` (a tool the agent ran itself, with its result), ``Usage``;
- ``ClientToolRequest`` (see :func:`client_tool`): tools the caller of Execute must run; the turn
  pauses, and the next Respond call carries ``continue_turn`` with their results;
- ``TurnFinished`` (e.g. ``FINISH_REASON_LENGTH``) and ``TurnError``, to end the answer otherwise than
  with a plain stop;
- or a whole ``RespondResponse``.

An exception raised by the function fails the call (INTERNAL, with the exception's text); sessiond keeps
what was streamed so far as an ERROR message. When the turn is stopped, sessiond cancels the call, and the
function gets ``asyncio.CancelledError`` at its next ``await`` or ``yield``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from agentsessions.v1 import agent_service_pb2, agent_service_pb2_grpc, events_pb2, message_pb2

__all__ = [
    "AgentFunction",
    "AgentOutput",
    "AgentServer",
    "client_tool",
    "run_agent",
    "serve_agent",
    "text_of",
]

log = logging.getLogger(__name__)

RespondRequest = agent_service_pb2.RespondRequest
RespondResponse = agent_service_pb2.RespondResponse

#: What an agent function may yield.
AgentOutput = (
    str
    | RespondResponse
    | events_pb2.TextDelta
    | events_pb2.ReasoningDelta
    | events_pb2.ToolCallEvent
    | events_pb2.ClientToolRequest
    | events_pb2.Usage
    | events_pb2.TurnFinished
    | events_pb2.TurnError
)
#: An agent: called once per turn with the request, yields the answer.
AgentFunction = Callable[[RespondRequest], AsyncIterator[AgentOutput]]

_FIELDS: dict[type, str] = {
    events_pb2.TextDelta: "text_delta",
    events_pb2.ReasoningDelta: "reasoning_delta",
    events_pb2.ToolCallEvent: "tool_call",
    events_pb2.ClientToolRequest: "client_tool_request",
    events_pb2.Usage: "usage",
    events_pb2.TurnFinished: "finished",
    events_pb2.TurnError: "error",
}


def text_of(message: message_pb2.Message) -> str:
    """The text parts of a message, joined by newlines."""
    return "\n".join(p.text.text for p in message.parts if p.WhichOneof("kind") == "text")


def client_tool(
    name: str, arguments: str | Mapping[str, Any] = "{}", *, call_id: str = ""
) -> events_pb2.ClientToolRequest:
    """A request that the caller of Execute run tool ``name`` (arguments: JSON text or a mapping).

    ``call_id`` (generated when empty) is held to the rule for callers' ids: at most 128 characters (the
    server's ``max_message_id_length``), no control characters. A call that breaks it ends the turn with
    ``AGENT_UNAVAILABLE``, the text streamed before it kept."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    call = message_pb2.ToolCallPart(
        call_id=call_id or f"call-{uuid.uuid4().hex}", name=name, arguments=args, client_side=True
    )
    return events_pb2.ClientToolRequest(calls=[call])


def _response(item: AgentOutput) -> RespondResponse:
    if isinstance(item, str):
        return RespondResponse(text_delta=events_pb2.TextDelta(text=item))
    if isinstance(item, RespondResponse):
        return item
    field = _FIELDS.get(type(item))
    if field is None:
        raise TypeError(f"an agent function cannot yield {type(item).__name__}")
    response = RespondResponse()
    getattr(response, field).CopyFrom(item)
    return response


class _AgentServicer(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(self, fn: AgentFunction) -> None:
        self.fn = fn

    async def Respond(
        self, request: RespondRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[RespondResponse]:
        try:
            async for item in self.fn(request):
                yield _response(item)
        except Exception as exc:
            log.exception("the agent failed on turn %s", request.turn_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"the agent failed: {exc}")


class AgentServer:
    """A running agent server. ``target`` is what the agent's ``remote.target`` should say."""

    def __init__(self, server: grpc.aio.Server, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Stops serving; calls still running get ``grace`` seconds to finish (None: cancelled now)."""
        await self.server.stop(grace)

    async def wait(self) -> None:
        """Returns when the server stopped."""
        await self.server.wait_for_termination()

    async def __aenter__(self) -> AgentServer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop(None)


async def serve_agent(fn: AgentFunction, *, port: int = 0, host: str = "127.0.0.1") -> AgentServer:
    """Starts serving ``fn`` as an AgentService on ``host:port`` (port 0: a free one, see ``.port``)."""
    server = grpc.aio.server()
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(_AgentServicer(fn), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot listen on {host}:{port}")
    await server.start()
    return AgentServer(server, host, bound)


def run_agent(fn: AgentFunction, *, port: int = 7000, host: str = "127.0.0.1", grace: float = 5.0) -> None:
    """Serves ``fn`` until SIGINT or SIGTERM, then drains for ``grace`` seconds. Blocks."""

    async def main() -> None:
        agent = await serve_agent(fn, port=port, host=host)
        log.info("agent listening on %s", agent.target)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await agent.stop(grace)

    asyncio.run(main())
