"""Job routes: submit, estimate, list, status, progress (SSE), results, cancel, delete, artifacts."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.background import BackgroundTask

from gateway.deps import CurrentUser, KeyVault, Scheduler, SpecInvalid, State, StreamSlot, read_spec
from gateway.events import job_event_stream
from gateway.models_api import runpod_gpu_refusal
from gateway.responses import ERRORS, error
from gateway.settings_api import gated_model_refusal
from gateway.upstream import ApiError
from gateway.views import estimate_view, job_view, submitted_view
from gpu_core.datareport import data_report
from gpu_core.schemas import ExperimentResult, ExperimentSpec, InfluenceMethod, parse_spec
from influence.v1 import scheduler_pb2
from influence_client.models import ArtifactList, EstimateAnswer, Job, JobDeleted, JobList, SubmittedJob
from service_runtime.jobs import TERMINAL_STATES, state_name

# Each route is a declaration (path, summary, response model, errors) and one or two calls of
# the typed SchedulerClient, which holds what calls share (trace, deadline, error mapping); the
# later-job routes share later_jobs, the views share views. The declarations alike in shape, here
# and in counterfactual_api, queries_api and settings_api (`duplicates` pairs them), stay: each
# route declares its own path, models and parameters, and a shared wrapper would hide the
# signature FastAPI reads.
router = APIRouter(prefix="/api", tags=["jobs"], responses=ERRORS)

JOB_NOT_FOUND = "Job not found"
ARTIFACT_NOT_FOUND = "Job or artifact not found"
# Event seqs are int64 in the scheduler's contract (and bigint in its table).
MAX_SEQ = 2**63 - 1
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
JobStatus = Literal["queued", "submitted", "running", "completed", "failed", "cancelled"]


def _spec_body(ref_template: str = "#/components/schemas/{model}") -> dict[str, Any]:
    schema = ExperimentSpec.model_json_schema(ref_template=ref_template)
    schema.pop("$defs", None)
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
            "description": "A gpu_core ExperimentSpec",
        }
    }


def spec_component_schemas() -> dict[str, Any]:
    """The spec's nested models, for the OpenAPI document's components."""
    schema = ExperimentSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    return dict(schema.get("$defs", {}))


def _checked_job_id(job_id: str) -> str:
    # A malformed id cannot name any job: same answer as someone else's job.
    if not _JOB_ID.fullmatch(job_id):
        raise ApiError(404, JOB_NOT_FOUND)
    return job_id


def checked_runpod_gpu(spec: ExperimentSpec) -> None:
    refusal = runpod_gpu_refusal(spec)
    if refusal:
        raise SpecInvalid([{"field": "runpod_gpu", "message": refusal}])


def checked_idempotency_key(key: str | None) -> None:
    if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(422, "Idempotency-Key must be 1-200 printable ASCII characters without spaces")


@router.post(
    "/train",
    status_code=202,
    openapi_extra=_spec_body(),
    summary="Submit an experiment",
    response_model=SubmittedJob,
    responses={
        413: error("Body too large"),
        422: error(
            "Invalid spec (one {field, message} per problem), a gated model without your Hugging Face "
            "token, or over the hosted per-job ceiling"
        ),
        429: error("Over a usage limit; Retry-After says when to try again"),
    },
)
async def submit_job(
    request: Request,
    response: Response,
    user: CurrentUser,
    state: State,
    scheduler: Scheduler,
    keyvault: KeyVault,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    max_cost_usd: Annotated[
        float | None,
        Query(
            gt=0,
            le=1_000_000,
            description="Your spend cap for this job in USD: an estimate over it is refused (422), "
            "and the job is cancelled when its time so far, at the estimate's GPU rate, reaches it",
        ),
    ] = None,
) -> dict[str, Any]:
    """Validates the spec under this deployment's limits and hands it to the scheduler. A gated
    model (Llama, Gemma) on RunPod or Modal needs the caller's Hugging Face token first (422). Sending
    the same ``Idempotency-Key`` again answers the job it created the first time."""
    checked_idempotency_key(idempotency_key)
    spec_json = await read_spec(request, state.spec_limits)
    checked_runpod_gpu(parse_spec(spec_json, state.spec_limits))
    refusal = await gated_model_refusal(json.loads(spec_json)["model_id"], user, scheduler, keyvault)
    if refusal:
        raise SpecInvalid([{"field": "model_id", "message": refusal}])
    request_message = scheduler_pb2.SubmitJobRequest(
        user_id=user,
        spec_json=spec_json,
        idempotency_key=idempotency_key or "",
        max_cost_usd=max_cost_usd or 0.0,
    )
    job = await scheduler.submit_job(
        request_message, "The scheduler is unavailable; your job was not submitted, try again"
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return submitted_view(job)


@router.post(
    "/estimate", openapi_extra=_spec_body(), summary="Estimate time and cost", response_model=EstimateAnswer
)
async def estimate_job(
    request: Request, user: CurrentUser, state: State, scheduler: Scheduler
) -> dict[str, Any]:
    """Time and cost of the experiment on the caller's backend (first) and on the other one, and
    ``data_report``: token lengths with the model's tokenizer, truncation at max_seq_len,
    duplicates and eval examples that copy a training example (gpu_core.datareport)."""
    spec_json = await read_spec(request, state.spec_limits)
    spec = parse_spec(spec_json, state.spec_limits)
    checked_runpod_gpu(spec)
    report = await asyncio.to_thread(data_report, spec)
    answer = await scheduler.estimate_job(scheduler_pb2.EstimateJobRequest(user_id=user, spec_json=spec_json))
    return {
        "active_backend": answer.active_backend,
        "estimates": [estimate_view(estimate) for estimate in answer.estimates],
        "notes": list(answer.notes),
        "data_report": report,
    }


@router.get("/jobs", summary="The caller's jobs, newest first", response_model=JobList)
async def list_jobs(
    user: CurrentUser,
    scheduler: Scheduler,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    tag: Annotated[str, Query(max_length=40, description="Only experiments with this tag")] = "",
    model: Annotated[str, Query(max_length=256, description="Only experiments of this model_id")] = "",
    method: Annotated[InfluenceMethod | None, Query(description="Only this influence method")] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status")] = None,
) -> dict[str, Any]:
    """Experiments with their name, tags, outcome and run time; the filters combine."""
    request = scheduler_pb2.ListJobsRequest(
        user_id=user, limit=limit, tag=tag, model_id=model, influence_method=method or "", status=status or ""
    )
    answer = await scheduler.list_jobs(request)
    return {"jobs": [job_view(job) for job in answer.jobs]}


async def _get_job(scheduler: Scheduler, user: str, job_id: str) -> scheduler_pb2.Job:
    request = scheduler_pb2.GetJobRequest(user_id=user, job_id=_checked_job_id(job_id))
    return await scheduler.get_job(request, JOB_NOT_FOUND)


@router.get(
    "/jobs/{job_id}",
    summary="Status, stage, progress and latest metrics of a job",
    response_model=Job,
    responses={404: error("No such job for this user")},
)
async def get_job(job_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    return job_view(await _get_job(scheduler, user, job_id))


@router.get(
    "/jobs/{job_id}/events",
    summary="Progress as Server-Sent Events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/JobEvent"}}},
            "description": "``id: <seq>`` and ``data: <JobEvent>`` per event, then ``event: end``",
        },
        404: error("No such job for this user"),
        429: error("The user has as many progress streams open as the gateway allows"),
    },
)
async def job_events(
    job_id: str,
    user: CurrentUser,
    state: State,
    scheduler: Scheduler,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="Resume after this event seq")] = None,
) -> StreamingResponse:
    """Every progress event after ``Last-Event-ID`` (or ``?after=``), then ``event: end``."""
    after_seq = after or 0
    if last_event_id is not None:
        text = last_event_id.strip()
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_SEQ:
            raise ApiError(422, f"Last-Event-ID must be the seq number of an event (0 to {MAX_SEQ})")
        after_seq = max(after_seq, int(text))
    slot = state.streams.take(user)
    try:
        await _get_job(scheduler, user, job_id)
    except BaseException:
        slot.release()
        raise
    stream = job_event_stream(scheduler, user, job_id, after_seq, state.settings.gateway_sse_heartbeat_s)
    return StreamingResponse(
        _released_at_end(stream, slot),
        media_type="text/event-stream",
        # Proxies (nginx) must not buffer or the browser sees nothing until the end.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # A response that never started its body still gives the slot back.
        background=BackgroundTask(slot.release),
    )


async def _released_at_end(stream: AsyncIterator[bytes], slot: StreamSlot) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        slot.release()


@router.get(
    "/jobs/{job_id}/results",
    summary="The gpu_core result JSON",
    responses={
        200: {"model": ExperimentResult, "description": "gpu_core's ExperimentResult, as stored"},
        404: error("No such job for this user"),
        409: error("The job has not finished"),
    },
)
async def job_results(job_id: str, user: CurrentUser, scheduler: Scheduler) -> Response:
    job = await _get_job(scheduler, user, job_id)
    status = state_name(job.state)
    if status != "completed":
        if status in TERMINAL_STATES:
            detail = f": {job.error}" if job.error else ""
            raise ApiError(409, f"The job {status} and has no results{detail}")
        raise ApiError(409, f"The job is {status}; results are ready once it completes")
    result_json = await scheduler.job_result(
        scheduler_pb2.GetJobResultRequest(user_id=user, job_id=job_id), JOB_NOT_FOUND
    )
    # As stored: the dashboard reads gpu_core's result schema directly.
    return Response(content=result_json, media_type="application/json")


@router.get(
    "/jobs/{job_id}/spec",
    summary="The job's experiment spec, with every example's id",
    responses={
        200: {"model": ExperimentSpec, "description": "The spec as stored"},
        404: error("No such job for this user"),
    },
)
async def job_spec(job_id: str, user: CurrentUser, scheduler: Scheduler) -> Response:
    request = scheduler_pb2.GetJobSpecRequest(user_id=user, job_id=_checked_job_id(job_id))
    return Response(content=await scheduler.job_spec(request, JOB_NOT_FOUND), media_type="application/json")


@router.post(
    "/jobs/{job_id}/cancel",
    summary="Cancel a job",
    response_model=Job,
    responses={404: error("No such job for this user")},
)
async def cancel_job(job_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    request = scheduler_pb2.CancelJobRequest(user_id=user, job_id=_checked_job_id(job_id))
    return job_view(await scheduler.cancel_job(request, JOB_NOT_FOUND))


@router.delete(
    "/jobs/{job_id}",
    summary="Delete a job (cancelled first if running) and its artifacts",
    response_model=JobDeleted,
    responses={404: error("No such job for this user")},
)
async def delete_job(job_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    request = scheduler_pb2.DeleteJobRequest(user_id=user, job_id=_checked_job_id(job_id))
    answer = await scheduler.delete_job(request, JOB_NOT_FOUND)
    return {"id": job_id, "deleted": True, "deleted_artifacts": answer.deleted_artifacts}


def _artifact_view(artifact: Any) -> dict[str, Any]:
    return {
        "name": artifact.name,
        "bytes": artifact.bytes,
        "sha256": artifact.sha256,
        "media_type": artifact.media_type,
    }


@router.get(
    "/jobs/{job_id}/artifacts",
    summary="The files of a job: score matrix, adapter, checkpoints",
    response_model=ArtifactList,
    responses={404: error("No such job for this user")},
)
async def list_artifacts(job_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    request = scheduler_pb2.ListJobArtifactsRequest(user_id=user, job_id=_checked_job_id(job_id))
    answer = await scheduler.list_artifacts(request, JOB_NOT_FOUND)
    return {"artifacts": [_artifact_view(artifact) for artifact in answer.artifacts]}


@router.get(
    "/jobs/{job_id}/artifacts/{name:path}",
    summary="Download one artifact (streamed, or a redirect to a short-lived URL of the store)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        307: {"description": "Presigned URL"},
        404: error("No such job or artifact for this user"),
    },
)
async def download_artifact(job_id: str, name: str, user: CurrentUser, scheduler: Scheduler) -> Response:
    request = scheduler_pb2.JobArtifactRequest(user_id=user, job_id=_checked_job_id(job_id), name=name)
    opened = await scheduler.open_artifact(request, ARTIFACT_NOT_FOUND)
    if opened.download_url:
        return RedirectResponse(opened.download_url, status_code=307)
    artifact = opened.artifact
    call = scheduler.read_artifact(request)

    async def body() -> Any:
        try:
            async for chunk in call:
                yield chunk.data
        finally:
            call.cancel()

    filename = artifact.name.rsplit("/", 1)[-1]
    return StreamingResponse(
        body(),
        media_type=artifact.media_type or "application/octet-stream",
        headers={
            "Content-Length": str(artifact.bytes),
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Content-SHA256": artifact.sha256,
            "Cache-Control": "private, no-store",
        },
    )
