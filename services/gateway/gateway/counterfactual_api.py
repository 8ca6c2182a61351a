"""Counterfactual checks of an experiment (gpu_core.counterfactual): estimate, submit, list, read.

A check is a job of kind ``counterfactual`` whose parent is the experiment: it runs on that
experiment's backend with its stored spec and result, streams progress at
``/api/jobs/{check_id}/events`` and is cancelled at ``/api/jobs/{check_id}/cancel`` like any
job. Every route answers 404 for an experiment (or check) that is not the caller's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from gateway.deps import CurrentUser, Scheduler
from gateway.jobs_api import JOB_NOT_FOUND, _checked_job_id
from gateway.later_jobs import get_later_job, later_job_view, list_later_jobs, submit_later_job
from gateway.responses import ERRORS, error
from gateway.views import estimate_view, submitted_view
from gpu_core.jobs import COUNTERFACTUAL
from gpu_core.schemas import CounterfactualRequest
from influence.v1 import scheduler_pb2
from influence_client.models import (
    CounterfactualCheck,
    CounterfactualEstimate,
    CounterfactualList,
    CounterfactualSubmitted,
)

# Routes declared like jobs_api's (see the note there on their shared shape).
router = APIRouter(prefix="/api/jobs/{job_id}/counterfactual", tags=["counterfactual"], responses=ERRORS)

CHECK_NOT_FOUND = "Counterfactual check not found"


def _request_json(body: CounterfactualRequest) -> bytes:
    return body.model_dump_json().encode()


def check_view(job: scheduler_pb2.Job) -> dict[str, Any]:
    return later_job_view(job, "counterfactual_job_id")


@router.post(
    "/estimate",
    summary="Time and cost of a counterfactual check before submitting it",
    response_model=CounterfactualEstimate,
    responses={404: error("No such experiment"), 409: error("Not completed")},
)
async def estimate_check(
    job_id: str, body: CounterfactualRequest, user: CurrentUser, scheduler: Scheduler
) -> dict[str, Any]:
    """On the experiment's own backend: ``1 + controls + lds_subsets`` retrainings, each
    evaluated on the chosen eval examples."""
    request = scheduler_pb2.EstimateJobRequest(
        user_id=user,
        kind=COUNTERFACTUAL,
        parent_job_id=_checked_job_id(job_id),
        request_json=_request_json(body),
    )
    answer = await scheduler.estimate_job(request, JOB_NOT_FOUND)
    return {
        "backend": answer.active_backend,
        "retrainings": body.retrainings(),
        "estimates": [estimate_view(estimate) for estimate in answer.estimates],
        "notes": list(answer.notes),
    }


@router.post(
    "",
    status_code=202,
    summary="Start a counterfactual check: retrain without the top-k, and random controls",
    response_model=CounterfactualSubmitted,
    responses={
        404: error("No such experiment"),
        409: error("The experiment has not completed"),
        422: error("A field of the request does not fit the experiment"),
    },
)
async def submit_check(
    job_id: str,
    body: CounterfactualRequest,
    response: Response,
    user: CurrentUser,
    scheduler: Scheduler,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    """Sending the same ``Idempotency-Key`` again answers the check it created the first time."""
    job = await submit_later_job(
        scheduler,
        user,
        job_id,
        COUNTERFACTUAL,
        _request_json(body),
        idempotency_key,
        "The scheduler is unavailable; the check was not submitted, try again",
    )
    response.headers["Location"] = f"/api/jobs/{job_id}/counterfactual/{job.id}"
    return submitted_view(job, "counterfactual_job_id")


@router.get(
    "",
    summary="The experiment's counterfactual checks, newest first",
    response_model=CounterfactualList,
    responses={404: error("No such experiment")},
)
async def list_checks(job_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    jobs = await list_later_jobs(scheduler, user, job_id, COUNTERFACTUAL)
    return {"counterfactual_jobs": [check_view(job) for job in jobs]}


@router.get(
    "/{cf_job_id}",
    summary="A counterfactual check's status and, once it completed, its result",
    response_model=CounterfactualCheck,
    responses={404: error("No such check of this experiment")},
)
async def get_check(job_id: str, cf_job_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    job, result = await get_later_job(scheduler, user, job_id, cf_job_id, COUNTERFACTUAL, CHECK_NOT_FOUND)
    return {**check_view(job), "result": result}
