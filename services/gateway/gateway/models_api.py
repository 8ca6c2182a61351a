"""GET /api/models: the model catalog with each model's recommended GPU and per-backend price,
from libs/cost_model (the same figures the providers use for estimates)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

import cost_model
from gateway.deps import CurrentUser, State
from gateway.responses import ERRORS, error
from gateway.upstream import ApiError
from gpu_core.schemas import RUNPOD_ALL_FITTING, ExperimentSpec, Quantization
from influence_client.models import ModelList, RunpodGpuList

router = APIRouter(prefix="/api", tags=["models"], responses=ERRORS)


def model_catalog(hosted_provider: str) -> list[dict[str, Any]]:
    """Catalog entries as JSON objects: id, name, params_b, default_quantization,
    context_length, licence, note, recommended_tier_gb, required_memory_gb, fits, and
    ``prices`` by backend ("hosted", "runpod")."""
    try:
        return [info.as_dict() for info in cost_model.catalog(hosted_provider)]
    except cost_model.PriceTableError as exc:
        raise ApiError(503, f"The price table cannot be read: {exc}") from None


@router.get(
    "/models",
    summary="Models with GPU recommendation and per-backend prices",
    response_model=ModelList,
    responses={503: error("The price table cannot be read")},
)
async def list_models(_user: CurrentUser, state: State) -> dict[str, Any]:
    return {"models": model_catalog(state.settings.hosted_provider)}


def runpod_gpus(model_id: str, quantization: Quantization) -> list[dict[str, Any]]:
    try:
        fitting = cost_model.fitting_gpus("runpod", model_id, quantization)
    except cost_model.PriceTableError as exc:
        raise ApiError(503, f"The price table cannot be read: {exc}") from None
    return [
        {
            "pool": pool,
            "description": offer.description,
            "memory_gb": offer.memory_gb,
            "usd_per_second": offer.usd_per_second,
        }
        for pool, offer in fitting
    ]


@router.get(
    "/models/runpod-gpus",
    summary="The RunPod GPU pools that fit a model, for the spec's runpod_gpu",
    response_model=RunpodGpuList,
    responses={503: error("The price table cannot be read")},
)
async def list_runpod_gpus(
    _user: CurrentUser,
    model_id: Annotated[str, Query(min_length=1, max_length=256)],
    quantization: Quantization = "none",
) -> dict[str, Any]:
    return {"model_id": model_id, "quantization": quantization, "gpus": runpod_gpus(model_id, quantization)}


def runpod_gpu_refusal(spec: ExperimentSpec) -> str:
    """Why the spec's ``runpod_gpu`` cannot hold its model ("" = it can, or none is chosen): an
    unknown pool, or one with less memory than the model needs at its quantization."""
    chosen = spec.runpod_gpu
    if not chosen or chosen == RUNPOD_ALL_FITTING:
        return ""
    quantization = spec.hyperparams.quantization
    fitting = [gpu["pool"] for gpu in runpod_gpus(spec.model_id, quantization)]
    if chosen in fitting:
        return ""
    known = cost_model.price_table("runpod").gpus
    if chosen not in known:
        return (
            f"{chosen} is not a RunPod GPU pool this dashboard knows; one of {', '.join(fitting)} "
            f"(those that fit {spec.model_id}), or {RUNPOD_ALL_FITTING}"
        )
    return (
        f"{chosen} ({known[chosen].memory_gb:g} GB) is too small for {spec.model_id} at quantization "
        f"{quantization}; the pools that fit: {', '.join(fitting)}"
    )
