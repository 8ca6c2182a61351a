"""The test stack's free ports: a port another process takes before a service binds it costs a
retry on new ports, not a failed test module (CI once lost a browser module to this)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from devstack.stack import Stack, _ephemeral_port_range, free_port, holds_listening_port

pytestmark = pytest.mark.e2e


def test_free_ports_are_never_ones_the_kernel_hands_to_outgoing_connections() -> None:
    low, high = _ephemeral_port_range()
    ports = {free_port() for _ in range(50)}
    assert all(not low <= port <= high for port in ports), sorted(ports)
    assert len(ports) > 40  # random, so two stacks in two test workers rarely pick the same


@pytest.fixture
def keyvault_stack() -> Iterator[Stack]:
    """A stack of keyvault alone, its ports planned but nothing started yet."""
    with tempfile.TemporaryDirectory(prefix="stack-ports-") as tmp:
        os.chmod(tmp, 0o755)  # pgserver runs postgres as its own user when we are root
        yield Stack(data_dir=Path(tmp), services=("keyvault",))


def test_a_service_whose_ports_were_taken_starts_on_new_ones(keyvault_stack: Stack) -> None:
    stack = keyvault_stack
    taken = [stack.ports["keyvault"], stack.metrics_ports["keyvault"]]
    squatters = []
    for port in taken:
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        squatters.append(squatter)
    try:
        with stack:
            assert stack.ports["keyvault"] not in taken
            assert stack.metrics_ports["keyvault"] not in taken
            assert stack.running["keyvault"].process.poll() is None
            log = stack.log_text("keyvault")
    finally:
        for squatter in squatters:
            squatter.close()
    # The first attempt really did lose its port.
    assert "already in use" in log.lower() or "failed to bind" in log.lower(), log[-2000:]


def test_a_health_probe_answered_by_another_process_is_not_readiness(keyvault_stack: Stack) -> None:
    """Another stack's keyvault on the port this one planned answers its health probe SERVING;
    the stack must see that its own keyvault lost the port (CI once ran a browser module against
    a port some other process answered on)."""
    stack = keyvault_stack
    planned = stack.ports["keyvault"]
    impostor = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("influence.v1.KeyVault", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, impostor)
    assert impostor.add_insecure_port(f"127.0.0.1:{planned}") == planned
    impostor.start()
    try:
        assert holds_listening_port(os.getpid(), planned) is True
        with stack:
            keyvault = stack.running["keyvault"]
            assert stack.ports["keyvault"] != planned
            assert keyvault.process.poll() is None
            assert holds_listening_port(keyvault.process.pid, stack.ports["keyvault"]) is True
            log = stack.log_text("keyvault")
    finally:
        impostor.stop(0)
    assert "failed to bind" in log.lower(), log[-2000:]
