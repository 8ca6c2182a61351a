"""Serving the app with uvicorn: ``serve`` for the process, ``start_gateway`` for tests (port 0)."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

import uvicorn

from gateway.app import create_app
from gateway.config import Settings

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10
_BACKLOG = 2048


@dataclass
class RunningGateway:
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


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


def _uvicorn_server(settings: Settings) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings),
        log_config=None,  # keep the process's JSON logging
        access_log=False,  # RequestMetrics counts requests; no per-request log lines
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        lifespan="on",
    )
    return uvicorn.Server(config)


async def start_gateway(settings: Settings) -> RunningGateway:
    """Serve in the running loop on ``GATEWAY_HOST``:``GATEWAY_PORT`` (0 picks a free port).
    The socket is bound before this returns, so clients may connect at once: their
    connections wait in the listen backlog until the app has started."""
    sock = _bound_socket(settings.gateway_host, settings.gateway_port)
    port = sock.getsockname()[1]
    server = _uvicorn_server(settings)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    return RunningGateway(server=server, task=task, port=port)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT (uvicorn handles the signals and drains open requests)."""
    sock = _bound_socket(settings.gateway_host, settings.gateway_port)
    log.info("listening", extra={"host": settings.gateway_host, "port": sock.getsockname()[1]})
    await _uvicorn_server(settings).serve(sockets=[sock])
