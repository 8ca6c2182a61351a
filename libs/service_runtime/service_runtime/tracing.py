"""W3C trace context across services (gateway -> scheduler -> compute-*), with OpenTelemetry.

Every gRPC server extracts ``traceparent`` / ``tracestate`` from the call's metadata and opens a
server span; every channel made with ``grpc_server.insecure_channel`` injects the current context into
outgoing calls. Without an exporter (the default) spans are not recorded, but the incoming
trace id still flows through to the next hop and into log lines. Setting
``OTEL_EXPORTER_OTLP_ENDPOINT`` turns on OTLP/HTTP export.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import Token
from typing import Any, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context

from service_runtime.metrics import AioUnary, HandlerWrappingInterceptor

log = logging.getLogger(__name__)
_TRACE_KEYS = ("traceparent", "tracestate")


def configure_tracing(service: str) -> bool:
    """Install an exporting tracer provider when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("exporting traces", extra={"endpoint": os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]})
    return True


def current_trace_id() -> str:
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


def outgoing_metadata() -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(key, value) for key, value in carrier.items() if key in _TRACE_KEYS]


def trace_carrier() -> dict[str, str]:
    """The current trace context as W3C headers, to store with work that goes on later (a job
    dispatched after the request that stored it has been answered)."""
    return dict(outgoing_metadata())


@contextmanager
def continued_trace(carrier: Mapping[str, str]) -> Iterator[None]:
    """Run a block in the trace context a ``trace_carrier`` stored: its calls and log lines carry
    the original request's trace id."""
    token = otel_context.attach(propagate.extract(dict(carrier)))
    try:
        yield
    finally:
        otel_context.detach(token)


class TracingServerInterceptor(HandlerWrappingInterceptor):
    """Runs each RPC inside the caller's trace context, in a server span named after the method."""

    def __init__(self, service_label: str) -> None:
        self._tracer = trace.get_tracer(service_label)

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        carrier = {
            key: value
            for key, value in (handler_call_details.invocation_metadata or ())
            if key in _TRACE_KEYS and isinstance(value, str)
        }
        method = handler_call_details.method
        tracer = self._tracer

        def enter() -> tuple[tuple[Token[Context], Token[Context]], trace.Span]:
            token = otel_context.attach(propagate.extract(carrier))
            span = tracer.start_span(method, kind=trace.SpanKind.SERVER)
            span_token = otel_context.attach(trace.set_span_in_context(span))
            return (token, span_token), span

        def leave(tokens: tuple[Token[Context], Token[Context]], span: trace.Span) -> None:
            span.end()
            otel_context.detach(tokens[1])
            otel_context.detach(tokens[0])

        if handler.unary_unary is not None:
            # grpc.aio keeps coroutine functions in the handler's fields, typed for the sync server
            inner = cast(AioUnary, handler.unary_unary)

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                tokens, span = enter()
                try:
                    return await inner(request, context)
                finally:
                    leave(tokens, span)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class TracingClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    @staticmethod
    def _with_trace(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        extra = outgoing_metadata()
        if not extra:
            return details
        present = {key for key, _ in (details.metadata or ())}
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in extra:
            if key not in present:
                metadata.add(key, value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_trace(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_trace(client_call_details), request)
