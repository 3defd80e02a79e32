"""The `remote` backend: an agent service that implements agentsessions.v1.AgentService.Respond.

The stream is relayed as it comes. Failures to get an answer become AgentFailure (AGENT_UNAVAILABLE):
retryable for what a retry can fix (the agent is down, overloaded or too slow), not for an agent that
rejected the request or failed in its own code.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc

from agentsessions.v1 import agent_service_pb2, agent_service_pb2_grpc

from .backends import AgentFailure

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
        self, channel: grpc.aio.Channel, *, agent_id: str, target: str, timeout_seconds: int
    ) -> None:
        self.stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        self.agent_id = agent_id
        self.target = target
        self.timeout = timeout_seconds or None

    async def respond(
        self, request: agent_service_pb2.RespondRequest
    ) -> AsyncGenerator[agent_service_pb2.RespondResponse, None]:
        call = self.stub.Respond(request, timeout=self.timeout)
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
            raise AgentFailure(
                f"agent {self.agent_id!r} at {self.target} failed: {code.name}: {err.details() or ''}".rstrip(
                    ": "
                ),
                retryable=code in RETRYABLE_CODES,
            ) from err
        finally:
            call.cancel()  # the turn stopped, or the answer is complete: end the call either way
