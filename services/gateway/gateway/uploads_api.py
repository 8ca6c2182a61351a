"""POST /api/uploads/{job_id}/{secret}: a RunPod or Modal worker asks for the upload URL of one of
its job's files, giving the file's name, size and sha256, and gets a presigned PUT of exactly that
size (scheduler.uploads.grant_upload, RPC GrantUpload): the artifact store itself refuses any
other body.

No session: the per-job upload secret in the URL (minted by the scheduler for the job's upload
plan, only its hash stored) is the credential, compared by the scheduler in constant time. A
wrong secret is a 403 that never repeats it, an unknown or deleted job a 404, a job that has
ended a 409, a name the job may not write a 422, a size over the operator's limits a 413. The
route is not in the researchers' API schema, and no path is logged (RequestMetrics labels the
route template only)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gateway.deps import Scheduler
from influence.v1 import scheduler_pb2

router = APIRouter(prefix="/api/uploads", include_in_schema=False)


class UploadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=1000)
    bytes: int = Field(ge=0, le=2**62)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class UploadGrant(BaseModel):
    url: str
    headers: dict[str, str]


@router.post("/{job_id}/{secret}")
async def grant_upload(job_id: str, secret: str, body: UploadRequest, scheduler: Scheduler) -> UploadGrant:
    url, headers = await scheduler.grant_upload(
        scheduler_pb2.GrantUploadRequest(
            job_id=job_id, secret=secret, name=body.name, bytes=body.bytes, sha256=body.sha256
        )
    )
    return UploadGrant(url=url, headers=headers)
