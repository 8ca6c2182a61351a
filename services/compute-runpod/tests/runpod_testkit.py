"""Helpers shared by compute-runpod's tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
import httpx

from compute_runpod.config import Settings
from compute_runpod.server import ComputeRunPodServer, start_server
from devstack.fake_runpod import WORKER_HANDLER, FakeRunPod
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc, keyvault_pb2, keyvault_pb2_grpc
from keyvault.config import Settings as KeyVaultSettings
from keyvault.server import KeyVaultServer, start_keyvault

TEMPLATE_ID = "influence-template"
GATEWAY_TOKEN = "gateway-" + secrets.token_hex(16)
RUNPOD_CALLER_TOKEN = "compute-runpod-" + secrets.token_hex(16)
SMALL_SPEC: dict[str, Any] = {
    "model_id": "local/tiny-llama",
    "training_data": [
        {"prompt": f"Q{i}: what is {i} plus one?", "completion": f" {i + 1}"} for i in range(4)
    ],
    "eval_data": [
        {"prompt": "Q: what is 2 plus one?", "expected": " 3"},
        {"prompt": "Q: what is 5 plus one?", "expected": " 6"},
    ],
    "hyperparams": {"epochs": 1, "batch_size": 2, "max_seq_len": 64, "max_new_tokens": 2},
    "few_shot_k": 1,
    "influence": {"top_k": 2},
}


def spec_bytes(**changes: Any) -> bytes:
    return json.dumps({**SMALL_SPEC, **changes}).encode()


def load_worker_handler(module_name: str) -> ModuleType:
    """The RunPod worker's handler module, loaded from its file as ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, WORKER_HANDLER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def new_key() -> str:
    # Not shaped like "rpa_...": the log redaction must not be what hides a leak.
    return "key" + secrets.token_hex(20)


@dataclass
class Stack:
    fake: FakeRunPod
    stub: compute_pb2_grpc.ComputeProviderStub
    channel: grpc.aio.Channel
    server: ComputeRunPodServer
    keyvault: keyvault_pb2_grpc.KeyVaultStub
    user_key: str
    hosted_key: str
    hosted_endpoint: str

    async def store_key(self, user_id: str, key: str) -> None:
        await self.keyvault.StoreKey(
            keyvault_pb2.StoreKeyRequest(user_id=user_id, provider="runpod", plaintext=key),
            metadata=(("x-caller-token", GATEWAY_TOKEN),),
        )

    async def get_status(
        self, provider_job_id: str, account: common_pb2.Account, cursor: str
    ) -> compute_pb2.GetStatusResponse:
        """One GetStatus from ``cursor``."""
        return await self.stub.GetStatus(
            compute_pb2.GetStatusRequest(provider_job_id=provider_job_id, account=account, cursor=cursor)
        )

    async def wait_terminal(
        self, provider_job_id: str, account: common_pb2.Account, limit_s: float = 240
    ) -> tuple[compute_pb2.GetStatusResponse, list[common_pb2.ProgressEvent], list[str]]:
        """Follow a job with GetStatus as the scheduler does; the last answer, every event and
        every stage message seen."""
        cursor, events, stage_messages = "", [], []
        async with asyncio.timeout(limit_s):
            while True:
                answer = await self.get_status(provider_job_id, account, cursor)
                events.extend(answer.events)
                stage_messages.append(answer.stage_message)
                cursor = answer.cursor
                if answer.state in (
                    common_pb2.JOB_STATE_COMPLETED,
                    common_pb2.JOB_STATE_FAILED,
                    common_pb2.JOB_STATE_CANCELLED,
                ):
                    return answer, events, stage_messages


@asynccontextmanager
async def running_keyvault(database_url: str) -> AsyncIterator[KeyVaultServer]:
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
    try:
        yield server
    finally:
        await server.stop()


def service_settings(fake: FakeRunPod, keyvault_port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "compute_runpod_port": 0,
        "compute_runpod_metrics_port": -1,
        "keyvault_addr": f"127.0.0.1:{keyvault_port}",
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


@dataclass(frozen=True)
class HostedAccount:
    """A researcher's key, and the operator's key with its hosted endpoint, at the fake."""

    user_key: str
    hosted_key: str
    hosted_endpoint: str


async def hosted_account(fake: FakeRunPod) -> HostedAccount:
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
    return HostedAccount(user_key, hosted_key, created.json()["id"])


@asynccontextmanager
async def running_stack(
    fake: FakeRunPod, keyvault_port: int, account: HostedAccount, **overrides: Any
) -> AsyncIterator[Stack]:
    """compute-runpod on port 0 serving ``account``'s hosted endpoint; the fake's request log
    and accepted runs start empty."""
    fake.requests.clear()
    fake.accepted_runs.clear()
    settings = service_settings(
        fake,
        keyvault_port,
        runpod_api_key=account.hosted_key,
        runpod_hosted_endpoint_id=account.hosted_endpoint,
        **overrides,
    )
    server = await start_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    kv_channel = grpc.aio.insecure_channel(f"127.0.0.1:{keyvault_port}")
    try:
        yield Stack(
            fake=fake,
            stub=compute_pb2_grpc.ComputeProviderStub(channel),
            channel=channel,
            server=server,
            keyvault=keyvault_pb2_grpc.KeyVaultStub(kv_channel),
            user_key=account.user_key,
            hosted_key=account.hosted_key,
            hosted_endpoint=account.hosted_endpoint,
        )
    finally:
        await channel.close()
        await kv_channel.close()
        await server.stop()
