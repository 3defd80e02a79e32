"""TLS and mutual TLS on the gRPC port, through the published clients and the admin command, with
certificates made by each test (tests/pki.py), and certificate rotation without a restart.

These run on SQLite only: the transport is the same whatever store is behind it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import DatabaseTarget, make_settings, serving
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import CertificateAuthority, Issued

from agentsessions import AsyncSessionsClient, SessionsClient, errors
from sessiond import admin
from sessiond.cli import build_parser, main
from sessiond.config import Settings
from sessiond.domain.clock import ManualClock
from sessiond.server import RunningServer, start_server
from sessiond.tls import TlsConfigError


@pytest.fixture
def sqlite(tmp_path: Path) -> DatabaseTarget:
    return DatabaseTarget("sqlite", f"sqlite:///{tmp_path / 'tls.db'}")


@pytest.fixture
def server_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "server-pki", "server-ca")


@pytest.fixture
def server_cert(server_ca: CertificateAuthority) -> Issued:
    return server_ca.issue("sessiond", server=True)


def tls_settings(database: DatabaseTarget, cert: Issued, client_ca: Path | None = None) -> Settings:
    return make_settings(
        database,
        tls_cert_file=str(cert.cert),
        tls_key_file=str(cert.key),
        tls_client_ca_file=str(client_ca) if client_ca else None,
    )


@pytest.fixture
async def tls_server(
    sqlite: DatabaseTarget, server_cert: Issued, clock: ManualClock
) -> AsyncIterator[RunningServer]:
    async with serving(tls_settings(sqlite, server_cert), clock) as running:
        yield running


def trusting(ca_pem: bytes, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=client.key_pem, certificate_chain=client.cert_pem
    )


async def refused(target: str, credentials: grpc.ChannelCredentials | None) -> errors.AgentSessionsError:
    """The error of a call that cannot get through the handshake (no retries: nothing would change)."""
    async with AsyncSessionsClient(target, credentials=credentials, retry=None, timeout=5) as client:
        with pytest.raises(errors.Unavailable) as info:
            await client.get_server_stats()
    return info.value


async def works(target: str, credentials: grpc.ChannelCredentials, session_id: str) -> None:
    async with AsyncSessionsClient(target, credentials=credentials) as client:
        created = await client.create_session(agent_id="echo", session_id=session_id)
        await client.append_text(session_id=created.session_id, role="user", text="over TLS")
        (message,) = await client.last_messages(session_id=created.session_id, n=1)
        assert message.parts[0].text.text == "over TLS"


async def test_clients_speak_tls_and_plaintext_or_untrusting_ones_are_refused(
    tls_server: RunningServer, server_ca: CertificateAuthority, tmp_path: Path, unique: str
) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    await works(target, trusting(server_ca.pem), f"{unique}/async")
    # Health and a server stream over the same port.
    async with grpc.aio.secure_channel(target, trusting(server_ca.pem)) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with AsyncSessionsClient(target, credentials=trusting(server_ca.pem)) as client:
        async for event in client.watch_session(session_id=f"{unique}/async", after_event_id=0, resume=False):
            assert event.messages_appended.messages[0].parts[0].text.text == "over TLS"
            break

    def sync_calls() -> str:
        with SessionsClient(target, credentials=trusting(server_ca.pem)) as client:
            session = client.create_session(agent_id="echo", session_id=f"{unique}/sync")
            return client.get_session(session_id=session.session_id).session_id

    assert await asyncio.to_thread(sync_calls) == f"{unique}/sync"

    await refused(target, None)  # plaintext against TLS
    stranger = CertificateAuthority(tmp_path / "other", "other-ca")
    await refused(target, trusting(stranger.pem))  # a server certificate it does not trust


async def test_mutual_tls_takes_only_clients_with_a_certificate_its_ca_signed(
    sqlite: DatabaseTarget,
    server_ca: CertificateAuthority,
    server_cert: Issued,
    clock: ManualClock,
    tmp_path: Path,
    unique: str,
) -> None:
    client_ca = CertificateAuthority(tmp_path / "client-pki", "client-ca")
    member = client_ca.issue("gateway", server=False)
    outsider = CertificateAuthority(tmp_path / "outsider", "outsider-ca").issue("intruder", server=False)
    async with serving(tls_settings(sqlite, server_cert, client_ca.issued.cert), clock) as running:
        target = f"127.0.0.1:{running.port}"
        await works(target, trusting(server_ca.pem, member), f"{unique}/mtls")
        await refused(target, trusting(server_ca.pem))  # no client certificate
        await refused(target, trusting(server_ca.pem, outsider))  # one another CA signed

        # The admin command, as an operator runs it with the same files.
        def sessiond_admin(*tls: str) -> tuple[int, str, str]:
            args = build_parser().parse_args(["admin", "--target", target, *tls, "show", f"{unique}/mtls"])
            out, err = io.StringIO(), io.StringIO()
            return admin.run(args, out, err), out.getvalue(), err.getvalue()

        with_cert = ("--tls-ca", str(server_ca.issued.cert), "--tls-cert", str(member.cert))
        status, out, err = await asyncio.to_thread(
            sessiond_admin, *with_cert, "--tls-key", str(member.key), "--timeout", "5"
        )
        assert (status, json.loads(out)["session_id"]) == (0, f"{unique}/mtls"), err
        status, _, err = await asyncio.to_thread(sessiond_admin, *with_cert)
        assert status == 2 and "--tls-cert and --tls-key go together" in err
        status, _, err = await asyncio.to_thread(
            sessiond_admin, "--tls-ca", str(tmp_path / "missing.pem"), "--timeout", "5"
        )
        assert status == 2 and "cannot read" in err
        status, _, err = await asyncio.to_thread(
            sessiond_admin, "--tls-ca", str(server_ca.issued.cert), "--timeout", "5"
        )
        assert status == 1 and err.startswith("UNAVAILABLE"), err


def replace_files(target: Issued, new: Issued, *, key: bool = True) -> None:
    """Writes `new` over `target`'s files as a rotation does (a new file moved into place), with a later
    modification time than before whatever the file system's clock resolution."""
    later = max(os.stat(target.cert).st_mtime_ns, os.stat(target.key).st_mtime_ns) + 10**9
    for source, path in ((new.cert, target.cert), *(((new.key, target.key),) if key else ())):
        staged = path.with_suffix(".new")
        staged.write_bytes(source.read_bytes())
        os.utime(staged, ns=(later, later))
        os.replace(staged, path)


async def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(
    tls_server: RunningServer,
    server_ca: CertificateAuthority,
    server_cert: Issued,
    tmp_path: Path,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    async with AsyncSessionsClient(target, credentials=trusting(server_ca.pem)) as before:
        await before.create_session(agent_id="echo", session_id=f"{unique}/before")

        renewed_ca = CertificateAuthority(tmp_path / "renewed", "renewed-ca")
        replace_files(server_cert, renewed_ca.issue("sessiond-2", server=True))
        await works(target, trusting(renewed_ca.pem), f"{unique}/after")
        await refused(target, trusting(server_ca.pem))  # new connections get the new certificate
        # A connection made before keeps the certificate it was made with.
        assert (await before.get_session(session_id=f"{unique}/before")).session_id == f"{unique}/before"

        # Half a rotation (a new certificate beside the old key) is not served: the last good pair stays.
        caplog.set_level(logging.WARNING, logger="sessiond.tls")
        third_ca = CertificateAuthority(tmp_path / "third", "third-ca")
        replace_files(server_cert, third_ca.issue("sessiond-3", server=True), key=False)
        await works(target, trusting(renewed_ca.pem), f"{unique}/half")
        await works(target, trusting(renewed_ca.pem), f"{unique}/half-again")
        warnings = [r.getMessage() for r in caplog.records if r.name == "sessiond.tls"]
        assert len(warnings) == 1 and "keeping the current TLS certificate" in warnings[0], warnings


async def test_tls_settings_that_cannot_serve_stop_the_start(
    sqlite: DatabaseTarget, server_ca: CertificateAuthority, server_cert: Issued, tmp_path: Path
) -> None:
    other = server_ca.issue("other", server=True)
    encrypted = tmp_path / "encrypted.key"
    loaded = serialization.load_pem_private_key(server_cert.key_pem, password=None)
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    empty_ca = tmp_path / "empty-ca.pem"
    empty_ca.write_text("no certificate here\n")
    cases: list[tuple[dict[str, str | None], str]] = [
        (
            {"tls_cert_file": str(server_cert.cert)},
            "set both SESSIOND_TLS_CERT_FILE and SESSIOND_TLS_KEY_FILE",
        ),
        ({"tls_client_ca_file": str(server_ca.issued.cert)}, "SESSIOND_TLS_CLIENT_CA_FILE needs"),
        (
            {"tls_cert_file": str(tmp_path / "nope.crt"), "tls_key_file": str(server_cert.key)},
            f"cannot read {tmp_path / 'nope.crt'}",
        ),
        (
            {"tls_cert_file": str(server_cert.cert), "tls_key_file": str(other.key)},
            "are not a PEM certificate chain and its private key",
        ),
        (
            {"tls_cert_file": str(server_cert.cert), "tls_key_file": str(encrypted)},
            "is an encrypted key",
        ),
        (
            {
                "tls_cert_file": str(server_cert.cert),
                "tls_key_file": str(server_cert.key),
                "tls_client_ca_file": str(empty_ca),
            },
            str(empty_ca),
        ),
    ]
    for overrides, complaint in cases:
        with pytest.raises(TlsConfigError) as info:
            await start_server(make_settings(sqlite, **overrides))
        assert complaint in str(info.value), (overrides, info.value)


def test_sessiond_serve_with_unusable_tls_files_exits_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--database-url", f"sqlite:///{tmp_path / 'x.db'}", "--listen", "127.0.0.1:0"]
    assert main([*argv, "--tls-cert", str(tmp_path / "missing.crt")]) == 2
    assert "set both SESSIOND_TLS_CERT_FILE and SESSIOND_TLS_KEY_FILE" in capsys.readouterr().err
