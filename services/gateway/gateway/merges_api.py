"""Merged weights of an experiment (gpu_core.merge): estimate, submit, list, read.

A merge is a job of kind ``merge`` whose parent is the experiment: it runs on that experiment's
backend with its stored spec, result and adapter, streams progress at
``/api/jobs/{merge_job_id}/events``, is cancelled at ``/api/jobs/{merge_job_id}/cancel`` like any
job, and its files (``merged/...``) are the merge job's artifacts, downloaded one by one at
``/api/jobs/{merge_job_id}/artifacts/{name}`` or together at
``/api/jobs/{merge_job_id}/artifacts.zip?prefix=merged/``. Every route answers 404 for an
experiment (or merge) that is not the caller's, 409 before the experiment completed.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from gateway.deps import CurrentUser, Scheduler
from gateway.jobs_api import JOB_NOT_FOUND, _checked_job_id
from gateway.later_jobs import get_later_job, later_job_view, list_later_jobs, submit_later_job
from gateway.responses import ERRORS, error
from gateway.views import estimate_view, submitted_view
from gpu_core.jobs import MERGE
from gpu_core.merge_schemas import MergeRequest
from influence.v1 import scheduler_pb2
from influence_client.models import MergeEstimate, MergeJob, MergeList, MergeSubmitted

# Routes declared like jobs_api's (see the note there on their shared shape).
router = APIRouter(prefix="/api/jobs/{job_id}/merges", tags=["merged weights"], responses=ERRORS)

MERGE_NOT_FOUND = "Merge not found"


def merge_view(job: scheduler_pb2.Job) -> dict[str, Any]:
    return later_job_view(job, "merge_job_id")


@router.post(
    "/estimate",
    summary="Time and cost of merging the adapter into the base before submitting it",
    response_model=MergeEstimate,
    responses={404: error("No such experiment"), 409: error("Not completed")},
)
async def estimate_merge(
    job_id: str, user: CurrentUser, scheduler: Scheduler, body: MergeRequest | None = None
) -> dict[str, Any]:
    """On the experiment's own backend: the 16-bit base read, merged, written, (uploaded) and
    read back for the check."""
    request = scheduler_pb2.EstimateJobRequest(
        user_id=user,
        kind=MERGE,
        parent_job_id=_checked_job_id(job_id),
        request_json=(body or MergeRequest()).model_dump_json().encode(),
    )
    answer = await scheduler.estimate_job(request, JOB_NOT_FOUND)
    return {
        "backend": answer.active_backend,
        "estimates": [estimate_view(estimate) for estimate in answer.estimates],
        "notes": list(answer.notes),
    }


@router.post(
    "",
    status_code=202,
    summary="Merge the adapter into the base and write plain transformers weights",
    response_model=MergeSubmitted,
    responses={
        404: error("No such experiment"),
        409: error("The experiment has not completed"),
        422: error("A field of the request does not fit"),
    },
)
async def submit_merge(
    job_id: str,
    response: Response,
    user: CurrentUser,
    scheduler: Scheduler,
    body: MergeRequest | None = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    """Sending the same ``Idempotency-Key`` again answers the merge it created the first time."""
    job = await submit_later_job(
        scheduler,
        user,
        job_id,
        MERGE,
        (body or MergeRequest()).model_dump_json().encode(),
        idempotency_key,
        "The scheduler is unavailable; the merge was not submitted, try again",
    )
    response.headers["Location"] = f"/api/jobs/{job_id}/merges/{job.id}"
    return submitted_view(job, "merge_job_id")


@router.get(
    "",
    summary="The experiment's merges, newest first",
    response_model=MergeList,
    responses={404: error("No such experiment")},
)
async def list_merges(job_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    jobs = await list_later_jobs(scheduler, user, job_id, MERGE)
    return {"merges": [merge_view(job) for job in jobs]}


@router.get(
    "/{merge_job_id}",
    summary="A merge's status and, once it completed, its result (the check and the files)",
    response_model=MergeJob,
    responses={404: error("No such merge of this experiment")},
)
async def get_merge(
    job_id: str, merge_job_id: str, user: CurrentUser, scheduler: Scheduler
) -> dict[str, Any]:
    job, result = await get_later_job(scheduler, user, job_id, merge_job_id, MERGE, MERGE_NOT_FOUND)
    return {**merge_view(job), "result": result}
