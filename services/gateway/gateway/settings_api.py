"""Compute settings, the user's RunPod API key (bring your own key) and their Hugging Face token.

The key is a SecretStr from the moment the body is parsed: it goes to the scheduler (to check
it with RunPod) and to keyvault (to encrypt it), and nowhere else; answers show its last 4. The
Hugging Face token goes to keyvault only (it cannot be checked offline); compute-runpod and
compute-modal reveal it per job and pass it to the worker, which loads gated models with it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from cost_model import lookup_model
from gateway.deps import CurrentUser, KeyVault, Scheduler, State, require_text
from gateway.responses import ERRORS, error
from gateway.upstream import NOT_FOUND, ApiError, KeyVaultClient, SchedulerClient
from gateway.views import compute_settings_view, endpoint_view, key_info_view
from influence.v1 import common_pb2, keyvault_pb2, scheduler_pb2
from influence_client.models import (
    ComputeSettings,
    HfTokenDeleted,
    HfTokenStatus,
    RunpodEndpoint,
    RunpodKeyDeleted,
    RunpodKeySaved,
    RunpodKeyStatus,
)
from service_runtime.keyvault import HUGGINGFACE

log = logging.getLogger(__name__)
# Routes declared like jobs_api's (see the note there on their shared shape).
router = APIRouter(prefix="/api/settings", tags=["settings"], responses=ERRORS)

RUNPOD = "runpod"
SETTINGS_NOT_CHANGED = "The scheduler is unavailable; your settings were not changed, try again"
KEY_NOT_REMOVED = "The scheduler is unavailable; your key was not removed, try again"
KEY_NOT_REPLACED = "The scheduler is unavailable; your key was not replaced, try again"
ENDPOINT_NOT_DELETED = "The scheduler is unavailable; your RunPod endpoint was not deleted, try again"
NO_RUNPOD_KEY = "No RunPod API key is stored: add one (POST /api/settings/runpod-key) before choosing runpod"
# The one mapping of why RunPod refused a key to an HTTP answer; a refusal without a reason is
# the key's (400).
_REFUSAL_STATUS = {
    common_pb2.KEY_FAILURE_INVALID: 400,
    common_pb2.KEY_FAILURE_NO_FUNDS: 402,
    common_pb2.KEY_FAILURE_NO_PERMISSION: 403,
    common_pb2.KEY_FAILURE_UNREACHABLE: 503,
}


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
        # The key travels in an HTTP header to RunPod: printable ASCII only (the fuzzer's
        # non-ASCII keys failed there, a 502 from the scheduler, instead of being refused here).
        if len(text) > 512 or not all("!" <= ch <= "~" for ch in text):
            raise ValueError(
                "does not look like a RunPod API key (printable ASCII letters, digits and symbols, "
                "no spaces, at most 512 characters)"
            )
        return SecretStr(text)


class HfTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: Annotated[
        SecretStr, Field(description="Your Hugging Face access token (read scope); only its last 4 are shown")
    ]

    @field_validator("token")
    @classmethod
    def _plausible(cls, value: SecretStr) -> SecretStr:
        text = require_text(value.get_secret_value()).strip()
        if not text:
            raise ValueError("is empty; paste your Hugging Face access token (hf_...)")
        if len(text) > 512 or any(ch.isspace() for ch in text):
            raise ValueError("does not look like a Hugging Face token (no spaces, at most 512 characters)")
        return SecretStr(text)


def _hf_token(user: str) -> keyvault_pb2.KeyRef:
    return keyvault_pb2.KeyRef(user_id=user, provider=HUGGINGFACE)


def _runpod_key(user: str) -> keyvault_pb2.KeyRef:
    return keyvault_pb2.KeyRef(user_id=user, provider=RUNPOD)


@router.get("/compute", summary="The caller's compute backend", response_model=ComputeSettings)
async def get_compute(user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    return compute_settings_view(await scheduler.compute_settings(user))


@router.put(
    "/compute",
    summary="Choose the compute backend",
    response_model=ComputeSettings,
    responses={409: error("runpod chosen with no stored key")},
)
async def put_compute(
    choice: ComputeBackendChoice, user: CurrentUser, scheduler: Scheduler, keyvault: KeyVault
) -> dict[str, Any]:
    if choice.backend == RUNPOD and await keyvault.key_info(_runpod_key(user)) is None:
        raise ApiError(409, NO_RUNPOD_KEY)
    return compute_settings_view(await scheduler.set_backend(user, choice.backend, SETTINGS_NOT_CHANGED))


@router.post(
    "/runpod-key",
    summary="Verify, encrypt and store a RunPod API key; switch to runpod",
    response_model=RunpodKeySaved,
    responses={
        400: error("RunPod rejected the key"),
        402: error("The RunPod account has no funds"),
        403: error("The key lacks a needed permission"),
        409: error("Replacing a key while jobs run on RunPod; name them, or pass cancel_jobs=true"),
        503: error("RunPod (or a service behind the gateway) could not be reached"),
    },
)
async def save_runpod_key(
    body: RunpodKeyRequest,
    user: CurrentUser,
    scheduler: Scheduler,
    keyvault: KeyVault,
    cancel_jobs: Annotated[
        bool,
        Query(description="Replacing a key: cancel the jobs still running on RunPod first (old key)"),
    ] = False,
) -> dict[str, Any]:
    api_key = body.api_key.get_secret_value()
    verdict = await scheduler.verify_provider_key(
        scheduler_pb2.VerifyProviderKeyRequest(user_id=user, provider=RUNPOD, api_key=api_key),
        "The scheduler is unavailable; your key was not saved, try again",
    )
    if not verdict.valid:
        status = _REFUSAL_STATUS.get(verdict.failure, 400)
        raise ApiError(status, verdict.message or "RunPod rejected the key")
    key_not_saved = "The key vault is unavailable; your key was not saved, try again"
    if await keyvault.key_info(_runpod_key(user), key_not_saved) is not None:
        await _settle_before_replacing(user, scheduler, cancel_jobs)
    info = await keyvault.store_key(
        keyvault_pb2.StoreKeyRequest(user_id=user, provider=RUNPOD, plaintext=api_key, verified=True),
        key_not_saved,
    )
    settings = await scheduler.set_backend(user, RUNPOD, SETTINGS_NOT_CHANGED)
    log.info("runpod key saved", extra={"user_id": user, "last4": info.last4})
    return {
        "last4": info.last4,
        "backend": settings.backend,
        "endpoint_status": settings.endpoint_status or "none",
        # Negative: RunPod could not tell the balance; the message says so and what still holds.
        "balance_usd": verdict.balance_usd if verdict.balance_usd >= 0 else None,
        "message": verdict.message,
    }


@router.get(
    "/runpod-key",
    summary="Whether a RunPod key is stored, and the endpoint's state",
    response_model=RunpodKeyStatus,
)
async def get_runpod_key(
    user: CurrentUser, scheduler: Scheduler, keyvault: KeyVault, state: State
) -> dict[str, Any]:
    settings = await scheduler.compute_settings(user)
    info = await keyvault.key_info(_runpod_key(user))
    return {
        **compute_settings_view(settings),
        **key_info_view(info),
        "runpod_simulated": state.settings.gateway_runpod_simulated,
    }


@router.delete(
    "/runpod-key",
    summary="Remove the RunPod key and return to the hosted backend",
    response_model=RunpodKeyDeleted,
    responses={409: error("Jobs still run on the RunPod account; name them, or pass cancel_jobs=true")},
)
async def delete_runpod_key(
    user: CurrentUser,
    scheduler: Scheduler,
    keyvault: KeyVault,
    cancel_jobs: Annotated[
        bool, Query(description="Cancel the jobs still running on RunPod first (with this key)")
    ] = False,
    delete_endpoint: Annotated[
        bool,
        Query(
            description="Also delete the dashboard's serverless endpoint on your RunPod account "
            "(else it stays there, idle and unbilled, until you delete it in RunPod's console)"
        ),
    ] = False,
) -> dict[str, Any]:
    # Back to hosted first, so no job is routed to runpod in the moment the key is gone. Any
    # backend may remove its key: on hosted this is a no-op.
    settings = await scheduler.set_backend(user, "hosted", SETTINGS_NOT_CHANGED)
    # Without the key no one could follow or cancel a job that RunPod goes on running and billing.
    try:
        await _settle_runpod_jobs(user, scheduler, cancel_jobs, "remove the key", "The key was not removed.")
    except ApiError:
        await scheduler.set_backend(user, RUNPOD, KEY_NOT_REMOVED)
        raise
    endpoint_deleted = False
    if delete_endpoint and settings.runpod_endpoint_id:
        # With the key, while it is still stored: afterwards nothing could reach the endpoint.
        await scheduler.delete_runpod_endpoint(user, ENDPOINT_NOT_DELETED)
        settings = await scheduler.compute_settings(user)
        endpoint_deleted = True
    deleted = await keyvault.delete_key(
        _runpod_key(user), "The key vault is unavailable; your key was not removed, try again"
    )
    log.info("runpod key removed", extra={"user_id": user, "endpoint_deleted": endpoint_deleted})
    return {
        **compute_settings_view(settings),
        "has_key": False,
        "deleted": deleted,
        "endpoint_deleted": endpoint_deleted,
    }


async def _settle_before_replacing(user: str, scheduler: SchedulerClient, cancel_jobs: bool) -> None:
    """A job is followed and cancelled with the key it was submitted with, which is the stored
    one: a new key (perhaps another RunPod account's) would fail its polls while RunPod went on
    billing the old account. So a replacement is answered like a removal, with the backend on
    hosted meanwhile so that no job is sent to RunPod between the check and the store."""
    previous = (await scheduler.compute_settings(user)).backend or RUNPOD
    await scheduler.set_backend(user, "hosted", KEY_NOT_REPLACED)
    try:
        await _settle_runpod_jobs(
            user, scheduler, cancel_jobs, "replace the key", "The key was not replaced."
        )
    except ApiError:
        await scheduler.set_backend(user, previous, KEY_NOT_REPLACED)
        raise


async def _settle_runpod_jobs(
    user: str, scheduler: SchedulerClient, cancel_jobs: bool, action: str, not_done: str
) -> None:
    """Refuse (409, naming them) while the user's jobs still run on RunPod, or cancel them
    first when asked: a job left there could no longer be followed, or RunPod would cancel it
    unrecorded (deleting an endpoint cancels its jobs)."""
    unavailable = f"The scheduler is unavailable; nothing was changed, try again ({not_done})"
    active = await scheduler.active_jobs(user, RUNPOD, unavailable)
    if active and not cancel_jobs:
        names = ", ".join(job.id for job in active[:10]) + (" and more" if len(active) > 10 else "")
        raise ApiError(
            409,
            f"{len(active)} job(s) still run on your RunPod account ({names}); wait for them to "
            f"finish or cancel them, or {action} with ?cancel_jobs=true to cancel them first. {not_done}",
        )
    for job in active:
        await scheduler.cancel_job(
            scheduler_pb2.CancelJobRequest(user_id=user, job_id=job.id), not_found=NOT_FOUND
        )
    if active:
        log.info("runpod jobs cancelled", extra={"user_id": user, "cancelled_jobs": len(active)})


@router.get(
    "/runpod-endpoint",
    summary="Your RunPod endpoint as RunPod reports it now (id, GPU pools, workers, console link)",
    response_model=RunpodEndpoint,
)
async def get_runpod_endpoint(user: CurrentUser, scheduler: Scheduler, keyvault: KeyVault) -> dict[str, Any]:
    key_stored = await keyvault.key_info(_runpod_key(user)) is not None
    return endpoint_view(await scheduler.runpod_endpoint(user, key_stored))


@router.delete(
    "/runpod-endpoint",
    summary="Delete your RunPod endpoint on your account (the next RunPod job creates a new one)",
    response_model=RunpodEndpoint,
    responses={
        409: error("Jobs still run on the endpoint (pass cancel_jobs=true), or no RunPod key is stored")
    },
)
async def delete_runpod_endpoint(
    user: CurrentUser,
    scheduler: Scheduler,
    keyvault: KeyVault,
    cancel_jobs: Annotated[bool, Query(description="Cancel the jobs still running on RunPod first")] = False,
) -> dict[str, Any]:
    if await keyvault.key_info(_runpod_key(user)) is None:
        raise ApiError(
            409,
            "No RunPod API key is stored, so the endpoint cannot be reached; delete it in RunPod's console",
        )
    await _settle_runpod_jobs(
        user, scheduler, cancel_jobs, "delete the endpoint", "The endpoint was not deleted."
    )
    return endpoint_view(await scheduler.delete_runpod_endpoint(user, ENDPOINT_NOT_DELETED))


@router.put("/hf-token", summary="Encrypt and store your Hugging Face token", response_model=HfTokenStatus)
async def save_hf_token(body: HfTokenRequest, user: CurrentUser, keyvault: KeyVault) -> dict[str, Any]:
    info = await keyvault.store_key(
        keyvault_pb2.StoreKeyRequest(
            user_id=user, provider=HUGGINGFACE, plaintext=body.token.get_secret_value(), verified=False
        ),
        "The key vault is unavailable; your token was not saved, try again",
    )
    log.info("hugging face token saved", extra={"user_id": user, "last4": info.last4})
    return _hf_token_view(info)


@router.get("/hf-token", summary="Whether a Hugging Face token is stored", response_model=HfTokenStatus)
async def get_hf_token(user: CurrentUser, keyvault: KeyVault) -> dict[str, Any]:
    return _hf_token_view(await keyvault.key_info(_hf_token(user)))


@router.delete("/hf-token", summary="Remove your Hugging Face token", response_model=HfTokenDeleted)
async def delete_hf_token(user: CurrentUser, keyvault: KeyVault) -> dict[str, Any]:
    deleted = await keyvault.delete_key(
        _hf_token(user), "The key vault is unavailable; your token was not removed, try again"
    )
    log.info("hugging face token removed", extra={"user_id": user})
    return {"has_token": False, "deleted": deleted}


def _hf_token_view(info: keyvault_pb2.KeyInfo | None) -> dict[str, Any]:
    view = key_info_view(info)
    return {"has_token": view["has_key"], "last4": view["last4"], "updated_at": view["updated_at"]}


async def gated_model_refusal(
    model_id: str, user: str, scheduler: SchedulerClient, keyvault: KeyVaultClient
) -> str:
    """Why a job on ``model_id`` cannot run for ``user``: a gated catalog model, on a backend whose
    workers download it (RunPod, Modal), with no Hugging Face token of theirs stored. "" = it can."""
    card = lookup_model(model_id)
    if not card.gated:
        return ""
    settings = await scheduler.compute_settings(user)
    provider = RUNPOD if settings.backend == RUNPOD else settings.hosted_provider
    if provider not in (RUNPOD, "modal") or await keyvault.key_info(_hf_token(user)) is not None:
        return ""
    return (
        f"{card.id} is gated on Hugging Face ({card.licence}): accept its licence on "
        "huggingface.co, then add your Hugging Face token (HF_TOKEN) in Settings -> Hugging Face "
        "token (PUT /api/settings/hf-token) and submit again"
    )
