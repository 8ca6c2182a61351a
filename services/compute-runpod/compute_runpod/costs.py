"""The one seam to the shared cost model (libs/cost_model): estimates and GPU pool choice."""

from __future__ import annotations

from typing import Any

import cost_model
from gpu_core.schemas import ExperimentSpec


def estimate(spec: ExperimentSpec, backend: str, kind: str = "", request_json: bytes = b"") -> dict[str, Any]:
    """The fields of influence.v1.Estimate for ``spec`` (or a later job of ``kind`` on it) on RunPod."""
    return cost_model.estimate_job(spec, "runpod", backend, kind, request_json).as_dict()


def estimated_cost_usd(spec: ExperimentSpec) -> float:
    return float(cost_model.estimate(spec, provider="runpod", backend="runpod").estimated_cost_usd)


def gpu_pools(model_params_b: float, quantization: str) -> list[str]:
    """Every RunPod pool that fits a model of ``model_params_b`` billion parameters, cheapest
    first: RunPod asks for every pool the endpoint accepts (fewer jobs left waiting for a GPU)."""
    recommendation = cost_model.recommend_gpu(model_params_b, quantization or "none")
    return [pool for pool, _ in cost_model.price_table("runpod").gpus_for_tier(recommendation.tier_gb)]
