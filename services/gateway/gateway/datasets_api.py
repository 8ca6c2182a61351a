"""Stored datasets (issue 27): a training or eval file uploaded once, named by specs.

``POST /api/datasets`` streams the body to a file on disk (never whole in memory; hashed as it
arrives, refused past ``GATEWAY_MAX_DATASET_BYTES``), reads it there a row at a time with the
one parser (gpu_core.formats.stream_path: format, count, every row checked within the read
budget, the dataset limits ``GATEWAY_MAX_DATASET_*_EXAMPLES``), and only then streams it in
chunks to the scheduler, which puts it in the artifact store with its sha256 checked.

Retrying: an upload that fails stores nothing (the store's put is atomic and the row is written
after it), so the researcher sends the same file again. One that did arrive is not stored twice:
the same bytes of the same kind come back as the dataset already stored (``existing``), and
``GET /api/datasets?sha256=...`` says before an upload whether a file is there.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from gateway.deps import CurrentUser, Scheduler, SpecInvalid, State
from gateway.responses import ERRORS, error
from gateway.upstream import ApiError
from gpu_core.formats import FORMAT_LABELS, FileScan, ReadBudget, stream_path
from gpu_core.schemas import SpecLimits
from influence.v1 import scheduler_pb2
from influence_client.models import Dataset, DatasetList

router = APIRouter(prefix="/api", tags=["datasets"], responses=ERRORS)
UPLOAD_PATH = "/api/datasets"
DATASET_NOT_FOUND = "Dataset not found"
# Bytes per message to the scheduler (under gRPC's 4 MiB message limit).
_CHUNK_BYTES = 1024 * 1024
_UNAVAILABLE = "The scheduler is unavailable; the dataset was not stored. Send the file again shortly"


def dataset_view(dataset: scheduler_pb2.Dataset, existing: bool = False) -> dict[str, Any]:
    return {
        "dataset_id": dataset.id,
        "kind": dataset.kind,
        "filename": dataset.filename,
        "format": dataset.format,
        "format_label": FORMAT_LABELS.get(dataset.format, dataset.format),
        "count": dataset.count,
        "bytes": dataset.bytes,
        "sha256": dataset.sha256,
        "created_at": dataset.created_at.ToDatetime().isoformat() + "Z",
        "existing": existing,
    }


@router.post(
    "/datasets",
    status_code=201,
    summary="Store a training or eval file for specs to name by id",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The file's bytes: JSONL, JSON array, CSV or Parquet",
        }
    },
    response_model=Dataset,
    responses={
        413: error("The file is over a limit (its size, the examples, a row's size); the answer names it"),
        422: error("The file has problems; each names its line or row and field"),
    },
)
async def upload_dataset(
    request: Request,
    user: CurrentUser,
    state: State,
    scheduler: Scheduler,
    kind: Annotated[Literal["train", "eval"], Query(description="training or eval examples")],
    filename: Annotated[
        str, Query(min_length=1, max_length=255, description="decides CSV / Parquet / JSONL")
    ],
) -> dict[str, Any]:
    settings = state.settings
    with tempfile.TemporaryDirectory(prefix="gateway-dataset-") as folder:
        path = Path(folder) / "upload"
        sha256, size = await _spool(request, path, settings.gateway_max_dataset_bytes)
        if size == 0:
            raise ApiError(400, f"{filename} is empty")
        for stored in await scheduler.list_datasets(user):
            if stored.sha256 == sha256 and stored.kind == kind:
                return dataset_view(stored, existing=True)
        async with state.file_reads:
            scan = await asyncio.to_thread(
                _scan, kind, path, filename, settings.dataset_limits, settings.read_budget
            )
        if scan.over_budget:
            raise ApiError(413, f"{filename} {scan.problems[0].message}")
        if scan.problems or scan.format is None:
            raise SpecInvalid([{"field": p.where, "message": p.message} for p in scan.shown_problems])
        header = scheduler_pb2.Dataset(
            kind=kind,
            filename=filename,
            format=scan.format,
            count=scan.count,
            text_chars=scan.text_chars,
            answer_chars=scan.answer_chars,
            bytes=size,
            sha256=sha256,
        )
        stored = await scheduler.upload_dataset(_messages(user, header, path), _UNAVAILABLE)
    return dataset_view(stored)


async def _spool(request: Request, path: Path, max_bytes: int) -> tuple[str, int]:
    """The body written to ``path`` as it arrives: (sha256, bytes). 413 past ``max_bytes``
    (BodySizeLimit refuses it too; this holds whatever the middleware order)."""
    digest, size = hashlib.sha256(), 0
    with path.open("wb") as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"The file is larger than the dataset limit of {max_bytes:,} bytes")
            digest.update(chunk)
            spool.write(chunk)
    return digest.hexdigest(), size


def _scan(
    kind: Literal["train", "eval"], path: Path, filename: str, limits: SpecLimits, budget: ReadBudget
) -> FileScan:
    """Every row read and checked, none kept: the count, the sizes and the problems."""
    scan = FileScan()
    for _ in stream_path(kind, path, scan, limits, budget, filename=filename):
        pass
    return scan


async def _messages(
    user: str, header: scheduler_pb2.Dataset, path: Path
) -> AsyncIterator[scheduler_pb2.UploadDatasetRequest]:
    yield scheduler_pb2.UploadDatasetRequest(user_id=user, header=header)
    with path.open("rb") as source:
        while chunk := await asyncio.to_thread(source.read, _CHUNK_BYTES):
            yield scheduler_pb2.UploadDatasetRequest(data=chunk)


@router.get("/datasets", summary="Your stored datasets, newest first", response_model=DatasetList)
async def list_datasets(
    user: CurrentUser,
    scheduler: Scheduler,
    sha256: Annotated[
        str | None, Query(pattern=r"^[0-9a-f]{64}$", description="only the one with these bytes")
    ] = None,
) -> dict[str, Any]:
    found = await scheduler.list_datasets(user)
    return {"datasets": [dataset_view(d) for d in found if sha256 is None or d.sha256 == sha256]}


@router.get("/datasets/{dataset_id}", summary="One stored dataset", response_model=Dataset)
async def get_dataset(dataset_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    request = scheduler_pb2.DatasetRequest(user_id=user, dataset_id=dataset_id)
    return dataset_view(await scheduler.get_dataset(request, DATASET_NOT_FOUND))


@router.delete(
    "/datasets/{dataset_id}",
    summary="Delete a stored dataset (refused while a job that has not ended uses it)",
    response_model=Dataset,
    responses={409: error("A queued or running job uses the dataset; the answer names it")},
)
async def delete_dataset(dataset_id: str, user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    request = scheduler_pb2.DatasetRequest(user_id=user, dataset_id=dataset_id)
    return dataset_view(await scheduler.delete_dataset(request, DATASET_NOT_FOUND))
