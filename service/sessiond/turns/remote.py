"""The `remote` backend: an agent service that implements agentsessions.v1.AgentService.Respond.

The stream is relayed as it comes. Failures to get an answer become AgentFailure (AGENT_UNAVAILABLE):
retryable for what a retry can fix (the agent is down, overloaded or too slow), not for an agent that
rejected the request or failed in its own code.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc
from opentelemetry import propagate, trace

from agentsessions.v1 import agent_service_pb2, agent_service_pb2_grpc

from ..tracing import NO_TRACER
from .backends import AgentFailure

_RESPOND = "/agentsessions.v1.AgentService/Respond"


def _span_attributes(target: str) -> dict[str, str | int]:
    """The client span's attributes, as the OpenTelemetry semantic conventions for gRPC name them."""
    host, _, port = target.rpartition(":")
    attributes: dict[str, str | int] = {
        "rpc.system": "grpc",
        "rpc.service": "agentsessions.v1.AgentService",
        "rpc.method": "Respond",
        "server.address": host or target,
    }
    if port.isdigit():
        attributes["server.port"] = int(port)
    return attributes


RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class RemoteBackend:
    uses_history = True

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        agent_id: str,
        target: str,
        timeout_seconds: int,
        tracer: trace.Tracer = NO_TRACER,
    ) -> None:
        self.stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        self.agent_id = agent_id
        self.target = target
        self.timeout = timeout_seconds or None
        self.tracer = tracer

    async def respond(
        self, request: agent_service_pb2.RespondRequest
    ) -> AsyncGenerator[agent_service_pb2.RespondResponse, None]:
        # The client span is ours, not opentelemetry-instrumentation-grpc's: its stream wrapper ends the
        # span only when the stream is read to its end, and a turn stops reading at `finished` (or when
        # stopped), which left the span open.
        with self.tracer.start_as_current_span(
            _RESPOND, kind=trace.SpanKind.CLIENT, attributes=_span_attributes(self.target)
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)  # the trace, on to the agent (nothing when tracing is off)
            code = grpc.StatusCode.OK
            try:
                async for response in self._relay(request, list(carrier.items())):
                    yield response
            except AgentFailure as failure:
                code = failure.code
                raise
            finally:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code is not grpc.StatusCode.OK:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))

    async def _relay(
        self, request: agent_service_pb2.RespondRequest, metadata: list[tuple[str, str]]
    ) -> AsyncGenerator[agent_service_pb2.RespondResponse, None]:
        call = self.stub.Respond(request, timeout=self.timeout, metadata=metadata or None)
        try:
            async for response in call:
                if response is None:  # what grpc.aio gives for a frame it could not decode
                    raise AgentFailure(
                        f"agent {self.agent_id!r} at {self.target} sent a frame that does not decode",
                        retryable=False,
                    )
                yield response
        except grpc.aio.AioRpcError as err:
            code = err.code()
            failure = AgentFailure(
                f"agent {self.agent_id!r} at {self.target} failed: {code.name}: {err.details() or ''}".rstrip(
                    ": "
                ),
                retryable=code in RETRYABLE_CODES,
            )
            failure.code = code
            raise failure from err
        finally:
            call.cancel()  # the turn stopped, or the answer is complete: end the call either way
