"""TLS on the gRPC port: the server's certificate and key, and with a client CA, mutual TLS.

The files are PEM. They are checked at start (a missing file, a key that does not match the certificate,
a client CA with no certificate in it stop the start with a message that names the file), and read again
when they change: grpc asks for the certificate before each new connection's handshake
(`dynamic_ssl_server_credentials`), and this answers with the new files once they form a valid set, so a
certificate rotated on disk (cert-manager, a renewal cron job) is served without a restart. Connections
already open keep the certificate they were made with. A set caught half-written (the new certificate
beside the old key) is not served: the last valid one stays until the files agree again.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import grpc

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """The TLS settings or files cannot serve: the server does not start."""


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def from_settings(cls, cert: str | None, key: str | None, client_ca: str | None) -> TlsFiles | None:
        """The TLS files named by the settings; None for a plaintext server. Half a pair is an error, as
        is a client CA with nothing to serve TLS with."""
        if not cert and not key:
            if client_ca:
                raise TlsConfigError(
                    "SESSIOND_TLS_CLIENT_CA_FILE needs SESSIOND_TLS_CERT_FILE and SESSIOND_TLS_KEY_FILE"
                )
            return None
        if not cert or not key:
            raise TlsConfigError("set both SESSIOND_TLS_CERT_FILE and SESSIOND_TLS_KEY_FILE, or neither")
        return cls(cert, key, client_ca or None)

    def paths(self) -> tuple[str, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


Signature = tuple[tuple[int, int, int], ...]


def _signature(files: TlsFiles) -> Signature:
    """What changes when a file is replaced or rewritten: inode, size and modification time of each."""
    out = []
    for path in files.paths():
        try:
            st = os.stat(path)
        except OSError as exc:
            raise TlsConfigError(f"cannot read {path}: {exc.strerror}") from exc
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def read_file(path: str) -> bytes:
    """A PEM file's bytes; TlsConfigError (a ValueError) naming it when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _encrypted(path: str) -> bytes:
    # Without a callback OpenSSL would ask for the pass phrase on the terminal; grpc takes no pass phrase.
    raise TlsConfigError(f"{path} is an encrypted key; the server needs it unencrypted (PEM)")


def _load(files: TlsFiles) -> tuple[grpc.ServerCertificateConfiguration, Signature]:
    """The files as one certificate configuration, checked, and the signature of the files it came
    from. The standard library's TLS does the checking (grpc itself would only fail the handshakes);
    the signature before and after shows that what was checked is what was read."""
    before = _signature(files)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key, password=functools.partial(_encrypted, files.key))
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"{files.cert} and {files.key} are not a PEM certificate chain and its private key ({exc.reason})"
        ) from exc
    except OSError as exc:
        raise TlsConfigError(f"cannot read {files.cert} or {files.key}: {exc.strerror}") from exc
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"{files.client_ca} holds no PEM CA certificate") from exc
        if not context.get_ca_certs():
            raise TlsConfigError(f"{files.client_ca} holds no CA certificate (client certificates check)")
    cert, key = read_file(files.cert), read_file(files.key)
    client_ca = read_file(files.client_ca) if files.client_ca is not None else None
    if _signature(files) != before:
        raise TlsConfigError("the TLS files changed while they were read")
    config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
    return config, before


class _CertificateSource:
    """What grpc asks before each handshake: a new configuration when the files changed into a valid
    set, else None (keep the current one)."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self.initial, self._served = _load(files)
        self._refused: Signature | None = None  # a set found invalid, not reported twice

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        # grpc calls this on its own threads and swallows what it raises: nothing may escape.
        with self._lock:
            try:
                return self._changed()
            except Exception:
                log.exception("keeping the current TLS certificate")
                return None

    def _changed(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            seen = _signature(self._files)
        except TlsConfigError as exc:
            seen, failure = (), exc  # a file is missing
        else:
            if seen in (self._served, self._refused):
                return None
            try:
                config, self._served = _load(self._files)
            except TlsConfigError as exc:
                failure = exc
            else:
                self._refused = None
                log.info("serving the TLS certificate in %s, changed on disk", self._files.cert)
                return config
        if seen != self._refused:  # said once for each state of the files
            log.warning("keeping the current TLS certificate: %s", failure)
            self._refused = seen
        return None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port`, following the files as they change (raises TlsConfigError
    when they cannot serve now)."""
    source = _CertificateSource(files)
    # grpc's documentation: the fetcher returns None to keep the current configuration (the type stubs
    # leave None out).
    fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], source)
    return grpc.dynamic_ssl_server_credentials(
        source.initial, fetch, require_client_authentication=files.client_ca is not None
    )
