"""Follow-up queries to a finished experiment (gpu_core.query): submit, list, read.

A query is a job of kind ``query`` whose parent is the experiment: it runs on that experiment's
backend with its stored spec, result and files (adapter, gradient index), streams progress at
``/api/jobs/{query_job_id}/events`` and is cancelled at ``/api/jobs/{query_job_id}/cancel`` like
any job. The worker returns training ids and scores; the texts are looked up here from the
experiment's stored spec. Every route answers 404 for an experiment (or query) that is not the
caller's.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Response
from gpu_core.jobs import QUERY
from gpu_core.schemas import NO_SIZE_LIMITS, QueryRequest, TrainingExample, parse_spec
from influence.v1 import scheduler_pb2
from influence_client.models import QueryJob, QueryList, QuerySubmitted

from gateway.deps import Clients, CurrentUser, Trace
from gateway.jobs_api import JOB_NOT_FOUND, SCHEDULER_DOWN, _checked_job_id, _get_job, checked_idempotency_key
from gateway.responses import ERRORS, error
from gateway.upstream import ApiError, scheduler_errors
from gateway.views import job_status, job_view

router = APIRouter(prefix="/api/jobs/{job_id}/queries", tags=["queries"], responses=ERRORS)

QUERY_NOT_FOUND = "Query not found"


def query_view(job: scheduler_pb2.Job) -> dict[str, Any]:
    return {
        **job_view(job),
        "query_job_id": job.id,
        "parent_job_id": job.parent_job_id,
        "request": json.loads(job.request_json) if job.request_json else None,
    }


def example_text(example: TrainingExample) -> dict[str, str]:
    """The turns before the last answer (system turns left out), " / " between them, and that
    answer: as the dashboard shows an example."""
    turns = example.turns
    last = max(index for index, (role, _) in enumerate(turns) if role == "assistant")
    before = [content for role, content in turns[:last] if role != "system"]
    return {"prompt": " / ".join(before), "answer": turns[last][1]}


def with_texts(result: dict[str, Any], spec_json: bytes) -> dict[str, Any]:
    """The query result with each helpful and harmful training example's texts from the spec."""
    texts = {
        example.id: example_text(example)
        for example in parse_spec(spec_json, NO_SIZE_LIMITS).training_data
    }
    for answer in result.get("results", []):
        for side in ("helpful", "harmful"):
            answer[side] = [{**scored, "text": texts.get(scored["id"])} for scored in answer.get(side, [])]
    return result


@router.post(
    "",
    status_code=202,
    summary="Ask the experiment's fine-tuned model and attribute its answers to the training set",
    response_model=QuerySubmitted,
    responses={
        404: error("No such experiment"),
        409: error("The experiment has not completed"),
        422: error("A field of the request does not fit"),
    },
)
async def submit_query(
    job_id: str,
    body: QueryRequest,
    response: Response,
    user: CurrentUser,
    clients: Clients,
    trace: Trace,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    """Without ``expected`` a query attributes the model's own greedy answer; ``span``
    (character offsets into that answer) restricts the attributed loss to those tokens. Sending
    the same ``Idempotency-Key`` again answers the query job it created the first time."""
    checked_idempotency_key(idempotency_key)
    with scheduler_errors(
        "The scheduler is unavailable; the query was not submitted, try again", not_found=JOB_NOT_FOUND
    ):
        job = await clients.scheduler.SubmitJob(
            scheduler_pb2.SubmitJobRequest(
                user_id=user,
                idempotency_key=idempotency_key or "",
                kind=QUERY,
                parent_job_id=_checked_job_id(job_id),
                request_json=body.model_dump_json(exclude_none=True).encode(),
            ),
            metadata=trace,
            timeout=clients.timeout_s,
        )
    response.headers["Location"] = f"/api/jobs/{job_id}/queries/{job.id}"
    return {
        "query_job_id": job.id,
        "status": job_status(job.state),
        "estimated_time_s": job.estimated_time_s,
        "estimated_cost_usd": job.estimated_cost_usd,
    }


@router.get(
    "",
    summary="The experiment's queries, newest first",
    response_model=QueryList,
    responses={404: error("No such experiment")},
)
async def list_queries(job_id: str, user: CurrentUser, clients: Clients, trace: Trace) -> dict[str, Any]:
    await _get_job(clients, user, job_id, trace)
    with scheduler_errors(SCHEDULER_DOWN, not_found=JOB_NOT_FOUND):
        answer = await clients.scheduler.ListJobs(
            scheduler_pb2.ListJobsRequest(user_id=user, parent_job_id=job_id, kind=QUERY),
            metadata=trace,
            timeout=clients.timeout_s,
        )
    return {"queries": [query_view(job) for job in answer.jobs]}


@router.get(
    "/{query_job_id}",
    summary="A query's status and, once it completed, its answers with the training examples' texts",
    response_model=QueryJob,
    responses={404: error("No such query of this experiment")},
)
async def get_query(
    job_id: str, query_job_id: str, user: CurrentUser, clients: Clients, trace: Trace
) -> dict[str, Any]:
    with scheduler_errors(SCHEDULER_DOWN, not_found=QUERY_NOT_FOUND):
        job = await clients.scheduler.GetJob(
            scheduler_pb2.GetJobRequest(user_id=user, job_id=_checked_job_id(query_job_id)),
            metadata=trace,
            timeout=clients.timeout_s,
        )
    if job.kind != QUERY or job.parent_job_id != job_id:
        raise ApiError(404, QUERY_NOT_FOUND)
    view = {**query_view(job), "result": None}
    if view["status"] == "completed":
        with scheduler_errors(SCHEDULER_DOWN, not_found=QUERY_NOT_FOUND):
            answer = await clients.scheduler.GetJobResult(
                scheduler_pb2.GetJobResultRequest(user_id=user, job_id=job.id),
                metadata=trace,
                timeout=clients.timeout_s,
            )
            # The query's stored spec is its experiment's.
            spec = await clients.scheduler.GetJobSpec(
                scheduler_pb2.GetJobSpecRequest(user_id=user, job_id=job.id),
                metadata=trace,
                timeout=clients.timeout_s,
            )
        view["result"] = with_texts(json.loads(answer.result_json), spec.spec_json)
    return view
