"""Later jobs of an experiment (a gpu_core.jobs kind with a parent: counterfactual checks,
follow-up queries): submitted, listed and read the same way by each kind's routes
(counterfactual_api, queries_api). Another user's experiment or job is not found (404)."""

from __future__ import annotations

import json
from typing import Any

from gateway.jobs_api import JOB_NOT_FOUND, _checked_job_id, _get_job, checked_idempotency_key
from gateway.upstream import ApiError, SchedulerClient
from gateway.views import job_view
from influence.v1 import scheduler_pb2


def later_job_view(job: scheduler_pb2.Job, id_field: str) -> dict[str, Any]:
    """The job view with the kind's id field (e.g. ``query_job_id``), its parent and request."""
    return {
        **job_view(job),
        id_field: job.id,
        "parent_job_id": job.parent_job_id,
        "request": json.loads(job.request_json) if job.request_json else None,
    }


async def submit_later_job(
    scheduler: SchedulerClient,
    user: str,
    job_id: str,
    kind: str,
    request_json: bytes,
    idempotency_key: str | None,
    unavailable: str,
) -> scheduler_pb2.Job:
    """Submit the experiment's later job of ``kind``; a resent ``idempotency_key`` answers the
    job it created the first time (422 for a malformed key, before anything is sent)."""
    checked_idempotency_key(idempotency_key)
    request = scheduler_pb2.SubmitJobRequest(
        user_id=user,
        idempotency_key=idempotency_key or "",
        kind=kind,
        parent_job_id=_checked_job_id(job_id),
        request_json=request_json,
    )
    return await scheduler.submit_job(request, unavailable, JOB_NOT_FOUND)


async def list_later_jobs(
    scheduler: SchedulerClient, user: str, job_id: str, kind: str
) -> list[scheduler_pb2.Job]:
    """The experiment's jobs of ``kind``, newest first (404 when the experiment is not the user's)."""
    await _get_job(scheduler, user, job_id)
    request = scheduler_pb2.ListJobsRequest(user_id=user, parent_job_id=job_id, kind=kind)
    return list((await scheduler.list_jobs(request, JOB_NOT_FOUND)).jobs)


async def get_later_job(
    scheduler: SchedulerClient, user: str, job_id: str, later_id: str, kind: str, not_found: str
) -> tuple[scheduler_pb2.Job, Any]:
    """The job ``later_id`` of ``kind`` under the experiment ``job_id`` and, once it completed,
    its result (else None); 404 ``not_found`` for anything else."""
    job = await scheduler.get_job(
        scheduler_pb2.GetJobRequest(user_id=user, job_id=_checked_job_id(later_id)), not_found
    )
    if job.kind != kind or job.parent_job_id != job_id:
        raise ApiError(404, not_found)
    if job_view(job)["status"] != "completed":
        return job, None
    result_json = await scheduler.job_result(
        scheduler_pb2.GetJobResultRequest(user_id=user, job_id=job.id), not_found
    )
    return job, json.loads(result_json)
