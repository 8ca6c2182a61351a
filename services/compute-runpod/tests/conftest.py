"""compute-runpod on port 0, a real keyvault on the real PostgreSQL, and the fake RunPod
(devstack/fake_runpod/), which runs the real worker handler and gpu_core on the tiny model."""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from compute_runpod.config import Settings
from compute_runpod.server import start_server
from devstack.fake_runpod import FakeRunPod
from influence.v1 import compute_pb2_grpc, keyvault_pb2_grpc
from keyvault.config import Settings as KeyVaultSettings
from keyvault.server import KeyVaultServer, start_keyvault

sys.path.insert(0, str(Path(__file__).parent))

from runpod_testkit import (
    GATEWAY_TOKEN,
    RUNPOD_CALLER_TOKEN,
    TEMPLATE_ID,
    Stack,
    new_key,
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeRunPod]:
    async with FakeRunPod(template_ids={TEMPLATE_ID}, stream_wait_s=1.0) as fake_runpod:
        yield fake_runpod


@pytest.fixture
async def keyvault_server(database_url: str) -> AsyncIterator[KeyVaultServer]:
    server = await start_keyvault(
        KeyVaultSettings(
            database_url=database_url,
            runpod_key_encryption_secret=base64.b64encode(os.urandom(32)).decode(),
            keyvault_caller_tokens=f"gateway={GATEWAY_TOKEN},compute-runpod={RUNPOD_CALLER_TOKEN}",
            keyvault_host="127.0.0.1",
            keyvault_port=0,
            keyvault_metrics_port=-1,
        )
    )
    yield server
    await server.stop()


@pytest.fixture
def make_settings(fake: FakeRunPod, keyvault_server: KeyVaultServer) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "compute_runpod_port": 0,
            "compute_runpod_metrics_port": -1,
            "keyvault_addr": f"127.0.0.1:{keyvault_server.port}",
            "keyvault_token": RUNPOD_CALLER_TOKEN,
            "runpod_rest_base_url": f"{fake.url}/v2",
            "runpod_job_base_url": f"{fake.url}/v2",
            "runpod_graphql_url": f"{fake.url}/graphql",
            "runpod_template_id": TEMPLATE_ID,
            "runpod_retry_base_s": 0.05,
            "runpod_max_attempts": 4,
            "runpod_http_timeout_s": 10,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def service_overrides() -> dict[str, Any]:
    """Settings a test module or test changes (override this fixture)."""
    return {}


@pytest.fixture
async def stack(
    fake: FakeRunPod,
    keyvault_server: KeyVaultServer,
    make_settings: Callable[..., Settings],
    service_overrides: dict[str, Any],
) -> AsyncIterator[Stack]:
    user_key, hosted_key = new_key(), new_key()
    fake.add_key(user_key, balance=50.0)
    fake.add_key(hosted_key, balance=1000.0)
    async with httpx.AsyncClient() as http:
        created = await http.post(
            f"{fake.url}/v2/serverless",
            headers={"Authorization": f"Bearer {hosted_key}"},
            json={
                "name": "hosted",
                "type": "QUEUE",
                "templateId": TEMPLATE_ID,
                "gpu": {"pools": ["AMPERE_80"]},
                "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
            },
        )
    hosted_endpoint = created.json()["id"]
    fake.requests.clear()
    settings = make_settings(
        runpod_api_key=hosted_key, runpod_hosted_endpoint_id=hosted_endpoint, **service_overrides
    )
    server = await start_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    kv_channel = grpc.aio.insecure_channel(f"127.0.0.1:{keyvault_server.port}")
    yield Stack(
        fake=fake,
        stub=compute_pb2_grpc.ComputeProviderStub(channel),
        channel=channel,
        server=server,
        keyvault=keyvault_pb2_grpc.KeyVaultStub(kv_channel),
        user_key=user_key,
        hosted_key=hosted_key,
        hosted_endpoint=hosted_endpoint,
    )
    await channel.close()
    await kv_channel.close()
    await server.stop()
