"""The training set of a finished experiment: its ranked examples (gpu_core.training_summary) and
curations (gpu_core.curation): retrain on a selection against random ones of the same size.

The ranking is read from the experiment's ``training_summary.json`` artifact. A curation is a job
of kind ``curation`` whose parent is the experiment, on that experiment's backend; a rule
(``drop`` the N most harmful / suspect / self-influential, or ``keep`` the most helpful fraction)
is turned into ids here, from the same summary, so the job needs none of the parent's files.
Its progress is at ``/api/jobs/{curation_id}/events`` and it is cancelled at
``/api/jobs/{curation_id}/cancel`` like any job. The selected training set downloads as JSONL or
Parquet in the experiment's own format, and starts a new experiment (the parent's spec with the
curated training set). Every route answers 404 for an experiment (or curation) that is
not the caller's, 409 before the experiment completed.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.deps import CurrentUser, KeyVault, Scheduler, SpecInvalid, State, validation_problems
from gateway.jobs_api import (
    ARTIFACT_NOT_FOUND,
    JOB_NOT_FOUND,
    _checked_job_id,
    _get_job,
    checked_idempotency_key,
)
from gateway.later_jobs import get_later_job, later_job_view, list_later_jobs, submit_later_job
from gateway.responses import ERRORS, error
from gateway.settings_api import gated_model_refusal
from gateway.upstream import ApiError, SchedulerClient
from gateway.views import estimate_view, submitted_view
from gpu_core.curation_schemas import MAX_CONTROLS, MAX_SEEDS, CurationRequest, DropRule, KeepRule
from gpu_core.formats import examples_to_parquet
from gpu_core.jobs import CURATION
from gpu_core.schemas import NO_SIZE_LIMITS, ExperimentSpec, TrainingExample, parse_spec
from gpu_core.training_summary import SUMMARY_NAME, TrainingSetSummary, page
from influence.v1 import scheduler_pb2
from influence_client.models import (
    CuratedExample,
    Curation,
    CurationEstimate,
    CurationList,
    CurationSubmitted,
    SubmittedJob,
    TrainingExamples,
)
from service_runtime.jobs import state_name

router = APIRouter(prefix="/api/jobs/{job_id}", tags=["training data"], responses=ERRORS)

CURATION_NOT_FOUND = "Curation not found"
NO_SUMMARY = "This experiment has no training summary (it ran before summaries were computed)"
MAX_PAGE = 1000


class CurationSubmit(BaseModel):
    """One selection: ``drop_ids``, or a rule (``drop`` by a signal, ``keep`` by helpfulness)."""

    model_config = ConfigDict(extra="forbid")

    drop_ids: list[str] | None = Field(default=None, min_length=1)
    drop: DropRule | None = None
    keep: KeepRule | None = None
    controls: int = Field(default=1, ge=0, le=MAX_CONTROLS)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS)

    @model_validator(mode="after")
    def _one_selection(self) -> CurationSubmit:
        given = [name for name in ("drop_ids", "drop", "keep") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of drop_ids, drop {by, count} or keep {by, fraction}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: each seed once")
        return self


async def _completed_experiment(scheduler: SchedulerClient, user: str, job_id: str) -> scheduler_pb2.Job:
    job = await _get_job(scheduler, user, job_id)
    if job.kind not in ("", "experiment"):
        raise ApiError(404, JOB_NOT_FOUND)
    status = state_name(job.state)
    if status != "completed":
        raise ApiError(409, f"The experiment is {status}; its training set is ranked once it completes")
    return job


async def _read_summary(scheduler: SchedulerClient, user: str, job_id: str) -> dict[str, Any]:
    request = scheduler_pb2.JobArtifactRequest(user_id=user, job_id=job_id, name=SUMMARY_NAME)
    try:
        opened = await scheduler.open_artifact(request, ARTIFACT_NOT_FOUND)
    except ApiError as exc:
        if exc.status == 404:
            raise ApiError(404, NO_SUMMARY) from None
        raise
    if opened.download_url:
        import httpx

        async with httpx.AsyncClient(timeout=60) as client:
            answer = await client.get(opened.download_url)
        if answer.status_code != 200:
            raise ApiError(
                502, f"artifact store: the training summary could not be read ({answer.status_code})"
            )
        return json.loads(answer.content)
    call = scheduler.read_artifact(request)
    chunks = []
    try:
        async for chunk in call:
            chunks.append(chunk.data)
    finally:
        call.cancel()
    return json.loads(b"".join(chunks))


@router.get(
    "/training-examples",
    summary="The experiment's training examples ranked by one signal of its training summary",
    response_model=TrainingExamples,
    responses={
        404: error("No such experiment, or it has no training summary"),
        409: error("The experiment has not completed"),
        422: error("A bad sort, limit or offset"),
    },
)
async def training_examples(
    job_id: str,
    user: CurrentUser,
    scheduler: Scheduler,
    sort: Annotated[
        Literal["harmful", "helpful", "self_influence", "loss", "worst_harm", "suspect"], Query()
    ] = "suspect",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """``net_influence``: summed over the eval set, positive = helpful. ``self_influence``: the
    method's score of the example on itself. ``train_loss``: its answer's mean loss under the
    fine-tuned model. ``worst_harm``: its lowest score on any one eval example, in that eval
    example's standard deviations. ``suspect_rank``: 1 = most suspect (see docs/influence.md)."""
    await _completed_experiment(scheduler, user, job_id)
    examples, total = page(await _read_summary(scheduler, user, job_id), sort, limit, offset)
    return {"examples": examples, "total": total}


async def _resolved(
    body: CurationSubmit, scheduler: SchedulerClient, user: str, job_id: str
) -> CurationRequest:
    """The request with the rule turned into ids from the training summary."""
    if body.drop_ids is not None:
        return CurationRequest(drop_ids=body.drop_ids, controls=body.controls, seeds=body.seeds)
    summary = TrainingSetSummary.from_json(await _read_summary(scheduler, user, job_id))
    n = len(summary.ids)
    if body.drop is not None:
        if body.drop.count >= n:
            raise ApiError(422, f"drop.count: must be less than the {n} training examples")
        if body.drop.by == "worst_harm" and not summary.has_worst_harm:
            raise ApiError(
                422,
                "drop.by: this experiment's training summary predates worst harm; "
                "drop by harmful, suspect, self_influence or loss",
            )
        order = summary.order(body.drop.by)[: body.drop.count]
        ids = [summary.ids[j] for j in order]
        return CurationRequest(drop_ids=ids, drop=body.drop, controls=body.controls, seeds=body.seeds)
    assert body.keep is not None
    count = max(1, round(body.keep.fraction * n))
    ids = [summary.ids[j] for j in summary.order("helpful")[:count]]
    return CurationRequest(keep_ids=ids, keep=body.keep, controls=body.controls, seeds=body.seeds)


def curation_view(job: scheduler_pb2.Job) -> dict[str, Any]:
    return later_job_view(job, "curation_job_id")


@router.post(
    "/curations/estimate",
    summary="Time and cost of a curation before submitting it",
    response_model=CurationEstimate,
    responses={404: error("No such experiment"), 409: error("Not completed"), 422: error("A bad field")},
)
async def estimate_curation(
    job_id: str, body: CurationSubmit, user: CurrentUser, scheduler: Scheduler
) -> dict[str, Any]:
    await _completed_experiment(scheduler, user, job_id)
    resolved = await _resolved(body, scheduler, user, job_id)
    request = scheduler_pb2.EstimateJobRequest(
        user_id=user,
        kind=CURATION,
        parent_job_id=_checked_job_id(job_id),
        request_json=resolved.model_dump_json(exclude_none=True).encode(),
    )
    answer = await scheduler.estimate_job(request, JOB_NOT_FOUND)
    return {
        "backend": answer.active_backend,
        "retrainings": resolved.retrainings(),
        "selected": len(resolved.drop_ids or resolved.keep_ids or []),
        "mode": "drop" if resolved.drop_ids is not None else "keep",
        "estimates": [estimate_view(estimate) for estimate in answer.estimates],
        "notes": list(answer.notes),
    }


@router.post(
    "/curations",
    status_code=202,
    summary="Retrain on a selection of the training set against random selections of the same size",
    response_model=CurationSubmitted,
    responses={
        404: error("No such experiment"),
        409: error("The experiment has not completed"),
        422: error("A field of the request does not fit the experiment"),
    },
)
async def submit_curation(
    job_id: str,
    body: CurationSubmit,
    response: Response,
    user: CurrentUser,
    scheduler: Scheduler,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    """Sending the same ``Idempotency-Key`` again answers the curation it created the first time."""
    await _completed_experiment(scheduler, user, job_id)
    resolved = await _resolved(body, scheduler, user, job_id)
    job = await submit_later_job(
        scheduler,
        user,
        job_id,
        CURATION,
        resolved.model_dump_json(exclude_none=True).encode(),
        idempotency_key,
        "The scheduler is unavailable; the curation was not submitted, try again",
    )
    response.headers["Location"] = f"/api/jobs/{job_id}/curations/{job.id}"
    return submitted_view(job, "curation_job_id")


@router.get(
    "/curations",
    summary="The experiment's curations, newest first",
    response_model=CurationList,
    responses={404: error("No such experiment")},
)
async def list_curations(job_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    jobs = await list_later_jobs(scheduler, user, job_id, CURATION)
    return {"curations": [curation_view(job) for job in jobs]}


@router.get(
    "/curations/{curation_id}",
    summary="A curation's status and, once it completed, its result",
    response_model=Curation,
    responses={404: error("No such curation of this experiment")},
)
async def get_curation(
    job_id: str, curation_id: str, user: CurrentUser, scheduler: Scheduler
) -> dict[str, Any]:
    job, result = await get_later_job(scheduler, user, job_id, curation_id, CURATION, CURATION_NOT_FOUND)
    return {**curation_view(job), "result": result}


async def _curated_examples(
    scheduler: SchedulerClient, user: str, job_id: str, curation_id: str
) -> tuple[ExperimentSpec, list[TrainingExample]]:
    """The experiment's spec and the training examples its curation ``curation_id`` trained on
    (404 for a curation that is not the caller's, under this experiment)."""
    job, _ = await get_later_job(scheduler, user, job_id, curation_id, CURATION, CURATION_NOT_FOUND)
    request = CurationRequest.model_validate_json(job.request_json)
    spec_json = await scheduler.job_spec(
        scheduler_pb2.GetJobSpecRequest(user_id=user, job_id=job_id), CURATION_NOT_FOUND
    )
    spec = parse_spec(spec_json, NO_SIZE_LIMITS)
    if request.drop_ids is not None:
        dropped = set(request.drop_ids)
        return spec, [example for example in spec.training_data if example.id not in dropped]
    wanted = set(request.keep_ids or [])
    return spec, [example for example in spec.training_data if example.id in wanted]


def _download(body: bytes, media_type: str, filename: str) -> Response:
    return Response(
        body,
        media_type=media_type,
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "private, no-store",
        },
    )


@router.get(
    "/curations/{curation_id}/training-set.jsonl",
    summary="The curated training set (the examples the curation trained on) as JSONL",
    response_class=Response,
    responses={
        200: {
            "model": CuratedExample,
            "content": {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/CuratedExample"}}},
            "description": "One training example per line",
        },
        404: error("No such curation"),
    },
)
async def curated_training_set(
    job_id: str, curation_id: str, user: CurrentUser, scheduler: Scheduler
) -> Response:
    """One example per line in the experiment's own format (prompt/completion or messages), ids
    kept: upload it as the training data of a new experiment."""
    _, kept = await _curated_examples(scheduler, user, job_id, curation_id)
    body = "".join(json.dumps(example.model_dump(), ensure_ascii=False) + "\n" for example in kept)
    return _download(body.encode(), "application/x-ndjson", f"curated-{curation_id}.jsonl")


@router.get(
    "/curations/{curation_id}/training-set.parquet",
    summary="The curated training set as Parquet",
    response_class=Response,
    responses={
        200: {
            "content": {"application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}}},
            "description": "One row per training example: id and prompt/completion, or id and messages",
        },
        404: error("No such curation"),
    },
)
async def curated_training_set_parquet(
    job_id: str, curation_id: str, user: CurrentUser, scheduler: Scheduler
) -> Response:
    """The same examples as the JSONL, in the experiment's own format: columns ``id``, ``prompt``,
    ``completion``, or ``id`` and ``messages`` (a list of role/content structs) for
    conversations; the upload page and the CLI read it back as they read any Parquet."""
    _, kept = await _curated_examples(scheduler, user, job_id, curation_id)
    body = examples_to_parquet([example.model_dump() for example in kept])
    return _download(body, "application/vnd.apache.parquet", f"curated-{curation_id}.parquet")


@router.post(
    "/curations/{curation_id}/experiment",
    status_code=202,
    summary="Start a new experiment from the curated training set",
    response_model=SubmittedJob,
    responses={
        404: error("No such curation"),
        422: error("The new spec does not fit this deployment's limits, or a gated model needs your token"),
        429: error("Over a usage limit; Retry-After says when to try again"),
    },
)
async def experiment_from_curation(
    job_id: str,
    curation_id: str,
    response: Response,
    user: CurrentUser,
    state: State,
    scheduler: Scheduler,
    keyvault: KeyVault,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    """The experiment's own spec (model, eval set, hyperparameters, influence method) with the
    curation's training set (ids kept), submitted as a new experiment exactly as ``POST
    /api/train`` would: under this deployment's limits, the gated-model check, usage limits.
    Sending the same ``Idempotency-Key`` again answers the experiment it created the first time."""
    checked_idempotency_key(idempotency_key)
    spec, kept = await _curated_examples(scheduler, user, job_id, curation_id)
    data = {**spec.model_dump(mode="json"), "training_data": [example.model_dump() for example in kept]}
    try:
        curated = ExperimentSpec.model_validate(data, context={"limits": state.spec_limits})
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        raise SpecInvalid(validation_problems(errors, False)) from None
    refusal = await gated_model_refusal(curated.model_id, user, scheduler, keyvault)
    if refusal:
        raise SpecInvalid([{"field": "model_id", "message": refusal}])
    job = await scheduler.submit_job(
        scheduler_pb2.SubmitJobRequest(
            user_id=user,
            spec_json=curated.model_dump_json().encode(),
            idempotency_key=idempotency_key or "",
        ),
        "The scheduler is unavailable; the experiment was not submitted, try again",
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return submitted_view(job)
