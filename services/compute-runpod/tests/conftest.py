"""compute-runpod on port 0, a real keyvault on the real PostgreSQL, and the fake RunPod
(devstack/fake_runpod/), which runs the real worker handler and gpu_core on the tiny model."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from compute_runpod.config import Settings
from devstack.fake_runpod import FakeRunPod
from keyvault.server import KeyVaultServer

sys.path.insert(0, str(Path(__file__).parent))

from runpod_testkit import (
    TEMPLATE_ID,
    Stack,
    hosted_account,
    running_keyvault,
    running_stack,
    service_settings,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeRunPod]:
    async with FakeRunPod(template_ids={TEMPLATE_ID}, stream_wait_s=1.0) as fake_runpod:
        yield fake_runpod


@pytest.fixture
async def keyvault_server(database_url: str) -> AsyncIterator[KeyVaultServer]:
    async with running_keyvault(database_url) as server:
        yield server


@pytest.fixture
def make_settings(fake: FakeRunPod, keyvault_server: KeyVaultServer) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return service_settings(fake, keyvault_server.port, **overrides)

    return make


@pytest.fixture
def service_overrides() -> dict[str, Any]:
    """Settings a test module or test changes (override this fixture)."""
    return {}


@pytest.fixture
async def stack(
    fake: FakeRunPod, keyvault_server: KeyVaultServer, service_overrides: dict[str, Any]
) -> AsyncIterator[Stack]:
    account = await hosted_account(fake)
    async with running_stack(fake, keyvault_server.port, account, **service_overrides) as running:
        yield running
