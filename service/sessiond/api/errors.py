"""The one place where failures become gRPC statuses.

Every non-OK status carries google.rpc.Status details: ErrorInfo (reason, domain, metadata) always,
BadRequest field violations for INVALID_ARGUMENT, RetryInfo where retrying can succeed. Unexpected
exceptions are logged here and answered INTERNAL without their text.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import exc as sa_exc

from ..domain.errors import DomainError, InvalidArgument, Unavailable
from ..store.database import TIMEOUT_SQLSTATES, sqlstate

DOMAIN = "agentsessions.v1"
log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


# A status leaves in the trailers, and a gRPC client takes 8 KiB of them by default: past that it fails the
# call RESOURCE_EXHAUSTED without the status (at random up to 16 KiB, always beyond). The message goes
# twice, in `grpc-message` (percent-encoded: up to 3 bytes per byte of UTF-8) and in the details. Texts that
# quote what the caller sent (an etag, a URL, a variable name) are cut to these many bytes of UTF-8, which
# keeps every status under 7 KiB; before, a 10,000-character etag came back as RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 1024
MAX_DESCRIPTION_BYTES = 512
MAX_VALUE_BYTES = 256  # a field path, an ErrorInfo metadata value


def clip(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` bytes of UTF-8 (with "..." at the cut)."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", "ignore") + "..."


def to_status(exc: DomainError) -> grpc.Status:
    converted: grpc.Status = rpc_status.to_status(rich_status(exc))
    return converted


def rich_status(exc: DomainError) -> status_pb2.Status:
    """The `google.rpc.Status` of `exc`: its code and message, with ErrorInfo, BadRequest and RetryInfo."""
    metadata = {key: clip(value, MAX_VALUE_BYTES) for key, value in exc.metadata.items()}
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=metadata))]
    if exc.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=clip(v.field, MAX_VALUE_BYTES),
                            description=clip(v.description, MAX_DESCRIPTION_BYTES),
                        )
                        for v in exc.violations
                    ]
                )
            )
        )
    if exc.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_seconds * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    message = clip(exc.message, MAX_MESSAGE_BYTES)
    return status_pb2.Status(code=code_pb2.Code.Value(exc.code), message=message, details=details)


def error_fields(exc: DomainError) -> dict[str, Any]:
    """The fields of an error reported inside a response rather than as the call's status (ConnectError,
    AppendError): the code, reason and message, and the whole status serialized."""
    return {
        "code": grpc.StatusCode[exc.code].value[0],
        "reason": exc.reason,
        "message": exc.message,
        "status_details": rich_status(exc).SerializeToString(),
    }


def _internal() -> DomainError:
    """What an unexpected failure tells its caller: nothing of the failure itself."""
    return DomainError("internal error; the server logged the details", reason="INTERNAL")


def internal_status() -> grpc.Status:
    return to_status(_internal())


class Undecodable:
    """What a request that is not a valid protobuf message turns into (see `guard_decoding`), so that the
    servicer answers INVALID_ARGUMENT with an ErrorInfo instead of grpc's bare UNKNOWN."""

    __slots__ = ("message_type", "problem")

    def __init__(self, message_type: str, problem: str) -> None:
        self.message_type = message_type
        self.problem = problem

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request does not decode as a {self.message_type} ({self.problem})",
            reason="MALFORMED_REQUEST",
            metadata={"message_type": self.message_type},
        )


def _guarded(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_class = getattr(deserialize, "__self__", None)
    message_type = getattr(getattr(message_class, "DESCRIPTOR", None), "full_name", "request message")

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(message_type, str(exc))

    return decode


class guard_decoding:
    """Stands in for the server in a generated `add_XServicer_to_server` call and registers the service's
    handlers with request decoders that never raise: an undecodable request reaches the servicer as an
    `Undecodable`, which `unary`, `streaming` and the Connect reader answer as bad input."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the same handlers arrive through `add_registered_method_handlers`."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        guarded = {}
        for name, handler in handlers.items():
            decode = handler.request_deserializer
            if decode is not None:
                handler = handler._replace(request_deserializer=_guarded(decode))  # type: ignore[attr-defined]
            guarded[name] = handler
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        self._server.add_registered_method_handlers(service, guarded)


def database_unavailable(exc: Exception) -> Unavailable | None:
    """The status of a failure of the database rather than of the request: unreachable, its connection
    lost (a restart), its write lock held by another process past the lock timeout (SQLite) or past the
    lock or statement timeout (PostgreSQL), out of disk. The caller may try again shortly, so it is
    UNAVAILABLE (retried by the clients for idempotent calls), not INTERNAL."""
    connection_lost = isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    timed_out = sqlstate(exc) in TIMEOUT_SQLSTATES  # a lock held elsewhere, or a statement too slow
    if not (
        connection_lost
        or timed_out
        or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, OSError))
    ):
        return None
    return Unavailable(
        "the database did not answer in time (a row locked by another client, or a slow statement); "
        "try again shortly"
        if timed_out
        else "the database is unavailable; try again shortly",
        reason="DATABASE_UNAVAILABLE",
        retry_after_seconds=1,
    )


def unexpected_error(exc: Exception, where: str, *, logged: bool = True) -> DomainError:
    """A failure that is not a DomainError, as the error its caller gets (logged, unless `logged` is
    false): UNAVAILABLE / DATABASE_UNAVAILABLE with a retry delay when the database failed, else
    INTERNAL."""
    unavailable = database_unavailable(exc)
    if unavailable is not None:
        if logged:
            log.warning("database unavailable in %s", where, exc_info=exc)
        return unavailable
    if logged:
        log.error("unexpected failure in %s", where, exc_info=exc)
    return _internal()


def _unexpected(exc: Exception, where: str) -> grpc.Status:
    """The status of a failure that is not a DomainError, logged."""
    return to_status(unexpected_error(exc, where))


async def abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    """Ends the call with `status` (raises). What `abort_with_status` does, but through the context's own
    `abort`, so that an interceptor wrapping the context (OpenTelemetry's, which records the code on the
    call's span) sees the code: grpc's `abort_with_status` calls the unwrapped context's."""
    await context.abort(status.code, status.details, status.trailing_metadata)


def unary(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Wraps a unary servicer method so that every failure leaves as a rich status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await fn(self, request, context)
        except DomainError as exc:
            await abort(context, to_status(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, _unexpected(exc, fn.__qualname__))
        raise AssertionError("unreachable: abort raises")

    return wrapper


def streaming(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    """The same for server-streaming methods written as async generators."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Resp]:
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            async for item in fn(self, request, context):
                yield item
        except DomainError as exc:
            await abort(context, to_status(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, _unexpected(exc, fn.__qualname__))

    return wrapper
