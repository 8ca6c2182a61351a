"""The one seam to the shared cost model (libs/cost_model): estimates and GPU pool choice."""

from __future__ import annotations

import math
from typing import Any, cast

import cost_model
from gpu_core.jobs import JobInputError
from gpu_core.schemas import RUNPOD_ALL_FITTING, ExperimentSpec, Quantization

# The most an endpoint's dearest pool may cost per second, as a multiple of its cheapest (see
# gpu_pools; RUNPOD_POOL_PRICE_BAND).
DEFAULT_PRICE_BAND = 3.0


def estimate(
    spec: ExperimentSpec,
    backend: str,
    kind: str = "",
    request_json: bytes = b"",
    workers: int | None = None,
) -> dict[str, Any]:
    """The fields of influence.v1.Estimate for ``spec`` (or a later job of ``kind`` on it) on RunPod,
    priced at a GPU its endpoint offers: a job that needs less than the model's catalog workload
    still runs on the endpoint's pools, which start at that workload's tier. ``workers``: the
    endpoint's (its jobs at once; a sharded experiment's shards at a time)."""
    floor = endpoint_tier_gb(spec.model_id, spec.hyperparams.quantization)
    return cost_model.estimate_job(
        spec,
        "runpod",
        backend,
        kind,
        request_json,
        min_tier_gb=floor,
        gpu_name=chosen_pool(spec, backend),
        parallel_jobs=workers,
    ).as_dict()


def chosen_pool(spec: ExperimentSpec, backend: str) -> str:
    """The one pool the researcher pinned the job to on their own endpoint ("" = none: the hosted
    tier's endpoint is the operator's, so the choice applies on BYOK only)."""
    if backend != "runpod" or spec.runpod_gpu in (None, RUNPOD_ALL_FITTING):
        return ""
    if spec.runpod_gpu not in cost_model.price_table("runpod").gpus:
        raise JobInputError(f"runpod_gpu: {spec.runpod_gpu} is not a RunPod GPU pool of the price table")
    return spec.runpod_gpu


def estimated_cost_usd(spec: ExperimentSpec) -> float:
    floor = endpoint_tier_gb(spec.model_id, spec.hyperparams.quantization)
    estimate = cost_model.estimate(
        spec, provider="runpod", backend="runpod", min_tier_gb=floor, gpu_name=chosen_pool(spec, "runpod")
    )
    return float(estimate.estimated_cost_usd)


def endpoint_tier_gb(model_id: str, quantization: str) -> int:
    """The memory tier an endpoint's pools for ``model_id`` start at (0 when the model's size is
    unknown and the default pools apply)."""
    recommendation = _model_recommendation(0.0, quantization, model_id)
    return recommendation.tier_gb if recommendation is not None else 0


def gpu_pools(
    model_params_b: float,
    quantization: str,
    model_id: str = "",
    price_band: float = DEFAULT_PRICE_BAND,
    runpod_gpu: str = "",
) -> list[str]:
    """The RunPod pools that fit the model and cost at most ``price_band`` times the cheapest
    that fits, cheapest first: RunPod takes a job on any pool the endpoint lists, so each listed
    pool is one more chance of a free GPU (fewer jobs left waiting) and one more price the job
    can be billed at; the band bounds that price. A model the catalog knows (or whose id names its
    size) is sized by its card, as the estimate is; else by ``model_params_b`` billion
    parameters; none when neither is known (the caller's default pools apply). ``runpod_gpu``
    (the spec's, checked by the gateway): that one pool, or every fitting pool whatever its price
    (RUNPOD_ALL_FITTING)."""
    if runpod_gpu and runpod_gpu != RUNPOD_ALL_FITTING:
        return [runpod_gpu]
    if runpod_gpu == RUNPOD_ALL_FITTING:
        price_band = math.inf
    recommendation = _model_recommendation(model_params_b, quantization, model_id)
    if recommendation is None:
        return []
    fitting = cost_model.price_table("runpod").gpus_for_tier(recommendation.tier_gb)
    if not fitting:
        return []
    ceiling = fitting[0][1].usd_per_second * price_band
    return [pool for pool, offer in fitting if offer.usd_per_second <= ceiling]


def pool_memory_gb(pool: str) -> float:
    """A pool's GPU memory per the price table (0 for a pool it does not list)."""
    offer = cost_model.price_table("runpod").gpus.get(pool)
    return offer.memory_gb if offer is not None else 0.0


def _model_recommendation(
    model_params_b: float, quantization: str, model_id: str
) -> cost_model.GpuRecommendation | None:
    # the request's text, from the scheduler's validated spec; recommend_gpu refuses any other value
    quantized = cast(Quantization, quantization or "none")
    card = cost_model.sized_model(model_id) if model_id else None
    if card is not None:
        return cost_model.recommend_gpu(card.params_b, quantized, architecture=card.architecture)
    if model_params_b > 0:
        return cost_model.recommend_gpu(model_params_b, quantized)
    return None


def pool_rates(
    model_id: str, quantization: str, price_band: float = DEFAULT_PRICE_BAND, runpod_gpu: str = ""
) -> list[tuple[str, float]]:
    """(pool, $/s) of every pool an endpoint for ``model_id`` offers RunPod, cheapest first: the
    range a job can be billed at, whichever GPU RunPod assigns."""
    table = cost_model.price_table("runpod")
    pools = gpu_pools(0.0, quantization, model_id, price_band, runpod_gpu)
    return [(pool, table.gpus[pool].usd_per_second) for pool in pools]
