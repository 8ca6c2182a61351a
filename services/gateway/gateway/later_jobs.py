"""Later jobs of an experiment (a gpu_core.jobs kind with a parent: counterfactual checks,
follow-up queries): submitted, listed and read the same way by each kind's routes
(counterfactual_api, queries_api). Another user's experiment or job is not found (404)."""

from __future__ import annotations

import json
from typing import Any

from influence.v1 import scheduler_pb2

from gateway.deps import Upstreams
from gateway.jobs_api import JOB_NOT_FOUND, SCHEDULER_DOWN, _checked_job_id, _get_job
from gateway.upstream import ApiError, scheduler_errors
from gateway.views import job_view

TraceMetadata = tuple[tuple[str, str], ...]


def later_job_view(job: scheduler_pb2.Job, id_field: str) -> dict[str, Any]:
    """The job view with the kind's id field (e.g. ``query_job_id``), its parent and request."""
    return {
        **job_view(job),
        id_field: job.id,
        "parent_job_id": job.parent_job_id,
        "request": json.loads(job.request_json) if job.request_json else None,
    }


async def submit_later_job(
    clients: Upstreams,
    user: str,
    trace: TraceMetadata,
    job_id: str,
    kind: str,
    request_json: bytes,
    idempotency_key: str | None,
    unavailable: str,
) -> scheduler_pb2.Job:
    with scheduler_errors(unavailable, not_found=JOB_NOT_FOUND):
        return await clients.scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                user_id=user,
                idempotency_key=idempotency_key or "",
                kind=kind,
                parent_job_id=_checked_job_id(job_id),
                request_json=request_json,
            ),
            metadata=trace,
            timeout=clients.timeout_s,
        )


async def list_later_jobs(
    clients: Upstreams, user: str, trace: TraceMetadata, job_id: str, kind: str
) -> list[scheduler_pb2.Job]:
    """The experiment's jobs of ``kind``, newest first (404 when the experiment is not the user's)."""
    await _get_job(clients, user, job_id, trace)
    with scheduler_errors(SCHEDULER_DOWN, not_found=JOB_NOT_FOUND):
        answer = await clients.scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(user_id=user, parent_job_id=job_id, kind=kind),
            metadata=trace,
            timeout=clients.timeout_s,
        )
    return list(answer.jobs)


async def get_later_job(
    clients: Upstreams, user: str, trace: TraceMetadata, job_id: str, later_id: str, kind: str, not_found: str
) -> tuple[scheduler_pb2.Job, Any]:
    """The job ``later_id`` of ``kind`` under the experiment ``job_id`` and, once it completed,
    its result (else None); 404 ``not_found`` for anything else."""
    with scheduler_errors(SCHEDULER_DOWN, not_found=not_found):
        job = await clients.scheduler.GetJob(
            scheduler_pb2.GetJobRequest(user_id=user, job_id=_checked_job_id(later_id)),
            metadata=trace,
            timeout=clients.timeout_s,
        )
    if job.kind != kind or job.parent_job_id != job_id:
        raise ApiError(404, not_found)
    if job_view(job)["status"] != "completed":
        return job, None
    with scheduler_errors(SCHEDULER_DOWN, not_found=not_found):
        answer = await clients.scheduler.GetJobResult(
            scheduler_pb2.GetJobResultRequest(user_id=user, job_id=job.id),
            metadata=trace,
            timeout=clients.timeout_s,
        )
    return job, json.loads(answer.result_json)
