"""Prometheus metrics, served over HTTP when `SESSIOND_METRICS_LISTEN` names an address (off by default).

RPC metrics use the names operators already chart for gRPC servers (go-grpc-prometheus, py-grpc-prometheus):
`grpc_server_started_total`, `grpc_server_handled_total` (with `grpc_code`, the status code's name as
Python spells it: `OK`, `NOT_FOUND`, ...), `grpc_server_handling_seconds` and, for server streams,
`grpc_server_msg_sent_total`. They come from a `grpc.aio` server interceptor: py-grpc-prometheus only
intercepts the thread-pool server. The server's own state is read when Prometheus scrapes, so a server
nobody scrapes does no metrics work beyond counting calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# From half a millisecond (a point read) to a minute (a long turn); streams that outlive it land in +Inf.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# How long a scrape waits for the session counts before it leaves them out.
SCRAPE_TIMEOUT_SECONDS = 5.0

_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


class Metrics:
    """The registry and the RPC metrics; `interceptor()` feeds them, `serve()` exposes them, and the server
    adds its own state (`ServerState`) to `registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", labels, registry=self.registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status.",
            (*labels, "grpc_code"),
            registry=self.registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its end on the server (a stream: until it closes).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.sent = Counter(
            "grpc_server_msg_sent",
            "Messages sent on server streams.",
            labels,
            registry=self.registry,
        )
        self.batch_entries = Counter(
            "sessiond_batch_append_entries",
            "Entries of BatchAppendMessages calls by the status code each entry's append ended with (the "
            "call itself counts once in grpc_server_handled, OK whatever its entries' outcomes).",
            ("grpc_code",),
            registry=self.registry,
        )

    def count_entries(self, codes: list[str]) -> None:
        """The outcomes of one BatchAppendMessages call's entries (`MessageServicer`)."""
        for code, count in Tally(codes).items():
            self.batch_entries.labels(code).inc(count)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _Interceptor(self)

    def serve(self, address: str) -> tuple[Any, int]:
        """Starts the HTTP endpoint (`/metrics`) on `address` (host:port, port 0 for any); returns the HTTP
        server (`shutdown()` stops it) and the port it listens on."""
        host, _, port = address.rpartition(":")
        httpd, _thread = start_http_server(
            int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry
        )
        return httpd, int(httpd.server_port)


@dataclass(eq=False)  # the registry keeps collectors in a set: identity is their hash
class ServerState(Collector):
    """The server's own gauges, read when Prometheus scrapes (on the HTTP server's thread): register it on
    `Metrics.registry`."""

    session_counts: Callable[[], Coroutine[Any, Any, dict[str, int]]]
    running_turns: Callable[[], int]
    watchers: Callable[[], int]
    loop: asyncio.AbstractEventLoop

    def describe(self) -> Iterable[Any]:
        return []  # read from the server only when scraped, never at registration

    def collect(self) -> Iterable[Any]:
        yield GaugeMetricFamily(
            "sessiond_turns_running", "Turns running on this replica.", self.running_turns()
        )
        yield GaugeMetricFamily(
            "sessiond_watch_subscriptions",
            "Live event subscriptions on this replica (WatchSession and Connect streams).",
            self.watchers(),
        )
        try:
            counts: dict[str, int] = asyncio.run_coroutine_threadsafe(
                self.session_counts(), self.loop
            ).result(SCRAPE_TIMEOUT_SECONDS)
        except Exception:  # the database is down or slow: the scrape goes on without the counts
            log.warning("metrics: session counts unavailable", exc_info=True)
            return
        family = GaugeMetricFamily(
            "sessiond_sessions",
            "Stored sessions by status (all replicas: counted in the database). expiring_soon is the "
            "part of active under the warning threshold.",
            labels=["status"],
        )
        for status, count in sorted(counts.items()):
            family.add_metric([status], count)
        yield family


class _Interceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC. Each method's wrapped handler is built once and reused."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._handlers: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        known = self._handlers.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _wrap(self._metrics, method, handler)
        self._handlers[method] = (handler, wrapped)
        return wrapped


class _Labels:
    """One method's metric children, resolved once: `labels()` per call would cost more than the rest."""

    def __init__(self, metrics: Metrics, kind: str, service: str, method: str, *, streams: bool) -> None:
        values = (kind, service, method)
        self._values = values
        self._handled_metric = metrics.handled
        self.started = metrics.started.labels(*values)
        self.seconds = metrics.seconds.labels(*values)
        self.sent = metrics.sent.labels(*values) if streams else None
        self._handled: dict[str, Any] = {}

    def done(self, start: float, code: str) -> None:
        self.seconds.observe(time.perf_counter() - start)
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._handled_metric.labels(*self._values, code)
        child.inc()


def _code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    # The client went away or the server is stopping. GeneratorExit: grpc closed a stream's generator
    # it no longer reads, as when the client's connection closed under it (a process that died,
    # `buf curl ... | head -1`); that was counted UNKNOWN before.
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)) or context.cancelled():
        return "CANCELLED"
    return "UNKNOWN"  # what grpc answers for an exception a handler let through


def _wrap(
    metrics: Metrics, method: str, handler: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    service, _, name = method.lstrip("/").rpartition("/")
    kind = _TYPES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    labels = _Labels(metrics, kind, service, name, streams=bool(handler.response_streaming))
    field = {
        "unary": "unary_unary",
        "server_stream": "unary_stream",
        "client_stream": "stream_unary",
        "bidi_stream": "stream_stream",
    }[kind]
    behavior = getattr(handler, field)
    if inspect.isasyncgenfunction(behavior):
        wrapped: Any = _timed_generator(behavior, labels)
    else:
        wrapped = _timed(behavior, labels)
    return handler._replace(**{field: wrapped})  # type: ignore[attr-defined, no-any-return]


@contextlib.contextmanager
def _measured(labels: _Labels, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
    """Counts a call as started, then as handled with the code it ended with, and times it."""
    labels.started.inc()
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        labels.done(start, _code(context, error))


def _timed(behavior: Callable[..., Awaitable[Any]], labels: _Labels) -> Callable[..., Awaitable[Any]]:
    async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with _measured(labels, context):
            return await behavior(request, context)

    return timed


def _timed_generator(
    behavior: Callable[..., AsyncGenerator[Any, None]], labels: _Labels
) -> Callable[..., AsyncIterator[Any]]:
    async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        sent = labels.sent
        assert sent is not None
        with _measured(labels, context):
            async with contextlib.aclosing(behavior(request, context)) as items:
                async for item in items:
                    sent.inc()
                    yield item

    return timed
