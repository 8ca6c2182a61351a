"""Jobs on disk: each job is a folder under ``<work_dir>/jobs/<provider_job_id>/`` holding

- ``job.json``     the record (state, device, error, times), replaced atomically on every change
- ``spec.json``    the ExperimentSpec as submitted (the child reads it)
- ``request.json``, ``parent_result.json``  for a later job of an experiment (``kind`` in the
                   record, e.g. a counterfactual check): its request and the experiment's result
- ``parent.json``  for a follow-up query: its experiment's job id and presigned GETs of its files
- ``events.jsonl`` one ``{"time": ..., "event": {...}}`` line per event, appended as they arrive
- ``result.json``  the ExperimentResult, written atomically once the child sends it
- ``worker.log``   the child's stderr (its logs), never mixed with the events
- ``artifacts/``   whatever gpu_core keeps for the run

so that results and events outlive the process until the retention period has passed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class JobState(StrEnum):
    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class StoredEvent:
    event: dict[str, Any]
    time: float


@dataclass
class JobRecord:
    provider_job_id: str
    job_id: str
    state: JobState
    created_at: float
    device: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str = ""
    pid: int | None = None
    kind: str = "experiment"  # gpu_core.jobs kind
    # Whose job it is: the queue takes turns between users (records from before: "").
    user_id: str = ""
    # A follow-up query's experiment (the scheduler's job id), whose folder holds its files.
    parent_job_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobRecord:
        data = json.loads(text)
        data["state"] = JobState(data["state"])
        return cls(**data)


@dataclass
class LoadedJob:
    record: JobRecord
    events: list[StoredEvent] = field(default_factory=list)


def new_provider_job_id() -> str:
    return f"local-{uuid.uuid4().hex}"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class JobStore:
    def __init__(self, work_dir: Path) -> None:
        self._root = work_dir / "jobs"

    def prepare(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, provider_job_id: str) -> Path:
        return self._root / provider_job_id

    def spec_path(self, provider_job_id: str) -> Path:
        return self.job_dir(provider_job_id) / "spec.json"

    def log_path(self, provider_job_id: str) -> Path:
        return self.job_dir(provider_job_id) / "worker.log"

    def artifacts_dir(self, provider_job_id: str) -> Path:
        return self.job_dir(provider_job_id) / "artifacts"

    def query_workers_log_path(self) -> Path:
        """Where the warm query workers' stderr goes (they outlive any one job's folder)."""
        return self._root.parent / "query-workers" / "worker.log"

    def create(self, record: JobRecord, spec_json: bytes, files: dict[str, bytes] | None = None) -> None:
        """``files``: more inputs of the job by name (request.json, parent_result.json)."""
        directory = self.job_dir(record.provider_job_id)
        directory.mkdir(parents=True)
        _write_atomically(directory / "spec.json", spec_json)
        for name, data in (files or {}).items():
            _write_atomically(directory / name, data)
        # job.json last: a folder without it is an interrupted create, skipped on load.
        self.save(record)

    def save(self, record: JobRecord) -> None:
        _write_atomically(self.job_dir(record.provider_job_id) / "job.json", record.to_json().encode())

    def append_event(self, provider_job_id: str, event: StoredEvent) -> None:
        line = json.dumps({"time": event.time, "event": event.event}) + "\n"
        with open(self.job_dir(provider_job_id) / "events.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line)

    def write_result(self, provider_job_id: str, result_json: bytes) -> None:
        _write_atomically(self.job_dir(provider_job_id) / "result.json", result_json)

    def read_result(self, provider_job_id: str) -> bytes:
        return (self.job_dir(provider_job_id) / "result.json").read_bytes()

    def remove(self, provider_job_id: str) -> None:
        shutil.rmtree(self.job_dir(provider_job_id), ignore_errors=True)

    def load_all(self) -> list[LoadedJob]:
        """Every stored job, oldest first."""
        jobs: list[LoadedJob] = []
        if not self._root.is_dir():
            return jobs
        for directory in self._root.iterdir():
            record_path = directory / "job.json"
            if not record_path.is_file():
                continue
            try:
                record = JobRecord.from_json(record_path.read_text(encoding="utf-8"))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "skipping unreadable job record",
                    extra={"path": str(record_path), "error": str(exc)},
                )
                continue
            jobs.append(LoadedJob(record, self._load_events(directory / "events.jsonl")))
        jobs.sort(key=lambda job: job.record.created_at)
        return jobs

    @staticmethod
    def _load_events(path: Path) -> list[StoredEvent]:
        if not path.is_file():
            return []
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            # A crash mid-append left half a line: drop it so the next append starts clean.
            with open(path, "r+b") as handle:
                handle.truncate(len(complete))
        events = []
        for line in complete.splitlines():
            entry = json.loads(line)
            events.append(StoredEvent(event=entry["event"], time=entry["time"]))
        return events
