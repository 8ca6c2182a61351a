"""Stored datasets (issue 27): a training or eval file uploaded once and named by specs.

The gateway reads the file first (gpu_core.formats.stream_path: format, count, sizes, every row
checked) and then streams its bytes here in chunks; they go straight into the artifact store
under ``datasets/{id}/data{suffix}`` with the gateway's sha256 and size checked before the object
becomes visible, and the row is written only after that. Neither service holds the file in
memory: one chunk at a time.

At submit a spec's ``training_dataset_id`` / ``eval_dataset_id`` is looked up among the user's
datasets (another user's is unknown) and the dataset's record is written into the spec
(``training_dataset`` / ``eval_dataset``: count, sizes, sha256), so estimates count its examples
and the worker can check what it reads. At dispatch the worker gets one GET URL per dataset.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import asyncpg

from artifact_store import ArtifactStore, ChecksumMismatch
from gpu_core.schemas import ExperimentSpec
from influence.v1 import compute_pb2, scheduler_pb2
from scheduler.store import Store
from scheduler.uploads import download_url
from service_runtime.jobs import ACTIVE_STATES

_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_DATASET_ID = re.compile(r"^ds_[0-9a-f]{32}$")
_COLUMNS = "id, user_id, kind, filename, format, count, text_chars, answer_chars, bytes, sha256, created_at"
_ROLES = {"training": "train", "eval": "eval"}


class DatasetNotFound(Exception):
    """No dataset of the user's by that id."""


class DatasetInUse(Exception):
    """A queued or running job names the dataset; the message says which."""


class DatasetReferenceError(ValueError):
    """A spec names a dataset the user does not have, or one of the other kind; names the field."""


class DatasetUploadError(ValueError):
    """The upload stream was not a header followed by data, or arrived different from its header."""


@dataclass(frozen=True)
class DatasetRow:
    id: str
    user_id: str
    kind: str
    filename: str
    format: str
    count: int
    text_chars: int
    answer_chars: int
    bytes: int
    sha256: str
    created_at: datetime

    @property
    def key(self) -> str:
        return dataset_key(self.id, self.filename)

    def to_proto(self) -> scheduler_pb2.Dataset:
        message = scheduler_pb2.Dataset(
            id=self.id,
            kind=self.kind,
            filename=self.filename,
            format=self.format,
            count=self.count,
            text_chars=self.text_chars,
            answer_chars=self.answer_chars,
            bytes=self.bytes,
            sha256=self.sha256,
        )
        message.created_at.FromDatetime(self.created_at)
        return message

    def record(self) -> dict[str, Any]:
        """What a spec carries of the dataset (gpu_core.schemas.StoredDataset)."""
        return {
            "id": self.id,
            "format": self.format,
            "count": self.count,
            "text_chars": self.text_chars,
            "answer_chars": self.answer_chars,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "filename": stored_name(self.filename),
        }


def stored_name(filename: str) -> str:
    """The object's name in the store: ``data`` and the file's suffix (which decides how a worker
    reads it); the researcher's file name stays in the row only."""
    suffix = PurePosixPath(filename).suffix.lower()
    return "data" + (suffix if suffix in _SUFFIXES else ".jsonl")


def dataset_key(dataset_id: str, filename: str) -> str:
    return f"datasets/{dataset_id}/{stored_name(filename)}"


class DatasetStore:
    """The ``datasets`` table (migration 0060); short statements on the scheduler's pool."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def insert(self, row: DatasetRow) -> DatasetRow:
        async with self._store.connection() as conn:
            record = await conn.fetchrow(
                f"""INSERT INTO datasets ({_COLUMNS})
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now()) RETURNING {_COLUMNS}""",
                *[getattr(row, name) for name in _COLUMNS.split(", ")[:-1]],
            )
        return _row(record)

    async def get(self, dataset_id: str, user_id: str) -> DatasetRow:
        if not _DATASET_ID.match(dataset_id):
            raise DatasetNotFound(dataset_id)
        async with self._store.connection() as conn:
            record = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM datasets WHERE id = $1 AND user_id = $2", dataset_id, user_id
            )
        if record is None:
            raise DatasetNotFound(dataset_id)
        return _row(record)

    async def list(self, user_id: str) -> list[DatasetRow]:
        async with self._store.connection() as conn:
            records = await conn.fetch(
                f"SELECT {_COLUMNS} FROM datasets WHERE user_id = $1 ORDER BY created_at DESC", user_id
            )
        return [_row(record) for record in records]

    async def delete_unused(self, dataset_id: str, user_id: str) -> DatasetRow:
        """Remove the row unless a job that has not ended names the dataset (DatasetInUse)."""
        async with self._store.connection() as conn, conn.transaction():
            record = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM datasets WHERE id = $1 AND user_id = $2 FOR UPDATE",
                dataset_id,
                user_id,
            )
            if record is None:
                raise DatasetNotFound(dataset_id)
            using = await conn.fetch(
                """SELECT id FROM jobs
                    WHERE status = ANY($2::text[])
                      AND (spec ->> 'training_dataset_id' = $1 OR spec ->> 'eval_dataset_id' = $1)
                    LIMIT 5""",
                dataset_id,
                list(ACTIVE_STATES),
            )
            if using:
                names = ", ".join(str(r["id"]) for r in using)
                raise DatasetInUse(f"dataset {dataset_id} is used by jobs that have not ended ({names})")
            await conn.execute("DELETE FROM datasets WHERE id = $1", dataset_id)
        return _row(record)


def _row(record: asyncpg.Record | None) -> DatasetRow:
    assert record is not None  # RETURNING / a found row
    return DatasetRow(**dict(record))


async def upload(
    store: ArtifactStore, datasets: DatasetStore, messages: AsyncIterator[scheduler_pb2.UploadDatasetRequest]
) -> DatasetRow:
    """Store one upload stream: the header, then its data chunks into the artifact store (checked
    against the header's sha256 and size before the object is visible), then the row."""
    first = await anext(messages, None)
    if first is None or not first.HasField("header") or not first.user_id:
        raise DatasetUploadError("the upload must start with a header naming the user")
    header = first.header
    if header.kind not in ("train", "eval") or header.count < 1 or header.bytes < 1:
        raise DatasetUploadError("the header needs kind (train or eval), a count and a size")
    row = DatasetRow(
        id=f"ds_{uuid.uuid4().hex}",
        user_id=first.user_id,
        kind=header.kind,
        filename=header.filename[:255] or "data.jsonl",
        format=header.format,
        count=header.count,
        text_chars=header.text_chars,
        answer_chars=header.answer_chars,
        bytes=header.bytes,
        sha256=header.sha256,
        created_at=datetime.now(),
    )

    async def data() -> AsyncIterator[bytes]:
        if first.data:
            yield first.data
        async for message in messages:
            yield message.data

    try:
        await store.put(row.key, data(), expected_sha256=row.sha256, expected_bytes=row.bytes)
    except ChecksumMismatch as exc:
        raise DatasetUploadError(f"the upload arrived different from its header: {exc}") from None
    try:
        return await datasets.insert(row)
    except BaseException:
        await store.delete(row.key)
        raise


async def delete(store: ArtifactStore, datasets: DatasetStore, dataset_id: str, user_id: str) -> DatasetRow:
    row = await datasets.delete_unused(dataset_id, user_id)
    await store.delete(row.key)
    return row


async def attach_to_spec(datasets: DatasetStore, user_id: str, spec_json: bytes) -> bytes:
    """``spec_json`` with the record of every dataset it names (the user's own, of the right kind)
    written in; unchanged when it names none. SpecError names the field otherwise."""
    try:
        raw = json.loads(spec_json)
    except ValueError:
        return spec_json  # parse_job_spec says what is wrong
    if not isinstance(raw, dict) or not any(f"{f}_dataset_id" in raw for f in _ROLES):
        return spec_json
    for field, kind in _ROLES.items():
        raw.pop(f"{field}_dataset", None)  # the scheduler's to write, never the caller's
        dataset_id = raw.get(f"{field}_dataset_id")
        if dataset_id is None:
            continue
        try:
            row = await datasets.get(str(dataset_id), user_id)
        except DatasetNotFound:
            raise DatasetReferenceError(f"{field}_dataset_id: you have no dataset {dataset_id}") from None
        if row.kind != kind:
            raise DatasetReferenceError(
                f"{field}_dataset_id: dataset {dataset_id} holds {row.kind} examples, not {kind} examples"
            )
        raw[f"{field}_dataset"] = row.record()
    return json.dumps(raw).encode()


async def dataset_files(
    store: ArtifactStore, spec: ExperimentSpec, expires_s: int
) -> list[compute_pb2.DatasetFile]:
    """One GET per dataset the spec names: presigned where the store signs, else a file:// path
    in the local store (compute-local runs on its host)."""
    files = []
    for role, stored in spec.stored_datasets:
        name = stored.filename
        key = f"datasets/{stored.id}/{name}"
        url = await download_url(store, key, expires_s)
        files.append(
            compute_pb2.DatasetFile(
                role=role, url=url, sha256=stored.sha256, bytes=stored.bytes, filename=name
            )
        )
    return files
