"""The test stack's free ports: a port another process takes before a service binds it costs a
retry on new ports, not a failed test module (CI once lost a browser module to this)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from devstack.stack import Stack, _ephemeral_port_range, free_port

pytestmark = pytest.mark.e2e


def test_free_ports_are_never_ones_the_kernel_hands_to_outgoing_connections() -> None:
    low, high = _ephemeral_port_range()
    ports = {free_port() for _ in range(50)}
    assert all(not low <= port <= high for port in ports), sorted(ports)
    assert len(ports) > 40  # random, so two stacks in two test workers rarely pick the same


def test_a_service_whose_ports_were_taken_starts_on_new_ones() -> None:
    with tempfile.TemporaryDirectory(prefix="stack-ports-") as tmp:
        os.chmod(tmp, 0o755)  # pgserver runs postgres as its own user when we are root
        stack = Stack(data_dir=Path(tmp), services=("keyvault",))
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
