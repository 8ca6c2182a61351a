"""One lifecycle for every service: ``run_service`` starts a server, waits for SIGTERM (Kubernetes)
or SIGINT (Ctrl-C), then drains and stops it; ``Readiness`` keeps a gRPC service's readiness
entries in step with its dependencies.

Every service's factory returns its running-server object, ``<Name>Server`` (KeyVaultServer,
SchedulerServer, ...), which satisfies ``Server``: tests start one on port 0 and stop it, the
entry point hands it to ``run_service``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

from service_runtime.grpc_server import GrpcService

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Server(Protocol):
    """What ``run_service`` drives. ``stop(None)`` drains for the service's configured grace."""

    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self, grace_s: float | None = None) -> None: ...


async def run_service(server: Server, name: str) -> None:
    """Start ``server``, serve until SIGTERM/SIGINT, then drain and stop it. The signal handlers
    go in first, so a signal during a slow start still ends in a clean stop."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await server.start()
        log.info("serving", extra={"service": name, "port": server.port})
        await stop_requested.wait()
        log.info("shutting down", extra={"service": name})
        await server.stop()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    log.info("stopped", extra={"service": name})


Check = Callable[[], Awaitable[bool]]


class Readiness:
    """The readiness of a gRPC service, reported through its standard health servicer: NOT_SERVING
    until ``check`` (are the dependencies up?) says otherwise, then re-asked every
    ``interval_s``. A check that raises counts as not ready, its text the reason. Code that sees
    a dependency fail mid-request may ``set(False, reason)`` at once."""

    def __init__(self, name: str, check: Check, interval_s: float) -> None:
        self._name = name
        self._check = check
        self._interval_s = interval_s
        self._service: GrpcService | None = None
        self._ready: bool | None = None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.checked = asyncio.Event()  # set once the first check has answered

    @property
    def ready(self) -> bool:
        return bool(self._ready)

    def attach(self, service: GrpcService) -> None:
        """The server whose entries this drives (a servicer may need ``self`` before it exists)."""
        self._service = service

    async def set(self, ready: bool, reason: str = "") -> None:
        if ready != self._ready:
            if ready:
                log.info("ready", extra={"service": self._name})
            else:
                log.warning("not ready", extra={"service": self._name, "reason": reason})
        self._ready = ready
        if self._service is not None:
            await self._service.set_ready(ready)
        async with self._changed:
            self._changed.notify_all()

    async def refresh(self) -> bool:
        """Ask the check now and report its answer."""
        try:
            ready, reason = await self._check(), ""
        except Exception as exc:  # a dependency that cannot answer is not ready, whatever it raised
            ready, reason = False, str(exc) or type(exc).__name__
        await self.set(ready, reason or ("" if ready else "check failed"))
        self.checked.set()
        return ready

    async def wait_for(self, ready: bool) -> None:
        """Return once readiness is ``ready`` (for supervisors and tests)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._ready is ready)

    async def start(self, wait_first: bool = True) -> None:
        """Begin the loop; with ``wait_first`` the first check answers before this returns."""
        if wait_first:
            await self.refresh()
        self._task = asyncio.create_task(self._run(checked=wait_first), name=f"{self._name}-readiness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, checked: bool) -> None:
        if not checked:
            await self.refresh()
        while True:
            await asyncio.sleep(self._interval_s)
            await self.refresh()
