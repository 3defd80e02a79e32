"""Python client of Agent Sessions (``sessiond``): typed async and sync clients over the v1 gRPC API.

::

    from agentsessions import AsyncSessionsClient, errors

    async with AsyncSessionsClient("127.0.0.1:50051") as client:
        session = await client.create_session(agent_id="echo", user_id="user-42")
        async for event in client.execute(session_id=session.session_id, text="hello"):
            if event.HasField("text_delta"):
                print(event.text_delta.text, end="")

The generated messages and stubs live in ``agentsessions.v1``; the common ones are re-exported here.
:mod:`agentsessions.agent` turns an async function into a remote agent (``AgentService``) in a few lines.
"""

from agentsessions import errors
from agentsessions._batching import AppendBatching
from agentsessions.client import DEFAULT_TARGET, AsyncSessionsClient, SessionsClient
from agentsessions.errors import AgentSessionsError
from agentsessions.pagers import AsyncPager, Pager
from agentsessions.retry import DEFAULT_RETRY, RetryPolicy
from agentsessions.streams import AsyncConnection, AsyncStream, Connection, Stream
from agentsessions.v1.admin_service_pb2 import ServerStats
from agentsessions.v1.agent_pb2 import Agent, AgentOrigin, EchoBackend, OpenAIChatBackend, RemoteBackend
from agentsessions.v1.events_pb2 import FinishReason, SessionEvent, TurnEvent
from agentsessions.v1.message_pb2 import (
    DataPart,
    FilePart,
    Message,
    MessageOrder,
    MessageStatus,
    MessageView,
    Part,
    ReasoningPart,
    Role,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from agentsessions.v1.session_pb2 import (
    EffectiveTimeoutPolicy,
    PolicySource,
    Session,
    SessionStatus,
    TimeoutPolicy,
)
from agentsessions.v1.turn_service_pb2 import (
    ConnectResponse,
    ContinueTurn,
    DisconnectBehavior,
    MultitaskStrategy,
    Trigger,
)

# The distribution's version (clients/python/pyproject.toml); the API it speaks is agentsessions.v1.
__version__ = "1.1.0"

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_TARGET",
    "Agent",
    "AgentOrigin",
    "AgentSessionsError",
    "AppendBatching",
    "AsyncConnection",
    "AsyncPager",
    "AsyncSessionsClient",
    "AsyncStream",
    "ConnectResponse",
    "Connection",
    "ContinueTurn",
    "DataPart",
    "DisconnectBehavior",
    "EchoBackend",
    "EffectiveTimeoutPolicy",
    "FilePart",
    "FinishReason",
    "Message",
    "MessageOrder",
    "MessageStatus",
    "MessageView",
    "MultitaskStrategy",
    "OpenAIChatBackend",
    "Pager",
    "Part",
    "PolicySource",
    "ReasoningPart",
    "RemoteBackend",
    "RetryPolicy",
    "Role",
    "ServerStats",
    "Session",
    "SessionEvent",
    "SessionStatus",
    "SessionsClient",
    "Stream",
    "TextPart",
    "TimeoutPolicy",
    "ToolCallPart",
    "ToolResultPart",
    "Trigger",
    "TurnEvent",
    "__version__",
    "errors",
]
