"""Agents: who runs a session's turns, and the agent tier of the timeout policy."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .errors import PermissionDenied
from .model import row_etag
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
        return row_etag(self.version, self.agent_id, self.create_time.timestamp())


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


def key_variable_refused(backend: Mapping[str, Any], allowed: frozenset[str]) -> str | None:
    """The environment variable an agent's backend would read its API key from, when the server does not
    let agents created through the API name it (`SESSIOND_AGENT_KEY_VARS`); None when it may, or names
    none. Without this, anyone allowed to create an agent could send any of the server's variables (a
    database password) to an endpoint of their choosing."""
    name = str(backend.get("api_key_env", "") or "")
    return name if name and name not in allowed else None


def key_variable_denied(agent_id: str, name: str) -> PermissionDenied:
    return PermissionDenied(
        f"agent {agent_id!r} may not read its API key from {name}: agents created through the API may only "
        "name the variables the server's operator lists in SESSIOND_AGENT_KEY_VARS",
        reason="API_KEY_VARIABLE_NOT_ALLOWED",
        metadata={"agent_id": agent_id, "api_key_env": name},
    )
