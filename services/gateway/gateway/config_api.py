"""GET /api/config: what a client needs to build a valid spec for this deployment (limits, the
spec's JSON Schema with its defaults and bounds, the influence methods), so the dashboard and
scripts read them instead of copying them."""

from __future__ import annotations

from typing import Any, get_args

from fastapi import APIRouter

from gateway.deps import State
from gateway.responses import error
from gpu_core.schemas import ExperimentSpec, InfluenceMethod
from influence_client.models import GatewayConfig

router = APIRouter(prefix="/api", tags=["system"], responses={"default": error("Any error")})

# How each method spends compute, for choosing one; a method without a line here is still
# offered (under its own name), so a method added to the schema is never hidden.
METHOD_NOTES: dict[str, tuple[str, str]] = {
    "tracin": (
        "TracIn",
        "Cheapest: one gradient dot product per training/eval pair at each epoch's checkpoint.",
    ),
    "datainf": (
        "DataInf",
        "About one extra gradient pass: a closed-form inverse-Hessian approximation per LoRA layer.",
    ),
    "kronfluence": (
        "Kronfluence (EK-FAC)",
        "Most accurate and most expensive: fits EK-FAC factors first "
        "(about 3x TracIn's compute and more memory).",
    ),
    "trackstar": (
        "TrackStar",
        "For large training sets: each example's gradient, rescaled by the optimizer's statistics and "
        "compressed, scored by cosine similarity; one gradient pass.",
    ),
}


def influence_methods() -> list[dict[str, str]]:
    methods = []
    for value in get_args(InfluenceMethod):
        label, description = METHOD_NOTES.get(value, (value, ""))
        methods.append({"value": value, "label": label, "description": description})
    return methods


@router.get(
    "/config",
    summary="Limits, spec schema and influence methods of this deployment",
    response_model=GatewayConfig,
)
async def gateway_config(state: State) -> dict[str, Any]:
    """No sign-in needed: nothing here is private."""
    settings = state.settings
    limits = settings.spec_limits
    return {
        "auth_mode": settings.auth_mode,
        "limits": {**limits.model_dump(), "max_body_bytes": settings.gateway_max_body_bytes},
        "influence_methods": influence_methods(),
        "spec_schema": ExperimentSpec.model_json_schema(),
    }
