"""Where a researcher's experiments are logged: their own MLflow (tracking URI, experiment name,
optional token) and W&B (project, entity, API key). The scheduler keeps the URI and the project
(not secret) and logs each completed experiment there (scheduler/tracking.py); the W&B key and
the MLflow token go to keyvault only, like the Hugging Face token, and are shown by their last 4.
Without settings of their own the operator's trackers (if any) apply.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from gateway.deps import CurrentUser, KeyVault, Scheduler, require_text
from gateway.responses import ERRORS
from gateway.upstream import ApiError, KeyVaultClient, SchedulerClient
from influence.v1 import keyvault_pb2, scheduler_pb2
from influence_client.models import TrackingSettings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/settings/tracking", tags=["settings"], responses=ERRORS)

# keyvault provider names (keyvault's REVEAL_POLICY lets the scheduler reveal these two only)
WANDB_KEY = "wandb"
MLFLOW_TOKEN = "mlflow"
NOT_SAVED = "The scheduler is unavailable; your tracking settings were not changed, try again"
KEY_NOT_SAVED = "The key vault is unavailable; your key was not saved, try again"
KEY_NOT_REMOVED = "The key vault is unavailable; your key was not removed, try again"


def _secret(value: SecretStr | None, what: str) -> SecretStr | None:
    if value is None:
        return None
    text = require_text(value.get_secret_value()).strip()
    if not text or len(text) > 512 or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise ValueError(f"does not look like {what} (no spaces, 1-512 characters)")
    return SecretStr(text)


class MlflowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_uri: Annotated[
        str, Field(min_length=1, max_length=2000, description="http(s) URL of the MLflow server")
    ]
    experiment_name: Annotated[str, Field(max_length=500)] = ""
    token: Annotated[
        SecretStr | None, Field(description="Sent as a Bearer token; only its last 4 are shown")
    ] = None

    @field_validator("token")
    @classmethod
    def _plausible(cls, value: SecretStr | None) -> SecretStr | None:
        return _secret(value, "an MLflow token")


class WandbRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: Annotated[str, Field(min_length=1, max_length=128)]
    entity: Annotated[str, Field(max_length=128)] = ""
    api_key: Annotated[
        SecretStr | None,
        Field(description="Your W&B API key; required unless one is stored; only its last 4 are shown"),
    ] = None

    @field_validator("api_key")
    @classmethod
    def _plausible(cls, value: SecretStr | None) -> SecretStr | None:
        return _secret(value, "a W&B API key")


def _ref(user: str, provider: str) -> keyvault_pb2.KeyRef:
    return keyvault_pb2.KeyRef(user_id=user, provider=provider)


async def _view(user: str, scheduler: SchedulerClient, keyvault: KeyVaultClient) -> dict[str, Any]:
    settings = await scheduler.tracking_settings(user)
    token = await keyvault.key_info(_ref(user, MLFLOW_TOKEN))
    key = await keyvault.key_info(_ref(user, WANDB_KEY))
    return {
        "mlflow": {
            "tracking_uri": settings.mlflow_tracking_uri or None,
            "experiment_name": settings.mlflow_experiment_name or None,
            "has_token": token is not None,
            "token_last4": token.last4 if token is not None else None,
        },
        "wandb": {
            "project": settings.wandb_project or None,
            "entity": settings.wandb_entity or None,
            "has_key": key is not None,
            "key_last4": key.last4 if key is not None else None,
        },
        "operator_mlflow": settings.operator_mlflow,
        "operator_wandb": settings.operator_wandb,
    }


async def _store(
    user: str,
    scheduler: SchedulerClient,
    mlflow: tuple[str, str] | None = None,
    wandb: tuple[str, str] | None = None,
) -> None:
    """Replace one tracker's settings, keeping the other's."""
    now = await scheduler.tracking_settings(user)
    uri, experiment = mlflow if mlflow is not None else (now.mlflow_tracking_uri, now.mlflow_experiment_name)
    project, entity = wandb if wandb is not None else (now.wandb_project, now.wandb_entity)
    await scheduler.set_tracking_settings(
        scheduler_pb2.SetTrackingSettingsRequest(
            user_id=user,
            mlflow_tracking_uri=uri,
            mlflow_experiment_name=experiment,
            wandb_project=project,
            wandb_entity=entity,
        ),
        NOT_SAVED,
    )


@router.get("", summary="Where your experiments are logged (MLflow, W&B)", response_model=TrackingSettings)
async def get_tracking(user: CurrentUser, scheduler: Scheduler, keyvault: KeyVault) -> dict[str, Any]:
    return await _view(user, scheduler, keyvault)


@router.put("/mlflow", summary="Log your experiments to your MLflow", response_model=TrackingSettings)
async def put_mlflow(
    body: MlflowRequest, user: CurrentUser, scheduler: Scheduler, keyvault: KeyVault
) -> dict[str, Any]:
    # The URI is checked (422 naming it) before the token is stored.
    await _store(user, scheduler, mlflow=(body.tracking_uri, body.experiment_name))
    if body.token is not None:
        info = await keyvault.store_key(
            keyvault_pb2.StoreKeyRequest(
                user_id=user, provider=MLFLOW_TOKEN, plaintext=body.token.get_secret_value(), verified=False
            ),
            KEY_NOT_SAVED,
        )
        log.info("mlflow token saved", extra={"user_id": user, "last4": info.last4})
    return await _view(user, scheduler, keyvault)


@router.delete(
    "/mlflow", summary="Stop logging to your MLflow; remove its token", response_model=TrackingSettings
)
async def delete_mlflow(user: CurrentUser, scheduler: Scheduler, keyvault: KeyVault) -> dict[str, Any]:
    await _store(user, scheduler, mlflow=("", ""))
    await keyvault.delete_key(_ref(user, MLFLOW_TOKEN), KEY_NOT_REMOVED)
    log.info("mlflow tracking removed", extra={"user_id": user})
    return await _view(user, scheduler, keyvault)


@router.put("/wandb", summary="Log your experiments to your W&B project", response_model=TrackingSettings)
async def put_wandb(
    body: WandbRequest, user: CurrentUser, scheduler: Scheduler, keyvault: KeyVault
) -> dict[str, Any]:
    if body.api_key is None and await keyvault.key_info(_ref(user, WANDB_KEY)) is None:
        raise ApiError(422, "api_key: required (no W&B API key of yours is stored yet)")
    await _store(user, scheduler, wandb=(body.project, body.entity))
    if body.api_key is not None:
        info = await keyvault.store_key(
            keyvault_pb2.StoreKeyRequest(
                user_id=user, provider=WANDB_KEY, plaintext=body.api_key.get_secret_value(), verified=False
            ),
            KEY_NOT_SAVED,
        )
        log.info("wandb key saved", extra={"user_id": user, "last4": info.last4})
    return await _view(user, scheduler, keyvault)


@router.delete("/wandb", summary="Stop logging to your W&B; remove its key", response_model=TrackingSettings)
async def delete_wandb(user: CurrentUser, scheduler: Scheduler, keyvault: KeyVault) -> dict[str, Any]:
    await _store(user, scheduler, wandb=("", ""))
    await keyvault.delete_key(_ref(user, WANDB_KEY), KEY_NOT_REMOVED)
    log.info("wandb tracking removed", extra={"user_id": user})
    return await _view(user, scheduler, keyvault)
