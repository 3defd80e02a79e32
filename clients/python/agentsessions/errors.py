"""Exceptions raised by the Agent Sessions clients: one class per gRPC status code.

Modelled on ``google.api_core.exceptions``: every failed call raises a subclass of
:class:`AgentSessionsError` chosen by status code (:data:`EXCEPTION_CLASSES`), with the rich
``google.rpc.Status`` details the server attaches unpacked into attributes. The server puts an
``ErrorInfo`` (domain ``agentsessions.v1``) on every error, so ``err.reason`` says what went wrong in
a stable, machine-readable way::

    try:
        await client.append_text(session_id=sid, role="user", text="hi")
    except errors.FailedPrecondition as err:
        if err.reason == "SESSION_EXPIRED":
            ...

The original ``grpc.RpcError`` is kept as ``__cause__``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from google.rpc import error_details_pb2, status_pb2

from agentsessions.v1 import message_service_pb2, turn_service_pb2

__all__ = [
    "EXCEPTION_CLASSES",
    "Aborted",
    "AgentSessionsError",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "exception_for",
    "from_connect_error",
    "from_grpc_error",
]

#: The trailer that carries a serialized ``google.rpc.Status`` (the gRPC rich error model).
STATUS_DETAILS_KEY = "grpc-status-details-bin"

_DETAIL_TYPES: tuple[type[ProtoMessage], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.QuotaFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)

#: Status code -> exception class; filled in as the subclasses below are defined.
EXCEPTION_CLASSES: dict[grpc.StatusCode, type[AgentSessionsError]] = {}


class AgentSessionsError(Exception):
    """A call to Agent Sessions failed.

    Attributes:
        code: the gRPC status code.
        message: the status message.
        details: the unpacked ``google.rpc.Status`` detail messages (``ErrorInfo``, ``BadRequest``,
            ``RetryInfo``, ...); detail types this module does not know stay ``google.protobuf.Any``.
        reason: ``ErrorInfo.reason`` (UPPER_SNAKE_CASE, e.g. ``SESSION_NOT_FOUND``), or None.
        domain: ``ErrorInfo.domain`` (``agentsessions.v1``), or None.
        metadata: ``ErrorInfo.metadata``: the dynamic values of the error (e.g. the session id).
        field_violations: ``(field, description)`` pairs from ``BadRequest``.
        retry_delay: seconds from ``RetryInfo``, when the server says a retry can succeed; else None.
    """

    grpc_status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, *, details: Sequence[ProtoMessage] = (), code: grpc.StatusCode | None = None
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code or self.grpc_status_code
        self.message = message
        self.details: list[ProtoMessage] = list(details)
        self.reason: str | None = None
        self.domain: str | None = None
        self.metadata: dict[str, str] = {}
        self.field_violations: list[tuple[str, str]] = []
        self.retry_delay: float | None = None
        for detail in self.details:
            if isinstance(detail, error_details_pb2.ErrorInfo):
                self.reason, self.domain = detail.reason, detail.domain
                self.metadata = dict(detail.metadata)
            elif isinstance(detail, error_details_pb2.BadRequest):
                self.field_violations += [(v.field, v.description) for v in detail.field_violations]
            elif isinstance(detail, error_details_pb2.RetryInfo):
                self.retry_delay = detail.retry_delay.ToTimedelta().total_seconds()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "grpc_status_code" in cls.__dict__:
            EXCEPTION_CLASSES[cls.grpc_status_code] = cls

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} [{self.reason}]" if self.reason else text


class Cancelled(AgentSessionsError):
    """CANCELLED: the call was cancelled, usually by the caller."""

    grpc_status_code = grpc.StatusCode.CANCELLED


class Unknown(AgentSessionsError):
    """UNKNOWN: an error with no better code (often raised by the transport)."""

    grpc_status_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(AgentSessionsError):
    """INVALID_ARGUMENT: the request is malformed or a value is out of range (see field_violations)."""

    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(AgentSessionsError):
    """DEADLINE_EXCEEDED: the call's deadline passed before it completed."""

    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(AgentSessionsError):
    """NOT_FOUND: the session, message or agent does not exist (or was deleted or purged)."""

    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AgentSessionsError):
    """ALREADY_EXISTS: a caller-chosen id is taken."""

    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(AgentSessionsError):
    """PERMISSION_DENIED: the caller may not do this."""

    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(AgentSessionsError):
    """RESOURCE_EXHAUSTED: a limit was hit (quota, size, or a watcher that fell behind)."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(AgentSessionsError):
    """FAILED_PRECONDITION: the session's state forbids it (SESSION_EXPIRED, SESSION_ENDED, ...)."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(AgentSessionsError):
    """ABORTED: a conflict (etag mismatch, TURN_IN_PROGRESS); retry_delay may say when to try again."""

    grpc_status_code = grpc.StatusCode.ABORTED


class OutOfRange(AgentSessionsError):
    """OUT_OF_RANGE: a position past the valid range."""

    grpc_status_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(AgentSessionsError):
    """UNIMPLEMENTED: the server does not implement this method."""

    grpc_status_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(AgentSessionsError):
    """INTERNAL: an unexpected server failure."""

    grpc_status_code = grpc.StatusCode.INTERNAL


class Unavailable(AgentSessionsError):
    """UNAVAILABLE: the server cannot be reached or is draining; retrying can succeed."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(AgentSessionsError):
    """DATA_LOSS: unrecoverable data loss or corruption."""

    grpc_status_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(AgentSessionsError):
    """UNAUTHENTICATED: the call carries no valid credentials."""

    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED


#: ErrorInfo reason of the :class:`Cancelled` a client raises itself for a call made after its ``close()``,
#: or for a call or stream another task was waiting on when it closed.
CLIENT_CLOSED = "CLIENT_CLOSED"


def client_closed() -> Cancelled:
    """The error of a call through a closed client (gRPC itself raises ``UsageError``, ``ValueError`` or,
    in the task that waited, a bare ``CancelledError``)."""
    info = error_details_pb2.ErrorInfo(reason=CLIENT_CLOSED, domain="agentsessions.v1")
    return Cancelled("the client was closed", details=[info])


#: ErrorInfo reason of the :class:`FailedPrecondition` a Connect stream raises itself for a frame sent after
#: it stopped taking frames: after ``done_writing()``, ``cancel()``, or the end of the call.
STREAM_CLOSED = "STREAM_CLOSED"


def stream_closed(why: str) -> FailedPrecondition:
    """The error of a frame sent on a Connect stream that takes no more (gRPC itself raises a bare
    ``asyncio.InvalidStateError``)."""
    info = error_details_pb2.ErrorInfo(reason=STREAM_CLOSED, domain="agentsessions.v1")
    return FailedPrecondition(f"the Connect stream takes no more frames: {why}", details=[info])


def exception_for(
    code: grpc.StatusCode, message: str, details: Sequence[ProtoMessage] = ()
) -> AgentSessionsError:
    """Builds the exception of the class registered for ``code``."""
    cls = EXCEPTION_CLASSES.get(code, AgentSessionsError)
    return cls(message, details=details, code=code)


def from_grpc_error(err: grpc.RpcError) -> AgentSessionsError:
    """Converts a ``grpc.RpcError`` (sync) or ``grpc.aio.AioRpcError`` into an :class:`AgentSessionsError`.

    The ``google.rpc.Status`` is decoded from the ``grpc-status-details-bin`` trailer directly rather
    than with ``grpc_status.rpc_status.from_call``, which wants a sync ``grpc.Call`` and raises when the
    status code or message disagree with the call's. Raise the result ``from err`` to keep the cause.
    """
    code_of = getattr(err, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(err, "details", None)
    message = (details_of() if callable(details_of) else None) or ""
    status = _status_from_trailers(err)
    if status is not None and not message:
        message = status.message
    return exception_for(code, message, _unpack(status.details) if status is not None else ())


def from_connect_error(
    frame: turn_service_pb2.ConnectError | message_service_pb2.AppendError,
) -> AgentSessionsError:
    """Converts an error reported inside a response, with the details its status carries (ErrorInfo
    metadata, field violations, retry delay): an error frame of a Connect stream (reported without closing
    the stream), or a failed entry of a BatchAppendMessages call."""
    try:
        code = next(c for c in grpc.StatusCode if c.value[0] == frame.code)
    except StopIteration:
        code = grpc.StatusCode.UNKNOWN
    if frame.status_details:
        with contextlib.suppress(DecodeError):
            status = status_pb2.Status.FromString(frame.status_details)
            return exception_for(code, frame.message, _unpack(status.details))
    info = error_details_pb2.ErrorInfo(reason=frame.reason, domain="agentsessions.v1")
    return exception_for(code, frame.message, [info] if frame.reason else [])


def _status_from_trailers(err: grpc.RpcError) -> status_pb2.Status | None:
    trailing_metadata = getattr(err, "trailing_metadata", None)
    if not callable(trailing_metadata):
        return None
    # Sync errors give a tuple of (key, value) pairs, aio errors a grpc.aio.Metadata: both iterate as pairs.
    pairs: Iterable[tuple[str, str | bytes]] = trailing_metadata() or ()
    for key, value in pairs:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def _unpack(details: Iterable[any_pb2.Any]) -> list[ProtoMessage]:
    unpacked: list[ProtoMessage] = []
    for packed in details:
        detail_type = next((t for t in _DETAIL_TYPES if packed.TypeName() == t.DESCRIPTOR.full_name), None)
        if detail_type is None:
            unpacked.append(packed)
            continue
        detail = detail_type()
        packed.Unpack(detail)
        unpacked.append(detail)
    return unpacked
