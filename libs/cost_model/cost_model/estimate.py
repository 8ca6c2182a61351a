"""Estimates for one experiment on one provider, and the catalog with recommendations and prices.

cost = estimated time x the recommended GPU's price per second (GPU only: Modal bills CPU and
memory on top, RunPod bills the idle tail of a worker; both are small next to the GPU).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from cost_model.memory import OVERHEAD_GB, USABLE_FRACTION, GpuRecommendation, lora_params, recommend_gpu
from cost_model.model_catalog import ModelCard, lookup_model, model_cards, sized_model
from cost_model.prices import MODAL_GPU_ENV, PROVIDERS, GpuOffer, job_gpu, price_table
from cost_model.timing import (
    COLD_START_RANGE,
    counterfactual_time_s,
    estimated_time_s,
    merge_time_s,
    query_time_s,
    sharded_time_s,
)
from cost_model.workload import Workload
from gpu_core.curation_schemas import CurationRequest
from gpu_core.merge_schemas import MergeRequest
from gpu_core.schemas import CounterfactualRequest, ExperimentSpec, Quantization, QueryRequest
from gpu_core.shard_schemas import shard_count

BACKENDS: tuple[str, ...] = ("hosted", "runpod")
# Index-shard jobs a provider runs at once when the caller does not say (influence.shards
# "auto" and the wall time): compute-local one per device, Modal its function's max_containers,
# RunPod an endpoint's workers (its workersMax; 3 is RunPod's default for a new endpoint, the
# operator's hosted one). Each provider's Estimate says its own (Estimate.parallel_jobs):
# compute-local its COMPUTE_LOCAL_DEVICES, compute-runpod a researcher's endpoint's
# RUNPOD_WORKERS_MAX, compute-modal its MODAL_MAX_CONTAINERS.
# The deployed Modal function's max_containers unless the operator sets MODAL_MAX_CONTAINERS
# (services/compute-modal/worker/modal_app.py and compute-modal's settings read the same).
DEFAULT_MODAL_MAX_CONTAINERS = 8
DEFAULT_PARALLEL_JOBS: dict[str, int] = {"local": 1, "modal": DEFAULT_MODAL_MAX_CONTAINERS, "runpod": 3}


@dataclass(frozen=True)
class CostEstimate:
    """The fields of ``influence.v1.Estimate``."""

    backend: str
    provider: str
    gpu: str
    gpu_memory_gb: float
    required_memory_gb: float
    estimated_time_s: float
    usd_per_second: float
    estimated_cost_usd: float
    prices_as_of: str
    price_source: str
    notes: tuple[str, ...] = ()
    # GPU time billed, summed over the jobs: estimated_time_s (the wall time) unless sharded.
    gpu_seconds: float = 0.0
    shards: int = 1
    # The provider's jobs at once (``parallel_jobs``) the shards and wall time were counted from.
    parallel_jobs: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "notes": list(self.notes)}


@dataclass(frozen=True)
class BackendPrice:
    provider: str
    gpu: str
    gpu_memory_gb: float
    usd_per_second: float
    usd_per_hour: float
    prices_as_of: str
    price_source: str


@dataclass(frozen=True)
class ModelInfo:
    """A catalog entry with the GPU it needs (default quantization, default hyperparameters)."""

    id: str
    name: str
    params_b: float
    default_quantization: str
    context_length: int
    licence: str
    note: str
    recommended_tier_gb: int
    required_memory_gb: float
    fits: bool
    prices: dict[str, BackendPrice] = field(default_factory=dict)  # by backend
    presets: dict[str, Any] = field(default_factory=dict)  # gpu_core Hyperparams fields

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_provider(provider: str, backend: str) -> None:
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _recommend(card: ModelCard, workload: Workload) -> GpuRecommendation:
    return recommend_gpu(
        card.params_b, workload.quantization, architecture=card.architecture, workload=workload
    )


def estimate(
    spec: ExperimentSpec,
    provider: str,
    backend: str,
    counterfactual: CounterfactualRequest | None = None,
    query: QueryRequest | None = None,
    curation: CurationRequest | None = None,
    merge: MergeRequest | None = None,
    min_tier_gb: int = 0,
    parallel_jobs: int | None = None,
    card: ModelCard | None = None,
    gpu_name: str = "",
) -> CostEstimate:
    """Time and cost of ``spec`` on ``provider``'s GPU for the recommended memory tier (at least
    ``min_tier_gb``: the smallest GPU the provider will actually give the job); a sharded
    experiment's wall time with ``parallel_jobs`` shard jobs at once (default
    :data:`DEFAULT_PARALLEL_JOBS`), its cost from the GPU-seconds of all its jobs; with
    ``counterfactual``, of that check on the experiment ``spec`` (its retrainings instead); with
    ``query``, of those follow-up queries to it; with ``curation``, of its retrainings (each on
    the whole training set at most, evaluated on every eval example); with ``merge``, of merging
    its adapter into the 16-bit base (on the experiment's GPU, in host memory where the 16-bit
    weights do not fit it). ``gpu_name``: a GPU of the provider's price table the researcher
    chose (RunPod), priced instead of the tier's."""
    _check_provider(provider, backend)
    card = card or lookup_model(spec.model_id)
    workload = Workload.from_spec(spec, card)
    recommendation = _recommend(card, workload)
    table = price_table(provider)
    if gpu_name:
        if gpu_name not in table.gpus:
            raise ValueError(f"{gpu_name!r} is not a GPU of the {provider} price table")
        gpu = table.gpus[gpu_name]
    else:
        gpu_name, gpu = job_gpu(provider, max(recommendation.tier_gb, min_tier_gb))
    notes: list[str] = []
    gpu_seconds: float | None = None
    shards = 1
    parallel = parallel_jobs or DEFAULT_PARALLEL_JOBS[provider]
    if query is not None:
        hp = spec.hyperparams

        def tokens(text: str) -> int:
            return min(math.ceil(len(text) / card.chars_per_token), hp.max_seq_len)

        # Without ``expected`` the target is the model's answer: up to max_new_tokens.
        query_tokens = sum(
            tokens(item.prompt + (item.expected or "")) + (hp.max_new_tokens if item.expected is None else 0)
            for item in query.queries
        )
        seconds = query_time_s(
            card, workload, recommendation.breakdown, gpu, provider, len(query.queries), query_tokens
        )
        source = "its gradient index" if workload.index_dim is not None else "recomputed training gradients"
        notes.append(
            f"{len(query.queries)} queries scored against {workload.n_train} training examples "
            f"with {spec.influence_method} from {source}; assumes the stored adapter"
        )
    elif merge is not None:
        weights_gb = card.params_b * 2  # 16-bit, whatever the experiment's quantization
        required_gb = weights_gb + OVERHEAD_GB
        fits_gb = USABLE_FRACTION * gpu.memory_gb - OVERHEAD_GB
        # A host without a GPU (compute-local) merges in its own memory, with nothing to stream.
        offloaded_gb = max(weights_gb - fits_gb, 0.0) if gpu.memory_gb > 0 else 0.0
        seconds = merge_time_s(card, workload, gpu, provider, offloaded_gb * 1e9)
        shards = max(1, math.ceil(weights_gb * 1000 / merge.shard_size_mb))
        size = f"{weights_gb:.1f} GB" if weights_gb >= 1 else f"{weights_gb * 1000:.2g} MB"
        notes.append(
            f"writes {size} of merged weights (16-bit) in {shards} shard(s) and checks them on "
            f"{workload.n_eval} eval examples"
        )
        if workload.quantization != "none":
            notes.append(f"the experiment trained {workload.quantization}: merged onto the 16-bit base")
        if offloaded_gb > 0:
            notes.append(
                f"the 16-bit weights do not fit {gpu_name} ({gpu.memory_gb:g} GB): merged in host memory "
                f"(about {weights_gb + 2:.0f} GB of RAM), the check streams {offloaded_gb:.0f} GB per batch"
            )
    elif curation is not None:
        retrainings = curation.retrainings()
        n_eval = spec.n_eval
        seconds = counterfactual_time_s(
            card, workload, recommendation.breakdown, gpu, provider, retrainings, n_eval
        )
        notes.append(
            f"{retrainings} retrainings ({len(curation.seeds)} seeds x (the selection + "
            f"{curation.controls} random controls)), each evaluated fine-tuned on {n_eval} eval examples"
        )
    elif counterfactual is None:
        seconds = estimated_time_s(card, workload, recommendation.breakdown, gpu, provider)
        shards = shard_count(spec.influence.shards, workload.n_train, workload.batch_size, parallel)
        if shards > 1:
            n_lora = lora_params(card.architecture, workload.lora_r, workload.target_modules)
            sharded = sharded_time_s(
                card, workload, recommendation.breakdown, gpu, provider, shards, parallel, n_lora
            )
            notes.append(
                f"{shards} index shards, {min(parallel, shards)} at a time: {sharded.gpu_seconds:.0f} "
                f"GPU-seconds over {sharded.wall_s:.0f} s (unsharded: {seconds:.0f} s); "
                f"training job {sharded.training_s:.0f} s, each shard {sharded.shard_s:.0f} s of which "
                f"{sharded.shard_overhead_s:.0f} s per-job overhead (cold start, model load, checkpoint "
                f"download), merge {sharded.merge_s:.0f} s"
            )
            seconds, gpu_seconds = sharded.wall_s, sharded.gpu_seconds
    else:
        retrainings = counterfactual.retrainings()
        n_checked = len(counterfactual.eval_ids or []) or spec.n_eval
        seconds = counterfactual_time_s(
            card, workload, recommendation.breakdown, gpu, provider, retrainings, n_checked
        )
        notes.append(
            f"{retrainings} retrainings (1 without the top-k, {counterfactual.controls} random "
            f"controls, {counterfactual.lds_subsets} LDS subsets), each evaluated on {n_checked} "
            "eval examples"
        )
    time_s = round(seconds, 1)
    billed_s = round(gpu_seconds, 1) if gpu_seconds is not None else time_s
    if card.note:
        notes.append(card.note)
    required_memory_gb = required_gb if merge is not None else recommendation.required_memory_gb
    needs_gb = recommendation.required_memory_gb / USABLE_FRACTION
    if provider == "modal" and recommendation.fits and gpu.memory_gb < needs_gb:
        notes.append(
            f"runs on {gpu_name} ({gpu.memory_gb:g} GB), the operator's {MODAL_GPU_ENV}, while it needs "
            f"about {recommendation.required_memory_gb:.0f} GB: it may run out of GPU memory"
        )
    if not recommendation.fits:
        notes.append(
            f"needs about {recommendation.required_memory_gb:.0f} GB, more than the largest GPU "
            f"({recommendation.tier_gb} GB): use 4-bit quantization, a smaller batch or max_seq_len"
        )
    if provider == "local":
        notes.append("runs on this host: no GPU charge; time assumes CPU speed")
    else:
        notes.append(f"includes a cold start ({COLD_START_RANGE[provider]}) and model loading")
    return CostEstimate(
        backend=backend,
        provider=provider,
        gpu=gpu_name,
        gpu_memory_gb=gpu.memory_gb,
        required_memory_gb=round(required_memory_gb, 2),
        estimated_time_s=time_s,
        usd_per_second=gpu.usd_per_second,
        estimated_cost_usd=round(billed_s * gpu.usd_per_second, 6),
        prices_as_of=table.as_of,
        price_source=table.source,
        notes=tuple(notes),
        gpu_seconds=billed_s,
        shards=shards,
        parallel_jobs=parallel,
    )


def expected_memory_gb(spec: ExperimentSpec) -> float:
    """The GPU memory the cost model expects ``spec`` to need (gpu_core names it when a stage
    runs out of memory)."""
    card = lookup_model(spec.model_id)
    return _recommend(card, Workload.from_spec(spec, card)).required_memory_gb


def estimate_job(
    spec: ExperimentSpec,
    provider: str,
    backend: str,
    kind: str = "",
    request_json: bytes = b"",
    min_tier_gb: int = 0,
    card: ModelCard | None = None,
    gpu_name: str = "",
    parallel_jobs: int | None = None,
) -> CostEstimate:
    """What a provider's Estimate answers: an experiment, or a later job of the experiment
    ``spec`` of ``kind`` (gpu_core.jobs) with its request (``card``: the model's, when known
    better than by its id: ``card_from_config``; ``parallel_jobs``: the jobs the provider runs at
    once, default :data:`DEFAULT_PARALLEL_JOBS`). Raises ValueError naming the field."""
    from gpu_core.jobs import COUNTERFACTUAL, CURATION, MERGE, QUERY, job_kind, parse_request

    later = job_kind(kind)
    check = parse_request(later, request_json) if later.name == COUNTERFACTUAL else None
    query = parse_request(later, request_json) if later.name == QUERY else None
    curation = parse_request(later, request_json) if later.name == CURATION else None
    merge = parse_request(later, request_json) if later.name == MERGE else None
    return estimate(
        spec,
        provider,
        backend,
        counterfactual=check,
        query=query,
        curation=curation,
        merge=merge,
        min_tier_gb=min_tier_gb,
        card=card,
        gpu_name=gpu_name,
        parallel_jobs=parallel_jobs,
    )


def fitting_gpus(provider: str, model_id: str, quantization: Quantization) -> list[tuple[str, GpuOffer]]:
    """The GPUs of ``provider``'s price table that hold ``model_id`` at ``quantization`` (sized by
    its catalog card, or the size its id names, at the catalog workload), cheapest first; every
    GPU when the model's size is unknown. The choices a RunPod researcher may pin a job to."""
    table = price_table(provider)
    card = sized_model(model_id)
    if card is None:
        return table.gpus_for_tier(0)
    tier_gb = recommend_gpu(card.params_b, quantization, architecture=card.architecture).tier_gb
    return table.gpus_for_tier(tier_gb)


def catalog(hosted_provider: str = "modal") -> list[ModelInfo]:
    """Every catalog model with its recommended GPU tier and, per backend, that GPU's price."""
    _check_provider(hosted_provider, "hosted")
    providers = {"hosted": hosted_provider, "runpod": "runpod"}
    tables = {backend: price_table(provider) for backend, provider in providers.items()}
    infos = []
    for card in model_cards():
        recommendation = _recommend(card, Workload(quantization=card.default_quantization))
        prices = {}
        for backend, table in tables.items():
            gpu_name, gpu = job_gpu(providers[backend], recommendation.tier_gb)
            prices[backend] = BackendPrice(
                provider=providers[backend],
                gpu=gpu_name,
                gpu_memory_gb=gpu.memory_gb,
                usd_per_second=gpu.usd_per_second,
                usd_per_hour=round(gpu.usd_per_hour, 4),
                prices_as_of=table.as_of,
                price_source=table.source,
            )
        infos.append(
            ModelInfo(
                id=card.id,
                name=card.name,
                params_b=card.params_b,
                default_quantization=card.default_quantization,
                context_length=card.context_length,
                licence=card.licence,
                note=card.note,
                recommended_tier_gb=recommendation.tier_gb,
                required_memory_gb=round(recommendation.required_memory_gb, 2),
                fits=recommendation.fits,
                prices=prices,
                presets=card.preset_hyperparams().model_dump(),
            )
        )
    return infos
