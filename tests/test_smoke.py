"""The server starts, answers health and reflection, and keeps a session."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentsessions import AsyncSessionsClient, SessionStatus


async def test_health_serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        named = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="agentsessions.v1.SessionService")
        )
        assert named.status == health_pb2.HealthCheckResponse.SERVING


async def test_create_then_get(client: AsyncSessionsClient, unique: str) -> None:
    created = await client.create_session(agent_id="echo", session_id=f"{unique}/c1", user_id="u1")
    got = await client.get_session(session_id=f"{unique}/c1")
    assert got.session_id == created.session_id == f"{unique}/c1"
    assert got.status == SessionStatus.SESSION_STATUS_ACTIVE
    assert got.user_id == "u1"
