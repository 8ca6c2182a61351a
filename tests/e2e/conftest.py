"""Fixtures the end-to-end modules share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.stack import FakeRunPodProcess


@pytest.fixture(scope="module")
def fake(request: pytest.FixtureRequest) -> Iterator[FakeRunPodProcess]:
    """The fake RunPod as its own process, with the module's ``RUNPOD_KEY`` funded ($500)."""
    process = FakeRunPodProcess.start()
    process.control("POST", "keys", key=request.module.RUNPOD_KEY, balance=500.0)
    yield process
    process.stop()
