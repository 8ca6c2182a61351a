"""Helpers shared by compute-runpod's tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import secrets
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc

from compute_runpod.server import ComputeRunPodServer
from devstack.fake_runpod import WORKER_HANDLER, FakeRunPod
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc, keyvault_pb2, keyvault_pb2_grpc

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
