"""Stored datasets read by a worker: a spec that names a dataset (``training_dataset_id``,
``eval_dataset_id``) runs on the examples of the file the researcher uploaded once
(``POST /api/datasets``), not on examples carried in the spec.

The scheduler hands the worker one GET URL per dataset with the size and sha256 the upload
recorded (a presigned GET for a worker far from the store, a ``file://`` path in the local
store for compute-local). The worker streams the object to disk a block at a time, refuses it
when its size or sha256 differ (a tampered or replaced object never reaches training), and
reads it with the one parser (``gpu_core.formats.stream_path``), a row at a time. The spec it
runs then carries the examples inline, as if they had been given there.

No cloud SDK: plain HTTP, as in gpu_core.uploads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gpu_core.formats import FileScan, stream_path
from gpu_core.schemas import NO_SIZE_LIMITS, SpecLimits, StoredDataset, parse_spec
from gpu_core.uploads import UPLOAD_ATTEMPTS, get_to_file

Role = Literal["train", "eval"]
_RETRY_BASE_S = 1.0
_FIELDS: dict[Role, str] = {"train": "training", "eval": "eval"}


@dataclass(frozen=True)
class DatasetFile:
    """Where a worker reads one stored dataset (the payload's ``datasets`` list)."""

    role: Role
    url: str  # GET-only for this one object (a credential until it expires), or file://
    sha256: str
    bytes: int
    filename: str  # the uploaded file's name: decides CSV / Parquet / JSONL

    def as_payload(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "url": self.url,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "filename": self.filename,
        }


class DatasetError(RuntimeError):
    """A stored dataset could not be read as the spec recorded it; the message says which and why."""


def parse_dataset_files(raw: object) -> list[DatasetFile]:
    """The payload's ``datasets`` list; raises DatasetError naming a bad entry."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise DatasetError("datasets: not a list")
    found = []
    for index, item in enumerate(raw):
        try:
            role = item["role"]
            if role not in _FIELDS:
                raise ValueError(role)
            found.append(
                DatasetFile(
                    role, str(item["url"]), str(item["sha256"]), int(item["bytes"]), str(item["filename"])
                )
            )
        except (KeyError, TypeError, ValueError):
            raise DatasetError(
                f"datasets.{index}: needs role (train or eval), url, sha256, bytes and filename"
            ) from None
    return found


def fetch_dataset(entry: DatasetFile, path: Path) -> None:
    """The object at ``entry.url`` streamed to ``path``, its size and sha256 checked before the
    file takes its name. Transient failures are retried; a missing or expired object, or one
    that differs from the upload's record, raises DatasetError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    what = f"the {_FIELDS[entry.role]} dataset"
    status = 0
    for attempt in range(UPLOAD_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_BASE_S * 2 ** (attempt - 1))
        try:
            status, digest, size = get_to_file(partial, entry.url)
        except OSError:
            continue
        if 400 <= status < 500 and status != 429:
            break  # gone or expired: retrying cannot help
        if not 200 <= status < 300:
            continue
        if size != entry.bytes or digest != entry.sha256:
            partial.unlink(missing_ok=True)
            raise DatasetError(
                f"{what} arrived with {size} bytes and sha256 {digest[:12]}..., the upload recorded "
                f"{entry.bytes} bytes and {entry.sha256[:12]}...: the stored object was changed; refusing it"
            )
        os.replace(partial, path)
        return
    partial.unlink(missing_ok=True)
    answer = f"HTTP {status}" if status else "no answer"
    raise DatasetError(f"{what} could not be read from the artifact store ({answer})")


def read_datasets(spec: dict[str, Any], files: list[DatasetFile], directory: Path) -> dict[str, Any]:
    """The spec (as JSON) with every stored dataset it names read into its inline examples
    (fetched into ``directory``, checked, parsed a row at a time): what ``parse_payload`` then
    takes. The spec itself when it names none."""
    parsed = parse_spec(spec, NO_SIZE_LIMITS)
    if not parsed.stored_datasets:
        return spec
    by_role = {entry.role: entry for entry in files}
    resolved = dict(spec)
    for role, stored in parsed.stored_datasets:
        field = _FIELDS[role]
        entry = by_role.get(role)
        if entry is None:
            raise DatasetError(f"{field}_dataset_id: the job came without a URL for dataset {stored.id}")
        if entry.sha256 != stored.sha256 or entry.bytes != stored.bytes:
            raise DatasetError(f"{field}_dataset_id: the URL given is not for the upload the spec recorded")
        resolved[f"{field}_data"] = _read_one(role, stored, entry, directory)
        for key in (f"{field}_dataset_id", f"{field}_dataset"):
            resolved.pop(key, None)
    return resolved


def reading_event(spec: dict[str, Any]) -> dict[str, Any] | None:
    """The status event a worker sends before it reads the spec's datasets; None when it names none."""
    stored = parse_spec(spec, NO_SIZE_LIMITS).stored_datasets
    if not stored:
        return None
    described = " and ".join(
        f"{_FIELDS[role]} dataset ({d.count:,} examples, {d.bytes / 1e6:.1f} MB)" for role, d in stored
    )
    return {
        "type": "status",
        "stage": "loading_model",
        "progress": 0.0,
        "message": f"reading the {described}",
    }


def _read_one(role: Role, stored: StoredDataset, entry: DatasetFile, directory: Path) -> list[dict[str, Any]]:
    suffix = Path(entry.filename).suffix.lower() or ".jsonl"
    path = directory / f"{stored.id}{suffix}"
    fetch_dataset(entry, path)
    scan = FileScan()
    limits = SpecLimits(max_train_examples=stored.count, max_eval_examples=stored.count, max_text_chars=2**31)
    try:
        examples = list(stream_path(role, path, scan, limits, filename=entry.filename))
    finally:
        path.unlink(missing_ok=True)
    if scan.problems or scan.count != stored.count:
        found = "; ".join(str(p) for p in scan.shown_problems) or f"{scan.count} examples"
        raise DatasetError(f"the {_FIELDS[role]} dataset {stored.id} does not read as uploaded: {found}")
    return examples


def read_payload_datasets(
    payload: dict[str, Any], files: list[DatasetFile], directory: Path
) -> dict[str, Any]:
    """A worker's payload (``gpu_core.jobs.make_payload``'s shape) with its spec's stored
    datasets read in (:func:`read_datasets`)."""
    if "kind" in payload:
        return {**payload, "spec": read_datasets(payload.get("spec") or {}, files, directory)}
    return read_datasets(payload, files, directory)
