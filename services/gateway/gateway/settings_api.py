"""Compute settings and the user's RunPod API key (bring your own key).

The key is a SecretStr from the moment the body is parsed: it goes to the scheduler (to check
it with RunPod) and to keyvault (to encrypt it), and nowhere else; answers show its last 4.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter
from influence.v1 import keyvault_pb2, scheduler_pb2
from influence_client.models import ComputeSettings, RunpodKeyDeleted, RunpodKeySaved, RunpodKeyStatus
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from gateway.deps import Clients, CurrentUser, State, Trace, require_text
from gateway.responses import ERRORS, error
from gateway.upstream import ApiError, Upstreams, keyvault_errors, scheduler_errors
from gateway.views import compute_settings_view, key_info_view

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/settings", tags=["settings"], responses=ERRORS)

RUNPOD = "runpod"
SCHEDULER_DOWN = "The scheduler is unavailable; your settings were not changed, try again"
KEYVAULT_DOWN = "The key vault is unavailable; try again in a moment"
NO_RUNPOD_KEY = "No RunPod API key is stored: add one (POST /api/settings/runpod-key) before choosing runpod"
_FUNDS_WORDS = ("balance", "credit", "fund")


class ComputeBackendChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: Literal["hosted", "runpod"]


class RunpodKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_key: Annotated[SecretStr, Field(description="Your RunPod API key; only its last 4 are ever shown")]

    @field_validator("api_key")
    @classmethod
    def _plausible(cls, value: SecretStr) -> SecretStr:
        text = require_text(value.get_secret_value()).strip()
        if not text:
            raise ValueError("is empty; paste your RunPod API key")
        if len(text) > 512 or any(ch.isspace() for ch in text):
            raise ValueError("does not look like a RunPod API key (no spaces, at most 512 characters)")
        return SecretStr(text)


async def _compute_settings(clients: Upstreams, user: str, trace: Trace) -> scheduler_pb2.ComputeSettings:
    with scheduler_errors("The scheduler is unavailable; try again in a moment"):
        return await clients.scheduler.GetComputeSettings(
            scheduler_pb2.GetComputeSettingsRequest(user_id=user),
            metadata=trace,
            timeout=clients.timeout_s,
        )


async def _set_backend(
    clients: Upstreams, user: str, backend: str, trace: Trace
) -> scheduler_pb2.ComputeSettings:
    with scheduler_errors(SCHEDULER_DOWN):
        return await clients.scheduler.SetComputeBackend(
            scheduler_pb2.SetComputeBackendRequest(user_id=user, backend=backend),
            metadata=trace,
            timeout=clients.timeout_s,
        )


async def _stored_key(clients: Upstreams, user: str, trace: Trace) -> keyvault_pb2.KeyInfo | None:
    try:
        with keyvault_errors(KEYVAULT_DOWN):
            return await clients.keyvault.GetKeyInfo(
                keyvault_pb2.KeyRef(user_id=user, provider=RUNPOD),
                metadata=clients.keyvault_call_metadata(trace),
                timeout=clients.timeout_s,
            )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


@router.get("/compute", summary="The caller's compute backend", response_model=ComputeSettings)
async def get_compute(user: CurrentUser, clients: Clients, trace: Trace) -> dict[str, Any]:
    return compute_settings_view(await _compute_settings(clients, user, trace))


@router.put(
    "/compute",
    summary="Choose the compute backend",
    response_model=ComputeSettings,
    responses={409: error("runpod chosen with no stored key")},
)
async def put_compute(
    choice: ComputeBackendChoice, user: CurrentUser, clients: Clients, trace: Trace
) -> dict[str, Any]:
    if choice.backend == RUNPOD and await _stored_key(clients, user, trace) is None:
        raise ApiError(409, NO_RUNPOD_KEY)
    return compute_settings_view(await _set_backend(clients, user, choice.backend, trace))


@router.post(
    "/runpod-key",
    summary="Verify, encrypt and store a RunPod API key; switch to runpod",
    response_model=RunpodKeySaved,
    responses={
        400: error("RunPod rejected the key"),
        402: error("The RunPod account has no funds"),
        403: error("The key lacks a needed permission"),
    },
)
async def save_runpod_key(
    body: RunpodKeyRequest, user: CurrentUser, clients: Clients, trace: Trace
) -> dict[str, Any]:
    api_key = body.api_key.get_secret_value()
    with scheduler_errors("The scheduler is unavailable; your key was not saved, try again"):
        verdict = await clients.scheduler.VerifyProviderKey(
            scheduler_pb2.VerifyProviderKeyRequest(user_id=user, provider=RUNPOD, api_key=api_key),
            metadata=trace,
            timeout=clients.timeout_s,
        )
    if not verdict.valid:
        raise ApiError(_rejection_status(verdict.message), verdict.message or "RunPod rejected the key")
    with keyvault_errors("The key vault is unavailable; your key was not saved, try again"):
        info = await clients.keyvault.StoreKey(
            keyvault_pb2.StoreKeyRequest(user_id=user, provider=RUNPOD, plaintext=api_key, verified=True),
            metadata=clients.keyvault_call_metadata(trace),
            timeout=clients.timeout_s,
        )
    settings = await _set_backend(clients, user, RUNPOD, trace)
    log.info("runpod key saved", extra={"user_id": user, "last4": info.last4})
    return {
        "last4": info.last4,
        "backend": settings.backend,
        "endpoint_status": settings.endpoint_status or "none",
        # Negative: RunPod could not tell the balance; the message says so and what still holds.
        "balance_usd": verdict.balance_usd if verdict.balance_usd >= 0 else None,
        "message": verdict.message,
    }


def _rejection_status(message: str) -> int:
    """The scheduler answers a refused key with valid=false and RunPod's plain message: 402 when
    the account cannot pay, 403 when the key lacks a permission, else 400 (key refused)."""
    lowered = message.lower()
    if any(word in lowered for word in _FUNDS_WORDS):
        return 402
    if "permission" in lowered:
        return 403
    return 400


@router.get(
    "/runpod-key",
    summary="Whether a RunPod key is stored, and the endpoint's state",
    response_model=RunpodKeyStatus,
)
async def get_runpod_key(
    user: CurrentUser, clients: Clients, trace: Trace, state: State
) -> dict[str, Any]:
    settings = await _compute_settings(clients, user, trace)
    info = await _stored_key(clients, user, trace)
    return {
        **compute_settings_view(settings), **key_info_view(info),
        "runpod_simulated": state.settings.gateway_runpod_simulated,
    }


@router.delete(
    "/runpod-key",
    summary="Remove the RunPod key and return to the hosted backend",
    response_model=RunpodKeyDeleted,
)
async def delete_runpod_key(user: CurrentUser, clients: Clients, trace: Trace) -> dict[str, Any]:
    # Back to hosted first, so no job is routed to runpod in the moment the key is gone.
    settings = await _set_backend(clients, user, "hosted", trace)
    try:
        with keyvault_errors("The key vault is unavailable; your key was not removed, try again"):
            answer = await clients.keyvault.DeleteKey(
                keyvault_pb2.KeyRef(user_id=user, provider=RUNPOD),
                metadata=clients.keyvault_call_metadata(trace),
                timeout=clients.timeout_s,
            )
        deleted = answer.deleted
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        deleted = False
    return {**compute_settings_view(settings), "has_key": False, "deleted": deleted}
