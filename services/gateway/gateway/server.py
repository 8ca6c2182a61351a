"""Serving the app with uvicorn: ``serve`` for the process, ``start_gateway`` for tests (port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from gateway.app import create_app
from gateway.config import Settings
from service_runtime.lifecycle import run_service
from service_runtime.metrics import MetricsServer, start_metrics_server

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10
_BACKLOG = 2048


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: run_service handles SIGTERM/SIGINT for every
    service and then stops this server like any other."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayServer:
    """The gateway's HTTP server (uvicorn in the running loop) on a socket bound at ``start``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        app = create_app(settings)
        self.metrics_registry = app.state.metrics_registry
        self.metrics_server: MetricsServer | None = None
        self.server = _Uvicorn(
            uvicorn.Config(
                app,
                log_config=None,  # keep the process's JSON logging
                access_log=False,  # RequestMetrics counts requests; no per-request log lines
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                lifespan="on",
            )
        )
        self.port = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Bind ``GATEWAY_HOST``:``GATEWAY_PORT`` (0 picks a free port) and serve. The socket is
        bound before this returns, so clients may connect at once: their connections wait in
        the listen backlog until the app has started."""
        sock = _bound_socket(self.settings.gateway_host, self.settings.gateway_port)
        self.port = sock.getsockname()[1]
        self.metrics_server = start_metrics_server(
            self.settings.gateway_host, self.settings.gateway_metrics_port, self.metrics_registry
        )
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]), name="gateway-http")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let open requests finish (up to the grace), close."""
        if grace_s is not None:
            # uvicorn annotates an int but only waits on it: a fraction of a second is kept
            self.server.config.timeout_graceful_shutdown = grace_s  # type: ignore[assignment]
        self.server.should_exit = True
        if self._task is not None:
            await self._task
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None


def _bound_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (GATEWAY_HOST/GATEWAY_PORT): {exc}") from None
    sock.listen(_BACKLOG)
    return sock


# Same shape as compute-runpod's start_server/serve: each service's entry points name its own server
# class and service name around service_runtime.lifecycle, which already holds the shared logic.
async def start_gateway(settings: Settings) -> GatewayServer:
    """Serve in the running loop (tests pass port 0 and read ``.port`` / ``.url``)."""
    server = GatewayServer(settings)
    await server.start()
    return server


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain open requests and stop (service_runtime.lifecycle)."""
    await run_service(GatewayServer(settings), "gateway")
