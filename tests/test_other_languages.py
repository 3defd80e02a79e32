"""The contract from outside Python: a Node.js client (@grpc/grpc-js + @grpc/proto-loader, nothing generated)
built from the .proto files and from the published descriptor set, and an operator driving the server with
`buf curl` through reflection alone.

Both need Node.js and npm; they are skipped, saying why, only when those are missing. The packages come
from clients/node/package-lock.json, installed here when missing (as `make node` does), so a fresh clone
runs them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from google.rpc import error_details_pb2

from agentsessions import AsyncSessionsClient

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "clients" / "node"
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """clients/node with its locked packages installed (again when the lock file is newer)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if path is None)
        pytest.skip(f"{missing} not on PATH: the Node.js client and buf curl tests need Node.js 18+ with npm")
    stamp = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            # Not `npm ci`: see the Makefile's node target for why.
            [npm, "install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
        )
    return NODE_DIR


@pytest.fixture(scope="session")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The descriptor set `make descriptor` publishes, built by the same script."""
    out = tmp_path_factory.mktemp("descriptor") / "agentsessions.v1.binpb"
    subprocess.run(["bash", str(ROOT / ".ci" / "descriptor"), str(out)], check=True, timeout=120)
    return out


async def _run(*args: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    # The server under test runs in this event loop: the child must be awaited, never waited on.
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- Node.js -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["proto", "descriptor_set"])
async def test_node_client_creates_appends_and_lists(
    node_modules: Path,
    descriptor_set: Path,
    target: str,
    client: AsyncSessionsClient,
    unique: str,
    source: str,
) -> None:
    session_id = f"{unique}/node-{source}"
    contract = (
        ["--descriptor-set", str(descriptor_set)]
        if source == "descriptor_set"
        else ["--proto-root", str(ROOT / "proto")]
    )
    code, out, err = await _run(
        "node", str(node_modules / "sessions.js"), "--target", target, "--session-id", session_id, *contract
    )
    assert code == 0, err
    seen = json.loads(out)

    assert seen["session"] == {
        "session_id": session_id,
        "agent_id": "echo",
        "status": "SESSION_STATUS_ACTIVE",
        "metadata": {"client": "node"},
    }
    assert seen["appended"] == ["1", "2", "3", "4"]  # int64 as strings, as proto-loader maps them
    assert seen["message_count"] == "4"
    assert [(m["sequence"], m["role"], m["kinds"]) for m in seen["history"]] == [
        ("1", "ROLE_USER", ["text"]),
        ("2", "ROLE_ASSISTANT", ["tool_call"]),
        ("3", "ROLE_TOOL", ["tool_result"]),
        ("4", "ROLE_ASSISTANT", ["text"]),
    ]
    # Pages of two: the first is cut back to one message so the tool call goes with its result.
    assert seen["pages"] == 3
    assert seen["newest"] == ["4"]
    # The rich error model reaches Node: google.rpc.Status in the trailer, with its ErrorInfo.
    assert seen["missing"]["code"] == "NOT_FOUND"
    assert seen["missing"]["reason"] == "SESSION_NOT_FOUND"
    assert seen["missing"]["domain"] == "agentsessions.v1"
    assert seen["missing"]["metadata"] == {"session_id": f"{session_id}/missing"}

    # What Node wrote is what Python reads.
    stored = [m async for m in await client.list_messages(session_id=session_id)]
    assert [m.parts[0].WhichOneof("kind") for m in stored] == ["text", "tool_call", "tool_result", "text"]
    assert stored[1].parts[0].tool_call.arguments == '{"city":"Paris"}'
    assert stored[3].parts[0].text.text == "It is 21 °C in Paris."
    assert dict((await client.get_session(session_id=session_id)).metadata) == {"client": "node"}


# --- buf curl through reflection ----------------------------------------------------------------------


async def _buf_curl(target: str, *args: str, data: dict[str, Any] | None = None) -> tuple[int, Any]:
    """`buf curl` as an operator runs it: no proto files, the schema comes from server reflection."""
    command = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    code, out, err = await _run(*command, *args)
    text = out if code == 0 else err  # an error status is printed on stderr, as JSON
    if text.lstrip().startswith("{"):
        return code, json.loads(text)
    return code, text


async def test_buf_curl_lists_services_and_methods(node_modules: Path, target: str) -> None:
    code, services = await _buf_curl(target, "--list-services", f"http://{target}")
    assert code == 0, services
    assert set(services.split()) >= {
        "agentsessions.v1.SessionService",
        "agentsessions.v1.MessageService",
        "agentsessions.v1.TurnService",
        "agentsessions.v1.AgentRegistryService",
        "agentsessions.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    code, methods = await _buf_curl(target, "--list-methods", f"http://{target}")
    assert code == 0, methods
    assert "agentsessions.v1.SessionService/CreateSession" in methods.split()
    assert "agentsessions.v1.MessageService/ListMessages" in methods.split()


async def test_buf_curl_creates_a_session_and_reads_it_back(
    node_modules: Path, target: str, unique: str
) -> None:
    session_id = f"{unique}/ops-1"
    base = f"http://{target}/agentsessions.v1"
    code, created = await _buf_curl(
        target,
        f"{base}.SessionService/CreateSession",
        data={
            "session_id": session_id,
            "session": {
                "agent_id": "echo",
                "user_id": "operator",
                "metadata": {"channel": "cli"},
                "variables": {"plan": "pro"},
                "timeout_policy": {"timeout_minutes": 60},
            },
        },
    )
    assert code == 0, created
    assert created["sessionId"] == session_id
    assert created["status"] == "SESSION_STATUS_ACTIVE"
    assert created["effectiveTimeoutPolicy"]["timeoutMinutes"] == 60
    assert created["effectiveTimeoutPolicy"]["timeoutMinutesSource"] == "POLICY_SOURCE_SESSION"

    code, appended = await _buf_curl(
        target,
        f"{base}.MessageService/AppendMessages",
        data={
            "session_id": session_id,
            "messages": [
                {"role": "ROLE_USER", "parts": [{"text": {"text": "Hello!"}}]},
                {"role": "ROLE_ASSISTANT", "parts": [{"text": {"text": "Hi, how can I help?"}}]},
            ],
        },
    )
    assert code == 0, appended
    assert appended["session"]["messageCount"] == "2"

    code, got = await _buf_curl(target, f"{base}.SessionService/GetSession", data={"session_id": session_id})
    assert code == 0, got
    assert (got["sessionId"], got["agentId"], got["userId"]) == (session_id, "echo", "operator")
    assert got["metadata"] == {"channel": "cli"}
    assert got["variables"] == {"plan": "pro"}
    assert got["etag"] == appended["session"]["etag"]

    code, last = await _buf_curl(
        target,
        f"{base}.MessageService/ListMessages",
        data={"session_id": session_id, "page_size": 1, "order": "MESSAGE_ORDER_DESCENDING"},
    )
    assert code == 0, last
    assert [m["parts"][0]["text"]["text"] for m in last["messages"]] == ["Hi, how can I help?"]
    assert last["nextPageToken"]


async def test_buf_curl_shows_the_rich_error(node_modules: Path, target: str, unique: str) -> None:
    code, error = await _buf_curl(
        target,
        f"http://{target}/agentsessions.v1.SessionService/GetSession",
        data={"session_id": f"{unique}/missing"},
    )
    assert code != 0
    assert error["code"] == "not_found"
    (detail,) = error["details"]
    assert detail["type"] == "google.rpc.ErrorInfo"
    value = detail["value"]  # base64 without padding
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))
    assert info.reason == "SESSION_NOT_FOUND"
    assert dict(info.metadata) == {"session_id": f"{unique}/missing"}
