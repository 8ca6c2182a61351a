"""Builds a grpc.aio server the same way for every service.

Each server gets the standard health service, server reflection, Prometheus RPC metrics and
raised message-size limits (results travel as JSON bytes). Readiness is a health entry named
after each business service: NOT_SERVING until the service says its dependencies are up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service_runtime.callers import CallerCheck, CallerTokens, caller_token_interceptors
from service_runtime.metrics import MetricsInterceptor
from service_runtime.tracing import TracingClientInterceptor, TracingServerInterceptor

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# gRPC sets SO_REUSEPORT by default: a second server on a port in use would bind it too and
# silently take half its calls. Off, it fails to start instead.
SERVER_OPTIONS = [*MESSAGE_OPTIONS, ("grpc.so_reuseport", 0)]
# Reconnect quickly after a peer restarts (the default backoff grows to two minutes).
CHANNEL_OPTIONS = [
    *MESSAGE_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass
class GrpcService:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]

    async def set_ready(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.service_names:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        # Readiness drops first so load balancers stop sending, then in-flight RPCs drain.
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def create_grpc_server(
    address: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    service_label: str,
    callers: CallerTokens | None = None,
) -> GrpcService:
    """Create (not start) a server on ``address``; ``register`` adds servicers and returns the
    fully qualified names of the services it added. Port 0 picks a free port. With ``callers``,
    every call but health and reflection must carry a listed caller's token."""
    interceptors: list[grpc.aio.ServerInterceptor] = [
        MetricsInterceptor(service_label),
        TracingServerInterceptor(service_label),
    ]
    if callers is not None:
        interceptors.append(CallerCheck(callers, service_label))
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    names = tuple(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return GrpcService(server=server, port=port, health=health_servicer, service_names=names)


def insecure_channel(
    address: str, extra_options: Sequence[tuple[str, Any]] = (), caller_token: str | None = None
) -> grpc.aio.Channel:
    """A channel to a peer service: large-message options and trace-context propagation; with
    ``caller_token``, every call carries it (the peer's caller check)."""
    interceptors: list[grpc.aio.ClientInterceptor] = [TracingClientInterceptor()]
    if caller_token:
        interceptors += caller_token_interceptors(caller_token)
    return grpc.aio.insecure_channel(
        address, options=[*CHANNEL_OPTIONS, *extra_options], interceptors=interceptors
    )
