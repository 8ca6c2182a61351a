"""JSON shapes the REST API answers with, built from the scheduler's and keyvault's messages."""

from __future__ import annotations

import json
from typing import Any

from influence.v1 import common_pb2, keyvault_pb2, scheduler_pb2
from service_runtime.jobs import event_dict, state_name, timestamp_text


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def job_view(job: scheduler_pb2.Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "status": state_name(job.state),
        "stage": job.stage or None,
        "progress": job.progress,
        "stage_message": job.stage_message,
        # The last progress event's figures: epoch, total_epochs, step, loss, eta_s, ...
        "metrics": _json_object(job.latest_metrics_json),
        "error": job.error or None,
        "backend": job.compute_backend,
        "provider": job.provider,
        "model_id": job.model_id,
        "influence_method": job.influence_method,
        "n_train": job.n_train,
        "n_eval": job.n_eval,
        "estimated_time_s": job.estimated_time_s,
        "estimated_cost_usd": job.estimated_cost_usd,
        "estimated_gpu": job.estimated_gpu or None,
        "estimated_usd_per_second": job.estimated_usd_per_second,
        "max_cost_usd": job.max_cost_usd or None,
        # The real cost once the job has ended (None before, or when nothing was measured).
        "actual": actual_view(job.actual) if job.HasField("actual") else None,
        "last_event_seq": job.last_seq,
        "created_at": timestamp_text(job, "created_at"),
        "updated_at": timestamp_text(job, "updated_at"),
        "finished_at": timestamp_text(job, "finished_at"),
        "name": job.name or None,
        "tags": list(job.tags),
        "note": job.note or None,
        "started_at": timestamp_text(job, "started_at"),
        "run_time_s": _run_time_s(job),
        # Each evaluation's {exact_match_rate, mean_loss, n} once the experiment has completed.
        "outcome": _json_object(job.outcome_json),
        # An experiment's export to MLflow / W&B (scheduler/tracking.py); {} for other kinds.
        "tracking": _json_object(job.tracking_json),
        # A sharded experiment (influence.shards > 1): its index shards and its parts (the
        # training job, each shard, the merge) as they stand; 1 and [] otherwise.
        "shards": job.shards or 1,
        "parts": [part_view(part) for part in job.parts],
    }


def part_view(part: scheduler_pb2.JobPart) -> dict[str, Any]:
    return {
        "kind": part.kind,
        "shard": part.shard if part.shard >= 0 else None,
        "job_id": part.job_id or None,
        "status": part.status,
        "progress": part.progress,
        "attempts": part.attempts,
        "error": part.error or None,
    }


def _run_time_s(job: scheduler_pb2.Job) -> float | None:
    """Seconds from running to finished, when the job has done both."""
    if not (job.HasField("started_at") and job.HasField("finished_at")):
        return None
    delta = job.finished_at.ToDatetime() - job.started_at.ToDatetime()
    return max(delta.total_seconds(), 0.0)


def actual_view(actual: common_pb2.JobCost) -> dict[str, Any]:
    return {
        "gpu_seconds": actual.gpu_seconds,
        "delay_seconds": actual.delay_seconds,
        "gpu": actual.gpu,
        "device": actual.device or None,
        "usd_per_second": actual.usd_per_second,
        "cost_usd": actual.cost_usd,
        "source": actual.source,
    }


def submitted_view(job: scheduler_pb2.Job, id_field: str = "job_id") -> dict[str, Any]:
    """A submitted job's id (as ``id_field``: a later job names its kind's), status and estimates."""
    return {
        id_field: job.id,
        "status": state_name(job.state),
        "estimated_time_s": job.estimated_time_s,
        "estimated_cost_usd": job.estimated_cost_usd,
    }


def event_payload(event: common_pb2.ProgressEvent) -> dict[str, Any]:
    """The full event object as gpu_core yielded it, with the scheduler's seq and time."""
    return {**event_dict(event), "seq": event.seq, "time": timestamp_text(event, "time")}


def compute_settings_view(settings: scheduler_pb2.ComputeSettings) -> dict[str, Any]:
    return {
        "backend": settings.backend,
        "hosted_provider": settings.hosted_provider,
        "runpod_endpoint_id": settings.runpod_endpoint_id or None,
        "endpoint_status": settings.endpoint_status or "none",
        "endpoint_error": settings.endpoint_error or None,
    }


def endpoint_view(info: common_pb2.EndpointInfo) -> dict[str, Any]:
    workers = info.workers
    return {
        "byok_available": info.byok_available,
        "unavailable_reason": info.unavailable_reason or None,
        "state": info.state or "none",
        "endpoint_id": info.endpoint_id or None,
        "name": info.name or None,
        "gpu_pools": list(info.gpu_pools),
        "workers_max": info.workers_max,
        "workers": {
            name: getattr(workers, name)
            for name in ("running", "idle", "initializing", "throttled", "unhealthy", "total")
        }
        if info.state == "live"
        else None,
        "execution_timeout_s": info.execution_timeout_s,
        "console_url": info.console_url or None,
    }


def key_info_view(info: keyvault_pb2.KeyInfo | None) -> dict[str, Any]:
    if info is None:
        return {"has_key": False, "last4": None, "verified_at": None, "updated_at": None}
    return {
        "has_key": True,
        "last4": info.last4,
        "verified_at": timestamp_text(info, "verified_at"),
        "updated_at": timestamp_text(info, "updated_at"),
    }


def estimate_view(estimate: common_pb2.Estimate) -> dict[str, Any]:
    return {
        "backend": estimate.backend,
        "provider": estimate.provider,
        "gpu": estimate.gpu,
        "gpu_memory_gb": estimate.gpu_memory_gb,
        "required_memory_gb": estimate.required_memory_gb,
        "estimated_time_s": estimate.estimated_time_s,
        "usd_per_second": estimate.usd_per_second,
        "estimated_cost_usd": estimate.estimated_cost_usd,
        # A sharded experiment bills more GPU time than its wall time (every job's overhead).
        "gpu_seconds": estimate.gpu_seconds or estimate.estimated_time_s,
        "shards": estimate.shards or 1,
        # The provider's jobs at once (shards at a time): a RunPod endpoint's workers.
        "parallel_jobs": estimate.parallel_jobs or 1,
        "prices_as_of": estimate.prices_as_of,
        "price_source": estimate.price_source,
        "notes": list(estimate.notes),
    }
