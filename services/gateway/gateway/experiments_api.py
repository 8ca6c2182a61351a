"""Experiments as a researcher handles them: rename, retag and annotate one; compare 2-4;
download a group of its files (checkpoints and optimizer statistics) as one archive."""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from gateway.deps import CurrentUser, Scheduler, SpecInvalid, text_problems
from gateway.jobs_api import JOB_NOT_FOUND, _checked_job_id
from gateway.responses import ERRORS, error
from gateway.upstream import ApiError
from gateway.views import job_view
from gpu_core.compare import compare_experiments
from gpu_core.schemas import ExperimentLabels
from influence.v1 import scheduler_pb2
from influence_client.models import Comparison, Job
from service_runtime.jobs import state_name

router = APIRouter(prefix="/api", tags=["experiments"], responses=ERRORS)

MIN_COMPARED, MAX_COMPARED = 2, 4


@router.patch(
    "/jobs/{job_id}",
    summary="Rename, retag or annotate an experiment",
    response_model=Job,
    responses={404: error("No such experiment for this user"), 422: error("A label is not valid")},
)
async def update_labels(
    job_id: str, labels: ExperimentLabels, user: CurrentUser, scheduler: Scheduler
) -> dict[str, Any]:
    """Changes the fields given (``name``, ``tags``, ``note``); null clears one, a field left
    out keeps its value. Labels never change what the experiment computed."""
    given = labels.model_dump(include=labels.model_fields_set)
    problems = text_problems(given)
    if problems:
        raise SpecInvalid(problems)
    request = scheduler_pb2.UpdateJobLabelsRequest(user_id=user, job_id=_checked_job_id(job_id))
    if "name" in given and given["name"] is not None:
        request.name = given["name"]
    elif "name" in given:
        request.name = ""
    if "note" in given:
        request.note = given["note"] or ""
    if "tags" in given:
        request.set_tags = True
        request.tags.extend(given["tags"] or [])
    return job_view(await scheduler.update_job_labels(request, JOB_NOT_FOUND))


def _compared_ids(ids: list[str]) -> list[str]:
    """``ids=a,b`` or ``ids=a&ids=b``: 2 to 4 distinct job ids, in the order given."""
    parsed = [part.strip() for value in ids for part in value.split(",") if part.strip()]
    if len(set(parsed)) != len(parsed):
        raise SpecInvalid([{"field": "ids", "message": "names the same experiment twice"}])
    if not MIN_COMPARED <= len(parsed) <= MAX_COMPARED:
        raise SpecInvalid([{"field": "ids", "message": f"names {len(parsed)} experiments; compare 2 to 4"}])
    return [_checked_job_id(job_id) for job_id in parsed]


async def _run(scheduler: Scheduler, user: str, job_id: str) -> tuple[scheduler_pb2.Job, Any, Any]:
    """(job, spec, result or None) of one of the caller's experiments."""
    job = await scheduler.get_job(scheduler_pb2.GetJobRequest(user_id=user, job_id=job_id), JOB_NOT_FOUND)
    if job.kind and job.kind != "experiment":
        raise SpecInvalid([{"field": "ids", "message": f"{job_id} is a {job.kind} job, not an experiment"}])
    spec = json.loads(
        await scheduler.job_spec(scheduler_pb2.GetJobSpecRequest(user_id=user, job_id=job_id), JOB_NOT_FOUND)
    )
    result = None
    if state_name(job.state) == "completed":
        result = json.loads(
            await scheduler.job_result(
                scheduler_pb2.GetJobResultRequest(user_id=user, job_id=job_id), JOB_NOT_FOUND
            )
        )
    return job, spec, result


@router.get(
    "/compare",
    summary="Compare 2 to 4 experiments",
    response_model=Comparison,
    responses={
        404: error("One of the ids is not an experiment of this user"),
        422: error("Fewer than 2 or more than 4 ids, or one twice"),
    },
)
async def compare(
    user: CurrentUser,
    scheduler: Scheduler,
    ids: Annotated[list[str], Query(description="Job ids, comma-separated or repeated")],
) -> dict[str, Any]:
    """What differs in their specs (only those fields), each evaluation's metrics, the loss
    curves, each eval example's answers per run and, for runs on the same data, how far their
    influence agrees: top-k overlap per eval example and the Spearman rank correlation of each
    training example's net influence (its scores summed over the eval examples)."""
    job_ids = _compared_ids(ids)
    runs = await asyncio.gather(*(_run(scheduler, user, job_id) for job_id in job_ids))
    comparison = compare_experiments(
        job_ids, [spec for _, spec, _ in runs], [result for _, _, result in runs]
    )
    return {"runs": [job_view(job) for job, _, _ in runs], **comparison}


class _ZipSink(io.RawIOBase):
    """Where zipfile writes an archive that is streamed as it is built: not seekable, so every
    entry carries a data descriptor and nothing is rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._written += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._written

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


@router.get(
    "/jobs/{job_id}/artifacts.zip",
    summary="Several of a job's files as one zip archive (streamed)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/zip": {}}},
        404: error("No such job for this user, or no file under that prefix"),
    },
)
async def artifact_archive(
    job_id: str,
    user: CurrentUser,
    scheduler: Scheduler,
    prefix: Annotated[
        str, Query(max_length=200, description="Only files whose name starts with this, e.g. checkpoints/")
    ] = "",
) -> StreamingResponse:
    """Every file of the job under ``prefix``, read from the artifact store one at a time and
    written into the zip as it arrives (stored, not compressed: weights do not compress)."""
    listing = scheduler_pb2.ListJobArtifactsRequest(user_id=user, job_id=_checked_job_id(job_id))
    artifacts = [
        artifact
        for artifact in (await scheduler.list_artifacts(listing, JOB_NOT_FOUND)).artifacts
        if artifact.name.startswith(prefix)
    ]
    if not artifacts:
        raise ApiError(404, f"The job has no files under {prefix!r}" if prefix else "The job has no files")

    async def body() -> AsyncIterator[bytes]:
        sink = _ZipSink()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
            for artifact in artifacts:
                call = scheduler.read_artifact(
                    scheduler_pb2.JobArtifactRequest(user_id=user, job_id=job_id, name=artifact.name)
                )
                entry = zipfile.ZipInfo(artifact.name, date_time=time.gmtime()[:6])
                try:
                    with archive.open(entry, "w", force_zip64=artifact.bytes >= 2**31) as member:
                        async for chunk in call:
                            member.write(chunk.data)
                            yield sink.take()
                finally:
                    call.cancel()
        yield sink.take()

    name = (prefix.strip("/").replace("/", "-") or "files") + f"-{job_id[:8]}.zip"
    return StreamingResponse(
        body(),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "private, no-store",
        },
    )
