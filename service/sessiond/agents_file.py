"""Agents declared in the server's config file (`sessiond serve --config FILE`, or SESSIOND_CONFIG).

The file is TOML. Each `[[agents]]` table is an agentsessions.v1.Agent in its proto field names, with the
id as `id`, and exactly one backend table::

    [[agents]]
    id = "support"
    display_name = "Support assistant"
    history_window = 40                  # recent messages sent with each turn (0: the server default)

    [agents.timeout_defaults]            # the agent tier of the timeout policy (any subset)
    timeout_minutes = 60

    [agents.openai_chat]
    base_url = "http://127.0.0.1:11434/v1"
    model = "llama3.2"
    api_key_env = "OLLAMA_API_KEY"       # the name of the variable, never the key
    system_prompt = "You are a helpful support assistant."

The agents are validated like CreateAgent requests and upserted at start with origin CONFIG: a new one is
created, a changed one updated. Agents that are no longer in the file stay (sessions may use them) and
can be deleted through the agent RPCs. A file that does not validate stops the server from starting.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from agentsessions.v1 import agent_pb2

from .api import convert
from .domain.agents import ECHO_AGENT_ID, Agent, AgentOrigin
from .domain.errors import DomainError
from .domain.policy import TimeoutLimits
from .domain.validation import Limits, check_agent_id
from .store.repository import Store


class ConfigError(ValueError):
    """The config file is unreadable or declares an invalid agent."""


def load_agents(path: str | Path, *, now: datetime, timeouts: TimeoutLimits, limits: Limits) -> list[Agent]:
    """The agents the file declares, validated, with origin CONFIG."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from exc
    unknown = sorted(set(data) - {"agents"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; the file declares [[agents]]")
    entries = data.get("agents", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: `agents` must be an array of tables ([[agents]])")
    agents: list[Agent] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{path}: agents[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table ([[agents]] with its keys), got {entry!r}")
        fields: dict[str, Any] = dict(entry)
        ids = [fields.pop(key) for key in ("id", "agent_id") if key in fields]
        if len(ids) > 1:
            raise ConfigError(f"{where}: give the agent's id once, as `id` or as `agent_id`")
        if ids and not isinstance(ids[0], str):
            raise ConfigError(f"{where}: the id must be a string (quoted in TOML), got {ids[0]!r}")
        agent_id = ids[0] if ids else ""
        where = f"{where} ({agent_id!r})" if agent_id else where
        try:
            pb = json_format.ParseDict(fields, agent_pb2.Agent())
            check_agent_id(agent_id, limits, "id")
            agent = convert.agent_from_pb(pb, agent_id, now)
            timeouts.validate(agent.timeout_defaults, "timeout_defaults")
        except json_format.ParseError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        except DomainError as exc:
            raise ConfigError(f"{where}: {exc.message}") from exc
        if agent_id == ECHO_AGENT_ID:
            raise ConfigError(f"{where}: {ECHO_AGENT_ID!r} is the built-in agent; choose another id")
        if agent_id in seen:
            raise ConfigError(f"{where}: the id is declared twice")
        seen.add(agent_id)
        agents.append(replace(agent, origin=AgentOrigin.CONFIG))
    return agents


async def apply_agents(store: Store, agents: list[Agent], *, now: datetime) -> None:
    """Creates the agents that do not exist and updates those that differ from the file."""
    for agent in agents:
        stored = await store.ensure_agent(agent)
        if _declared(stored) == _declared(agent):
            continue

        def change(current: Agent, agent: Agent = agent) -> Agent:
            return replace(
                current,
                display_name=agent.display_name,
                backend=agent.backend,
                timeout_defaults=agent.timeout_defaults,
                history_window=agent.history_window,
                origin=AgentOrigin.CONFIG,
                update_time=now,
                version=current.version + 1,
            )

        await store.update_agent(agent.agent_id, change)


def _declared(agent: Agent) -> tuple[Any, ...]:
    return (agent.display_name, agent.backend, agent.timeout_defaults, agent.history_window, agent.origin)
