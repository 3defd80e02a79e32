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
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..domain.errors import DomainError

DOMAIN = "agentsessions.v1"
log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(exc: DomainError) -> grpc.Status:
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata))]
    if exc.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in exc.violations
                    ]
                )
            )
        )
    if exc.retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_seconds * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=code_pb2.Code.Value(exc.code), message=exc.message, details=details)
    converted: grpc.Status = rpc_status.to_status(status)
    return converted


def internal_status() -> grpc.Status:
    return to_status(DomainError("internal error; the server logged the details", reason="INTERNAL"))


def unary(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Wraps a unary servicer method so that every failure leaves as a rich status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await fn(self, request, context)
        except DomainError as exc:
            await context.abort_with_status(to_status(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected failure in %s", fn.__qualname__)
            await context.abort_with_status(internal_status())
        raise AssertionError("unreachable: abort_with_status raises")

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
            async for item in fn(self, request, context):
                yield item
        except DomainError as exc:
            await context.abort_with_status(to_status(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected failure in %s", fn.__qualname__)
            await context.abort_with_status(internal_status())

    return wrapper
