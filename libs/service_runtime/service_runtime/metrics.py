"""Prometheus metrics: an interceptor that counts and times every RPC, and the /metrics server."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

# what grpc.aio really keeps in an RpcMethodHandler (its stubs describe the sync server's):
# a coroutine function, and for a stream an async generator or a coroutine that writes itself
AioUnary = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
AioUnaryStream = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any] | Awaitable[None]]

RPC_TOTAL = Counter("grpc_server_handled_total", "RPCs handled", ["service", "method", "code"])
RPC_SECONDS = Histogram("grpc_server_handling_seconds", "RPC latency", ["service", "method"])


@dataclass
class MetricsServer:
    """/metrics over HTTP in a background thread."""

    server: WSGIServer

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry = REGISTRY
) -> MetricsServer | None:
    """Serve /metrics on ``host:port`` (the service's own bind host); 0 picks a free port,
    a negative port disables metrics."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server)


class HandlerWrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that awaits the next handler and, when there is one, returns
    ``wrap(handler, details)``; the metrics and tracing interceptors share this step."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrap(handler, handler_call_details)

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        raise NotImplementedError


class MetricsInterceptor(HandlerWrappingInterceptor):
    def __init__(self, service_label: str) -> None:
        self._service = service_label

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method.rsplit("/", 1)[-1]
        service = self._service

        def record(code: str, started: float) -> None:
            RPC_TOTAL.labels(service, method, code).inc()
            RPC_SECONDS.labels(service, method).observe(time.perf_counter() - started)

        if handler.unary_unary is not None:
            # grpc.aio keeps coroutine functions in the handler's fields, typed for the sync server
            inner = cast(AioUnary, handler.unary_unary)

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    response = await inner(request, context)
                except BaseException:
                    record(_code_name(context, "UNKNOWN"), started)
                    raise
                record(_code_name(context, "OK"), started)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = cast(AioUnaryStream, handler.unary_stream)

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    produced = inner_stream(request, context)
                    if inspect.isawaitable(produced):
                        # Servicers that stream with context.write() (e.g. Health.Watch)
                        # return a coroutine instead of an async generator.
                        await produced
                    else:
                        async for item in produced:
                            yield item
                except BaseException:
                    record(_code_name(context, "UNKNOWN"), started)
                    raise
                record(_code_name(context, "OK"), started)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    if code is None:
        return default
    return code.name if isinstance(code, grpc.StatusCode) else str(code)
