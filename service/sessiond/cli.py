"""The `sessiond` command: `sessiond serve`, `sessiond migrate`, `sessiond admin ...` (`sessiond.admin`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from pydantic import ValidationError

from . import admin
from .agents_file import ConfigError
from .config import Settings, StartupError
from .store import migrate
from .store.database import Database
from .tls import TlsConfigError


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "listen", None):
        overrides["listen"] = args.listen
    if args.database_url:
        overrides["database_url"] = args.database_url
    if getattr(args, "no_migrate", False):
        overrides["migrate_on_start"] = False
    if getattr(args, "config", None):
        overrides["config_file"] = args.config
    if getattr(args, "metrics_listen", None):
        overrides["metrics_listen"] = args.metrics_listen
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        if getattr(args, name, None):
            overrides[name] = getattr(args, name)
    try:
        return Settings.of(**overrides)
    except ValidationError as exc:
        raise StartupError(_settings_problems(exc)) from None


def _settings_problems(exc: ValidationError) -> str:
    """What is wrong with the settings, by environment variable, one per line."""
    lines = ["invalid settings:"]
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]).upper() or "settings"
        lines.append(f"  {where}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


async def _migrate(settings: Settings, revision: str) -> None:
    db = Database(settings.database_url, schema=settings.database_schema)
    await db.open()
    try:
        await migrate.upgrade(db, revision)
        print(f"schema at revision {await migrate.current_revision(db)} ({db.dialect})")
    finally:
        await db.close()


DATABASE_URL_HELP = "sqlite:///PATH or postgresql://USER@HOST:PORT/DB (SESSIOND_DATABASE_URL)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sessiond", description="Agent Sessions gRPC server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (SIGTERM drains and stops it)")
    serve.add_argument("--listen", help="address to listen on (SESSIOND_LISTEN, default 127.0.0.1:50051)")
    serve.add_argument("--database-url", help=DATABASE_URL_HELP)
    serve.add_argument("--no-migrate", action="store_true", help="do not apply migrations at start")
    serve.add_argument("--config", help="TOML file declaring agents (SESSIOND_CONFIG); see README, Agents")
    serve.add_argument(
        "--metrics-listen",
        help="serve Prometheus metrics on host:port (SESSIOND_METRICS_LISTEN; default off)",
    )
    serve.add_argument(
        "--tls-cert",
        dest="tls_cert_file",
        metavar="FILE",
        help="PEM certificate chain (SESSIOND_TLS_CERT_FILE)",
    )
    serve.add_argument(
        "--tls-key", dest="tls_key_file", metavar="FILE", help="its PEM private key (SESSIOND_TLS_KEY_FILE)"
    )
    serve.add_argument(
        "--tls-client-ca",
        dest="tls_client_ca_file",
        metavar="FILE",
        help="require client certificates signed by these CAs: mutual TLS (SESSIOND_TLS_CLIENT_CA_FILE)",
    )
    mig = sub.add_parser("migrate", help="apply schema migrations and exit")
    mig.add_argument("--database-url", help=DATABASE_URL_HELP)
    mig.add_argument("--revision", default="head")
    admin.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "admin":
        return admin.run(args)

    try:
        settings = _settings(args)
    except StartupError as exc:
        print(f"sessiond: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "migrate":
        asyncio.run(_migrate(settings, args.revision))
        return 0
    from .server import serve as run

    try:
        asyncio.run(run(settings))
    except (ConfigError, TlsConfigError, StartupError) as exc:  # the operator's: the message says what to fix
        print(f"sessiond: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
