"""`sessiond admin`: the operator's commands against a running server, as a shell would run them."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

from agentsessions import AsyncSessionsClient
from agentsessions.v1 import session_pb2
from sessiond import admin
from sessiond.cli import build_parser
from sessiond.server import RunningServer


async def sessiond_admin(server: RunningServer, *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    """Runs `sessiond admin --target SERVER ARGV` (on a thread: the command blocks); exit status, the JSON
    lines it printed, and what it wrote on stderr."""
    args = build_parser().parse_args(["admin", "--target", f"127.0.0.1:{server.port}", *argv])
    out, err = io.StringIO(), io.StringIO()
    status = await asyncio.to_thread(admin.run, args, out, err)
    return status, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


async def test_admin_lists_filters_and_shows_sessions_and_their_messages(
    server: RunningServer, client: AsyncSessionsClient, unique: str
) -> None:
    for name, team in (("a", "red"), ("b", "blue"), ("c", "red")):
        await client.create_session(
            agent_id="echo", session_id=f"{unique}/{name}", user_id=unique, metadata={"team": team}
        )
    for text in ("first", "second", "third"):
        await client.append_text(session_id=f"{unique}/a", role="user", text=text)

    status, listed, _ = await sessiond_admin(server, "sessions", "--user", unique, "--label", "team=red")
    assert status == 0
    assert [s["session_id"] for s in listed] == [f"{unique}/c", f"{unique}/a"]  # newest first
    status, limited, _ = await sessiond_admin(server, "sessions", "--user", unique, "--limit", "2")
    assert [s["session_id"] for s in limited] == [f"{unique}/c", f"{unique}/b"]

    status, (shown,), _ = await sessiond_admin(server, "show", f"{unique}/a")
    assert (shown["status"], shown["message_count"], shown["metadata"]) == (
        "SESSION_STATUS_ACTIVE",
        "3",
        {"team": "red"},
    )
    status, newest, _ = await sessiond_admin(server, "messages", f"{unique}/a", "--last", "2")
    assert [m["parts"][0]["text"]["text"] for m in newest] == ["second", "third"]
    status, every, _ = await sessiond_admin(server, "messages", f"{unique}/a")
    assert [m["sequence"] for m in every] == ["1", "2", "3"]


async def test_admin_changes_sessions_and_reports_errors(
    server: RunningServer, client: AsyncSessionsClient, unique: str
) -> None:
    sid = f"{unique}/managed"
    await client.create_session(agent_id="echo", session_id=sid)

    status, (ended,), _ = await sessiond_admin(server, "end", sid)
    assert (status, ended["status"]) == (0, "SESSION_STATUS_ENDED")
    assert (await client.get_session(session_id=sid)).status == session_pb2.SESSION_STATUS_ENDED

    status, printed, err = await sessiond_admin(server, "renew", sid)
    assert (status, printed) == (1, [])
    assert err.startswith("FAILED_PRECONDITION SESSION_ENDED:")

    status, printed, _ = await sessiond_admin(server, "delete", sid)
    assert (status, printed) == (0, [])
    status, _, err = await sessiond_admin(server, "show", sid)
    assert status == 1 and err.startswith("NOT_FOUND SESSION_NOT_FOUND:")

    status, _, err = await sessiond_admin(server, "sessions", "--label", "no-equals-sign")
    assert status == 2 and "KEY=VALUE" in err


async def test_admin_stats_and_agents(
    server: RunningServer, client: AsyncSessionsClient, unique: str
) -> None:
    await client.create_session(agent_id="echo", session_id=f"{unique}/counted")
    status, (stats,), _ = await sessiond_admin(server, "stats")
    expected = await client.get_server_stats()
    assert status == 0
    assert stats["database"] == expected.database
    assert int(stats["active_sessions"]) == expected.active_sessions >= 1
    assert stats["running_turns"] == "0"  # printed, not left out for being zero (int64: a JSON string)
    status, agents, _ = await sessiond_admin(server, "agents")
    assert "echo" in [a["agent_id"] for a in agents]


async def test_admin_against_no_server_fails_cleanly() -> None:
    args = build_parser().parse_args(["admin", "--target", "127.0.0.1:1", "--timeout", "2", "stats"])
    out, err = io.StringIO(), io.StringIO()
    assert await asyncio.to_thread(admin.run, args, out, err) == 1
    assert out.getvalue() == "" and err.getvalue().startswith("UNAVAILABLE: ")  # no reason: no "None"
