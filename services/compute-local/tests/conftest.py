"""Fixtures of the compute-local tests: the service on 127.0.0.1 port 0 and gRPC stubs to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from compute_local.config import Settings
from compute_local.server import ComputeLocalServer, start_service
from influence.v1 import compute_pb2_grpc

ServiceFactory = Callable[..., Awaitable[ComputeLocalServer]]


# Same factory-fixture shape as the gateway's make_gateway: each fills its own service's
# settings and stops what it started; the two test suites share no conftest.
@pytest.fixture
async def start_compute_local(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """Start compute-local (work dir under tmp_path unless given); every started one is stopped."""
    started: list[ComputeLocalServer] = []

    async def start(**overrides: Any) -> ComputeLocalServer:
        values: dict[str, Any] = {
            "compute_local_host": "127.0.0.1",
            "compute_local_port": 0,
            "compute_local_metrics_port": -1,
            "compute_local_torch_threads": 1,
            "compute_local_work_dir": tmp_path / "work",
            "compute_local_cancel_grace_s": 10.0,
            "compute_local_shutdown_grace_s": 1.0,
        }
        values.update(overrides)
        service = await start_service(Settings.load(**values), registry=CollectorRegistry())
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[ComputeLocalServer], compute_pb2_grpc.ComputeProviderStub]]:
    channels: list[grpc.aio.Channel] = []

    def make(service: ComputeLocalServer) -> compute_pb2_grpc.ComputeProviderStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        channels.append(channel)
        return compute_pb2_grpc.ComputeProviderStub(channel)

    yield make
    for channel in channels:
        await channel.close()
