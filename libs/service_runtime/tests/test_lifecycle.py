"""run_service and Readiness on a real grpc.aio server on loopback port 0: readiness through the
standard health servicer, and a graceful drain when the process gets SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service_runtime.grpc_server import create_grpc_server
from service_runtime.lifecycle import Readiness, run_service

SERVICE = "test.Slow"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE_S = 5.0

pytestmark = pytest.mark.timeout(60)


class Dependency:
    """What the test server depends on: up, down, or failing with an error."""

    def __init__(self) -> None:
        self.up = False
        self.error: Exception | None = None

    async def check(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.up


class SlowServer:
    """A real server in the shape every service has: ``Wait`` answers after ``release`` is set."""

    def __init__(self, dependency: Dependency, interval_s: float = 0.05) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.stopped_with: float | None = None

        async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.entered.set()
            await self.release.wait()
            return b"done:" + request

        def register(server: grpc.aio.Server) -> list[str]:
            handler = grpc.method_handlers_generic_handler(
                SERVICE, {"Wait": grpc.unary_unary_rpc_method_handler(wait)}
            )
            server.add_generic_rpc_handlers((handler,))
            return [SERVICE]

        self.grpc = create_grpc_server("127.0.0.1:0", register, "test")
        self.readiness = Readiness("test", dependency.check, interval_s)
        self.readiness.attach(self.grpc)

    @property
    def port(self) -> int:
        return self.grpc.port

    async def start(self) -> None:
        await self.grpc.server.start()
        await self.readiness.start()

    async def stop(self, grace_s: float | None = None) -> None:
        self.stopped_with = GRACE_S if grace_s is None else grace_s
        await self.readiness.stop()
        await self.grpc.stop(self.stopped_with)


async def health_of(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status


async def until_health(channel: grpc.aio.Channel, status: int) -> None:
    while await health_of(channel) != status:
        await asyncio.sleep(0.02)


async def test_readiness_follows_the_dependency_through_the_health_servicer() -> None:
    dependency = Dependency()
    server = SlowServer(dependency)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await health_of(channel) == NOT_SERVING  # checked once at start: down
            assert server.readiness.checked.is_set() and not server.readiness.ready
            dependency.up = True
            await asyncio.wait_for(until_health(channel, SERVING), 5)
            dependency.error = ConnectionRefusedError("connection refused")
            await asyncio.wait_for(until_health(channel, NOT_SERVING), 5)
            dependency.error = None
            await asyncio.wait_for(server.readiness.wait_for(True), 5)
            assert await health_of(channel) == SERVING
            # A request that sees the dependency fail flips readiness at once, between checks.
            dependency.up = False
            await server.readiness.set(False, reason="query failed")
            assert await health_of(channel) == NOT_SERVING
    finally:
        await server.stop(0)


async def test_sigterm_drains_in_flight_calls_then_stops() -> None:
    dependency = Dependency()
    dependency.up = True
    server = SlowServer(dependency)
    running = asyncio.create_task(run_service(server, "test"))
    while not server.readiness.ready:
        assert not running.done(), running
        await asyncio.sleep(0.02)
    address = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        assert (await watch.read()).status == SERVING
        call = channel.unary_unary(f"/{SERVICE}/Wait")(b"job-1")
        await asyncio.wait_for(server.entered.wait(), 5)

        os.kill(os.getpid(), signal.SIGTERM)
        # Readiness drops first, so load balancers stop sending new calls...
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        watch.cancel()
        assert server.stopped_with == GRACE_S  # run_service stops with the service's own grace
        # ...new calls are refused while the one in flight may finish...
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(f"/{SERVICE}/Wait")(b"job-2", timeout=2)
        assert not running.done()
        started = time.monotonic()
        server.release.set()
        assert await asyncio.wait_for(call, 5) == b"done:job-1"
        # ...and the server is gone as soon as nothing is left in flight, well before the grace.
        await asyncio.wait_for(running, GRACE_S + 5)
        assert time.monotonic() - started < GRACE_S / 2
    loop = asyncio.get_running_loop()
    assert not loop.remove_signal_handler(signal.SIGTERM)  # run_service took its handler away
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_of(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_signal_during_a_slow_start_still_ends_in_a_clean_stop() -> None:
    dependency = Dependency()
    server = SlowServer(dependency)
    gate = asyncio.Event()
    check = dependency.check

    async def slow_first_check() -> bool:
        await gate.wait()
        return await check()

    server.readiness = Readiness("test", slow_first_check, 0.05)
    server.readiness.attach(server.grpc)
    running = asyncio.create_task(run_service(server, "test"))
    await asyncio.sleep(0.1)
    assert not running.done()
    os.kill(os.getpid(), signal.SIGINT)  # would be KeyboardInterrupt without run_service's handler
    gate.set()
    await asyncio.wait_for(running, GRACE_S + 5)
    assert server.stopped_with == GRACE_S
