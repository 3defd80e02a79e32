"""The one exception hierarchy of the service.

Each class knows its gRPC status code (by name, so this module does not import grpc) and its ErrorInfo
reason. `sessiond.api.errors` is the one place that turns them into `google.rpc.Status`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """A failure the caller can understand and act on."""

    code: str = "INTERNAL"
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[FieldViolation] = (),
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations)
        self.retry_after_seconds = retry_after_seconds


class InvalidArgument(DomainError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, field: str, description: str, **metadata: str) -> InvalidArgument:
        return cls(
            f"{field}: {description}",
            metadata={"field": field, **metadata},
            violations=[FieldViolation(field, description)],
        )


class NotFound(DomainError):
    code = "NOT_FOUND"
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = "ALREADY_EXISTS"
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class OutOfRange(DomainError):
    code = "OUT_OF_RANGE"
    reason = "OUT_OF_RANGE"


class Aborted(DomainError):
    code = "ABORTED"
    reason = "ABORTED"


class ResourceExhausted(DomainError):
    code = "RESOURCE_EXHAUSTED"
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class Unimplemented(DomainError):
    code = "UNIMPLEMENTED"
    reason = "NOT_IMPLEMENTED"


def session_not_found(session_id: str) -> NotFound:
    return NotFound(
        f"session {session_id!r} does not exist",
        reason="SESSION_NOT_FOUND",
        metadata={"session_id": session_id},
    )


def message_exists(session_id: str, message_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"message {message_id!r} already exists in session {session_id!r}; a turn starts from a new message "
        "(retry a turn with its request_id)",
        reason="MESSAGE_ALREADY_EXISTS",
        metadata={"session_id": session_id, "message_id": message_id},
    )


def session_exists(session_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"session {session_id!r} already exists",
        reason="SESSION_ALREADY_EXISTS",
        metadata={"session_id": session_id},
    )


def agent_not_found(agent_id: str) -> NotFound:
    return NotFound(
        f"agent {agent_id!r} does not exist", reason="AGENT_NOT_FOUND", metadata={"agent_id": agent_id}
    )


def etag_mismatch(resource: str, expected: str, actual: str) -> Aborted:
    return Aborted(
        f"{resource} changed since it was read (etag {expected!r}, now {actual!r}); read it again and retry",
        reason="ETAG_MISMATCH",
        metadata={"resource": resource, "etag": actual},
    )


def shutting_down(what: str, **metadata: str) -> Unavailable:
    """A stream or turn that a draining server ended: the caller goes on elsewhere (another replica, or
    this one once it is back), from where `metadata` says it was."""
    return Unavailable(
        f"the server is shutting down; {what}",
        reason="SERVER_SHUTTING_DOWN",
        metadata=metadata,
        retry_after_seconds=1,
    )
