"""`sessiond admin ...`: an operator's view of a running server, through the published client.

Every command prints JSON (one object per line for lists, the proto's field names, zero and empty fields
included) so that its output pipes into `jq`; a failed call prints the status, reason and message on
stderr and exits 1. The server is `--target` (`SESSIOND_TARGET`, default 127.0.0.1:50051).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from agentsessions import SessionsClient, errors

from .tls import read_file

DEFAULT_TARGET = "127.0.0.1:50051"
STATUSES = ("active", "expired", "ended")


def add_parser(sub: Any) -> None:
    """The `admin` command and its subcommands, on the `sessiond` parser's subparsers."""
    admin = sub.add_parser("admin", help="inspect and manage a running server (prints JSON)")
    admin.add_argument(
        "--target",
        default=os.environ.get("SESSIOND_TARGET", DEFAULT_TARGET),
        help=f"the server (SESSIOND_TARGET, default {DEFAULT_TARGET})",
    )
    admin.add_argument("--timeout", type=float, default=10.0, help="deadline per call in seconds (10)")
    admin.add_argument(
        "--tls-ca",
        default=os.environ.get("SESSIOND_ADMIN_TLS_CA_FILE"),
        metavar="FILE",
        help="connect over TLS, trusting the CA certificates in FILE (SESSIOND_ADMIN_TLS_CA_FILE)",
    )
    admin.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS, trusting the system's CA certificates (implied by --tls-ca)",
    )
    admin.add_argument(
        "--tls-cert",
        default=os.environ.get("SESSIOND_ADMIN_TLS_CERT_FILE"),
        metavar="FILE",
        help="client certificate chain for mutual TLS (SESSIOND_ADMIN_TLS_CERT_FILE), with --tls-key",
    )
    admin.add_argument(
        "--tls-key",
        default=os.environ.get("SESSIOND_ADMIN_TLS_KEY_FILE"),
        metavar="FILE",
        help="the client certificate's private key (SESSIOND_ADMIN_TLS_KEY_FILE)",
    )
    commands = admin.add_subparsers(dest="admin_command", required=True)
    commands.add_parser("stats", help="session counts, running turns, version, uptime")

    listing = commands.add_parser("sessions", help="list sessions, newest first")
    listing.add_argument("--agent", default="", help="only this agent's")
    listing.add_argument("--user", default="", help="only this user's")
    listing.add_argument("--status", choices=STATUSES, help="only sessions in this status")
    listing.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="metadata filter (repeatable)"
    )
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100; 0: all)")

    for name, text in (
        ("show", "one session"),
        ("end", "end a session (read-only from then on)"),
        ("renew", "extend a session's expiry by its timeout"),
        ("clear", "delete a session's history and expire it"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("session_id")
    delete = commands.add_parser("delete", help="delete a session and its history")
    delete.add_argument("session_id")
    delete.add_argument("--force", action="store_true", help="also an active session")

    messages = commands.add_parser("messages", help="a session's messages, oldest first")
    messages.add_argument("session_id")
    messages.add_argument("--last", type=int, default=0, metavar="N", help="only the newest N")
    messages.add_argument("--ui", action="store_true", help="the UI view (visible parts only)")

    commands.add_parser("agents", help="list agents")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Runs one admin command; the exit status."""
    try:
        credentials = _credentials(args)
        with SessionsClient(args.target, timeout=args.timeout, credentials=credentials) as client:
            for item in _COMMANDS[args.admin_command](client, args):
                out.write(_json(item) + "\n")
    except errors.AgentSessionsError as exc:
        # A status without ErrorInfo (the server unreachable) has no reason to print.
        reason = f" {exc.reason}" if exc.reason else ""
        err.write(f"{exc.code.name}{reason}: {exc.message}\n")
        return 1
    except ValueError as exc:  # a malformed --label, a TLS file that cannot be read
        err.write(f"{exc}\n")
        return 2
    return 0


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from the --tls* flags; None for plaintext."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca),
        private_key=_read(args.tls_key),
        certificate_chain=_read(args.tls_cert),
    )


def _read(path: str | None) -> bytes | None:
    return read_file(path) if path else None


def _json(message: Message) -> str:
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, indent=None, always_print_fields_with_no_presence=True
    )


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--label takes KEY=VALUE, got {pair!r}")
        labels[key] = value
    return labels


def _sessions(client: SessionsClient, args: argparse.Namespace) -> Iterable[Message]:
    found = client.list_sessions(
        agent_id=args.agent,
        user_id=args.user,
        status=args.status or "unspecified",
        metadata=_labels(args.label),
        page_size=min(args.limit, 1000) if args.limit > 0 else 0,
    )
    for count, session in enumerate(found, 1):
        yield session
        if count == args.limit:
            return


def _messages(client: SessionsClient, args: argparse.Namespace) -> Iterable[Message]:
    view = "ui" if args.ui else "full"
    if args.last > 0:
        return client.last_messages(session_id=args.session_id, n=args.last, view=view)
    return client.list_messages(session_id=args.session_id, view=view)


def _delete(client: SessionsClient, args: argparse.Namespace) -> Iterable[Message]:
    client.delete_session(session_id=args.session_id, force=args.force)
    return ()


_COMMANDS: dict[str, Callable[[SessionsClient, argparse.Namespace], Iterable[Message]]] = {
    "stats": lambda client, args: [client.get_server_stats()],
    "sessions": _sessions,
    "show": lambda client, args: [client.get_session(session_id=args.session_id)],
    "end": lambda client, args: [client.end_session(session_id=args.session_id)],
    "renew": lambda client, args: [client.renew_session(session_id=args.session_id)],
    "clear": lambda client, args: [client.clear_session(session_id=args.session_id)],
    "delete": _delete,
    "messages": _messages,
    "agents": lambda client, args: client.list_agents(),
}
