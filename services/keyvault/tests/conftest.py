"""A real keyvault server (port 0) on a fresh real PostgreSQL database, and clients for it."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from influence.v1 import keyvault_pb2_grpc
from keyvault.config import Settings
from keyvault.server import KeyVaultServer, start_keyvault

GATEWAY_TOKEN = "gateway-token-" + "g" * 24
RUNPOD_TOKEN = "compute-runpod-token-" + "r" * 24
MODAL_TOKEN = "compute-modal-token-" + "m" * 24
CALLER_TOKENS = f"gateway={GATEWAY_TOKEN},compute-runpod={RUNPOD_TOKEN},compute-modal={MODAL_TOKEN}"


Metadata = tuple[tuple[str, str], ...]


def new_master_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def new_secret() -> Callable[[], str]:
    """Makes a fresh master key (32 random bytes, base64)."""
    return new_master_key


@pytest.fixture
def api_key() -> str:
    # Deliberately not shaped like a RunPod key, so the log redaction patterns cannot hide a
    # leak: these tests check that the key is never written, not that it is scrubbed.
    return "sk" + secrets.token_hex(20)


@pytest.fixture
def gateway() -> Metadata:
    """Call metadata of the gateway (may store, read and delete; may not reveal)."""
    return (("x-caller-token", GATEWAY_TOKEN),)


@pytest.fixture
def compute_runpod() -> Metadata:
    """Call metadata of compute-runpod (may reveal RunPod keys and Hugging Face tokens)."""
    return (("x-caller-token", RUNPOD_TOKEN),)


@pytest.fixture
def compute_modal() -> Metadata:
    """Call metadata of compute-modal (may reveal Hugging Face tokens only)."""
    return (("x-caller-token", MODAL_TOKEN),)


@pytest.fixture
def make_settings(database_url: str) -> Callable[..., Settings]:
    def make(secret: str, old_secrets: str = "") -> Settings:
        return Settings(
            database_url=database_url,
            runpod_key_encryption_secret=secret,
            runpod_key_encryption_old_secrets=old_secrets,
            keyvault_caller_tokens=CALLER_TOKENS,
            keyvault_host="127.0.0.1",
            keyvault_port=0,
            keyvault_metrics_port=-1,
            keyvault_readiness_interval_s=0.05,
        )

    return make


@pytest.fixture
def master_key() -> str:
    return new_master_key()


@pytest.fixture
def caller_tokens() -> str:
    return CALLER_TOKENS


@pytest.fixture
async def keyvault(make_settings: Callable[..., Settings], master_key: str) -> AsyncIterator[KeyVaultServer]:
    server = await start_keyvault(make_settings(master_key))
    yield server
    await server.stop()


@pytest.fixture
async def channel(keyvault: KeyVaultServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{keyvault.port}") as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> keyvault_pb2_grpc.KeyVaultStub:
    return keyvault_pb2_grpc.KeyVaultStub(channel)
