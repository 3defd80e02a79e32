"""Agent backends: one interface, three kinds (`echo`, `remote`, `openai_chat`).

A backend turns a `RespondRequest` (the session, the history window, the turn's input) into a stream of
`RespondResponse` events: text and reasoning deltas, tool calls, a client tool request, usage, and how
the answer finished. The turn runner relays them and stores the answer; a backend stores nothing.

A backend that cannot answer raises `AgentFailure`; the runner turns it into a TurnError event. Stopping
a turn cancels the task iterating the backend's stream, so a backend releases what it holds (an RPC, an
HTTP response) in `finally` blocks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from agentsessions.v1 import agent_service_pb2

from ..domain.agents import Agent, AgentOrigin, key_variable_refused
from ..domain.errors import FailedPrecondition
from ..tracing import NO_TRACER

if TYPE_CHECKING:
    import httpx

    from ..tracing import Tracing

log = logging.getLogger(__name__)

#: ErrorInfo / TurnError reason of a backend that could not answer.
AGENT_UNAVAILABLE = "AGENT_UNAVAILABLE"


class AgentFailure(Exception):
    """The agent could not answer. `retryable` says whether running the turn again may succeed."""

    def __init__(self, message: str, *, retryable: bool, reason: str = AGENT_UNAVAILABLE) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retryable = retryable
        # A remote agent's status code, for the call's span; UNKNOWN for what the agent sent that was wrong.
        self.code = grpc.StatusCode.UNKNOWN


class AgentBackend(Protocol):
    # Whether the agent reads the history window (the runner skips reading it for one that does not).
    uses_history: bool

    def respond(
        self, request: agent_service_pb2.RespondRequest
    ) -> AsyncGenerator[agent_service_pb2.RespondResponse, None]:
        """The agent's answer to one turn, as a stream of events."""
        ...


class Backends:
    """Builds the backend of an agent from its settings. Connections are pooled per process and shared by
    the agents that use them: one gRPC channel per remote target, one HTTP client for every
    chat-completions endpoint. Nothing connects until the first turn that needs it."""

    def __init__(
        self,
        *,
        http_timeout_seconds: float = 300.0,
        allowed_key_vars: frozenset[str] = frozenset(),
        tracing: Tracing | None = None,
    ) -> None:
        self.http_timeout_seconds = http_timeout_seconds
        self.allowed_key_vars = allowed_key_vars
        self.tracing = tracing
        self._channels: dict[tuple[str, bool], grpc.aio.Channel] = {}
        self._http: httpx.AsyncClient | None = None
        self._completion_tokens: set[tuple[str, str]] = set()  # see OpenAIChatBackend.completion_tokens

    def for_agent(self, agent: Agent) -> AgentBackend:
        settings: dict[str, Any] = agent.backend
        kind = settings.get("kind")
        if kind == "echo":
            from .echo import EchoBackend

            return EchoBackend(word_delay_ms=int(settings.get("word_delay_ms", 0)))
        if kind == "remote":
            from .remote import RemoteBackend

            target, tls = str(settings["target"]), bool(settings.get("tls", False))
            return RemoteBackend(
                self._channel(target, tls),
                agent_id=agent.agent_id,
                target=target,
                timeout_seconds=int(settings.get("timeout_seconds", 0)),
                tracer=self.tracing.tracer if self.tracing is not None else NO_TRACER,
            )
        if kind == "openai_chat":
            from .openai_chat import OpenAIChatBackend

            # Checked again per turn: an agent stored before the rule, or before the operator narrowed the
            # list, must not read a variable the list no longer names. Declared agents are the operator's.
            refused = None
            if agent.origin == AgentOrigin.API:
                refused = key_variable_refused(settings, self.allowed_key_vars)
            return OpenAIChatBackend(
                self._http_client(),
                agent_id=agent.agent_id,
                settings=settings,
                key_refused=refused,
                completion_tokens=self._completion_tokens,
            )
        raise FailedPrecondition(
            f"agent {agent.agent_id!r} has an unknown backend {kind!r}",
            reason="AGENT_BACKEND_UNKNOWN",
            metadata={"agent_id": agent.agent_id},
        )

    def _channel(self, target: str, tls: bool) -> grpc.aio.Channel:
        channel = self._channels.get((target, tls))
        if channel is None:
            if tls:
                channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
            else:
                channel = grpc.aio.insecure_channel(target)
            self._channels[(target, tls)] = channel
        return channel

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.http_timeout_seconds, connect=10.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            )
            if self.tracing is not None:
                self.tracing.instrument_http(self._http)
        return self._http

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
