"""Tracing with OpenTelemetry: off unless SESSIOND_TRACING names an exporter.

With it on, every RPC gets a server span (the caller's `traceparent` metadata, when sent, is its parent;
health checks and reflection are left out, as probes would drown the rest), every turn a `turn` span
under the RPC that started it, and the calls a turn makes to its agent carry the trace on: `traceparent`
metadata on a remote agent's Respond call, the `traceparent` header on a chat-completions request, each
with a client span. So one trace runs from a gateway through sessiond to the agent worker and its model.

`otlp` exports over OTLP/gRPC in batches, configured by the standard OTEL_EXPORTER_OTLP_* variables
(default endpoint localhost:4317); `console` prints each span to stdout, for trying it out. The service
name is OTEL_SERVICE_NAME, else `sessiond`; OTEL_RESOURCE_ATTRIBUTES adds to the resource. The spans are
those of opentelemetry-instrumentation-grpc and -httpx, so their attributes follow the semantic
conventions that tracing back ends know.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

from . import __version__

if TYPE_CHECKING:
    import httpx

# Not traced: probes and tooling, called every few seconds by load balancers and orchestrators.
_UNTRACED = ("grpc.health.v1.", "grpc.reflection.")


class Tracing:
    """Where spans go, and the pieces that make them. A provider of the caller's (tests pass one with an
    in-memory exporter) or one built by `from_settings`."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("sessiond", __version__)

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        traced = filters.negate(filters.any_of(*(filters.service_prefix(p) for p in _UNTRACED)))
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=traced
        )
        return interceptor

    def instrument_http(self, client: httpx.AsyncClient) -> None:
        """For the chat-completions client: a client span per request, the trace in its headers."""
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider)

    def shutdown(self) -> None:
        """Sends what is still batched (the provider's own bound: 30 s)."""
        self.provider.shutdown()


def from_settings(exporter: str) -> Tracing | None:
    """The tracing SESSIOND_TRACING asks for (`off`, `otlp`, `console`)."""
    if exporter == "off":
        return None
    attributes: dict[str, Any] = {SERVICE_VERSION: __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = "sessiond"
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    return Tracing(provider)


#: What runs turns with tracing off: spans that record nothing, at no cost worth measuring.
NO_TRACER: trace.Tracer = trace.NoOpTracer()
