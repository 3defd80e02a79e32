"""Agents: who runs a session's turns, and the agent tier of the timeout policy."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .policy import TimeoutPolicy

ECHO_AGENT_ID = "echo"
BACKEND_KINDS = ("echo", "remote", "openai_chat")


class AgentOrigin(enum.IntEnum):
    """Values match agentsessions.v1.AgentOrigin."""

    BUILT_IN = 1
    CONFIG = 2
    API = 3


@dataclass(frozen=True)
class Agent:
    agent_id: str
    display_name: str
    backend: dict[str, Any]  # {"kind": one of BACKEND_KINDS, ...that backend's settings}
    timeout_defaults: TimeoutPolicy
    history_window: int
    origin: AgentOrigin
    create_time: datetime
    update_time: datetime
    version: int = 1

    @property
    def etag(self) -> str:
        return f"v{self.version}"


def builtin_echo(now: datetime) -> Agent:
    return Agent(
        agent_id=ECHO_AGENT_ID,
        display_name="Echo (built in)",
        backend={"kind": "echo", "word_delay_ms": 0},
        timeout_defaults=TimeoutPolicy(),
        history_window=0,
        origin=AgentOrigin.BUILT_IN,
        create_time=now,
        update_time=now,
    )
