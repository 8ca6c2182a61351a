"""GET /api/models: the model catalog with each model's recommended GPU and per-backend price,
from libs/cost_model (the same figures the providers use for estimates)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

import cost_model
from gateway.deps import CurrentUser, State
from gateway.responses import ERRORS, error
from gateway.upstream import ApiError
from influence_client.models import ModelList

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
