"""Follow-up queries to a finished experiment (gpu_core.query): submit, list, read.

A query is a job of kind ``query`` whose parent is the experiment: it runs on that experiment's
backend with its stored spec, result and files (adapter, gradient index), streams progress at
``/api/jobs/{query_job_id}/events`` and is cancelled at ``/api/jobs/{query_job_id}/cancel`` like
any job. The worker returns training ids and scores; the texts are looked up here from the
experiment's stored spec. Every route answers 404 for an experiment (or query) that is not the
caller's.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from gateway.deps import CurrentUser, Scheduler
from gateway.later_jobs import get_later_job, later_job_view, list_later_jobs, submit_later_job
from gateway.responses import ERRORS, error
from gateway.views import submitted_view
from gpu_core.jobs import QUERY
from gpu_core.schemas import NO_SIZE_LIMITS, QueryRequest, TrainingExample, parse_spec
from influence.v1 import scheduler_pb2
from influence_client.models import QueryJob, QueryList, QuerySubmitted

# Routes declared like jobs_api's (see the note there on their shared shape).
router = APIRouter(prefix="/api/jobs/{job_id}/queries", tags=["queries"], responses=ERRORS)

QUERY_NOT_FOUND = "Query not found"


def query_view(job: scheduler_pb2.Job) -> dict[str, Any]:
    return later_job_view(job, "query_job_id")


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
        example.id: example_text(example) for example in parse_spec(spec_json, NO_SIZE_LIMITS).training_data
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
    scheduler: Scheduler,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    """Without ``expected`` a query attributes the model's own greedy answer; ``span``
    (character offsets into that answer) restricts the attributed loss to those tokens. Sending
    the same ``Idempotency-Key`` again answers the query job it created the first time."""
    job = await submit_later_job(
        scheduler,
        user,
        job_id,
        QUERY,
        body.model_dump_json(exclude_none=True).encode(),
        idempotency_key,
        "The scheduler is unavailable; the query was not submitted, try again",
    )
    response.headers["Location"] = f"/api/jobs/{job_id}/queries/{job.id}"
    return submitted_view(job, "query_job_id")


@router.get(
    "",
    summary="The experiment's queries, newest first",
    response_model=QueryList,
    responses={404: error("No such experiment")},
)
async def list_queries(job_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    jobs = await list_later_jobs(scheduler, user, job_id, QUERY)
    return {"queries": [query_view(job) for job in jobs]}


@router.get(
    "/{query_job_id}",
    summary="A query's status and, once it completed, its answers with the training examples' texts",
    response_model=QueryJob,
    responses={404: error("No such query of this experiment")},
)
async def get_query(
    job_id: str, query_job_id: str, user: CurrentUser, scheduler: Scheduler
) -> dict[str, Any]:
    job, result = await get_later_job(scheduler, user, job_id, query_job_id, QUERY, QUERY_NOT_FOUND)
    view = {**query_view(job), "result": None}
    if result is not None:
        # The query's stored spec is its experiment's.
        spec_json = await scheduler.job_spec(
            scheduler_pb2.GetJobSpecRequest(user_id=user, job_id=job.id), QUERY_NOT_FOUND
        )
        view["result"] = with_texts(result, spec_json)
    return view
