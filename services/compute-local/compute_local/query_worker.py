"""A warm worker for one experiment's follow-up queries: ``python -m compute_local.query_worker``.

It keeps one ``gpu_core.query.QuerySession`` (the base model with the experiment's adapter and its
gradient index, loaded once) and answers query jobs one after another, so only the first query of
an experiment pays for loading. compute-local writes one line per job to its stdin,
``{"job_dir": DIR}`` (the job's folder: spec.json, request.json, parent_result.json, parent.json),
and reads the job's events from its stdout as it reads a child's (compute_local.child), each job
ending with ``{"type": "done"}`` after its result, its error or ``{"type": "cancelled"}``.

``{"cancel": DIR}`` on stdin cancels that job, whether it is being answered (gpu_core stops
within a batch) or still waiting, and keeps the session; naming the job keeps a cancel from
touching the next one.
SIGTERM, or the end of stdin (compute-local retiring an idle worker), ends the process.

The experiment's files come from ``--parent-dir`` (compute-local's own folder of the experiment)
when given; otherwise from the presigned GETs in the first job's parent.json, downloaded into that
job's folder; a file in neither place is recomputed by the session.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any

from compute_local.child import (
    DOWNLOADS_DIR,
    EXIT_CANCELLED,
    PARENT_FILE,
    Terminated,
    die_with_parent,
    emit,
    on_sigterm,
    plain_message,
    set_threads,
    take_stdout,
)
from service_runtime.logs import configure_logging

log = logging.getLogger("compute_local.query_worker")

DONE = {"type": "done"}


class QueryWorker:
    """The session of one experiment, made on the first job and kept for the next ones."""

    def __init__(self, parent_dir: Path | None) -> None:
        self._parent_dir = parent_dir
        self._session: Any = None
        # Jobs cancelled before or while they are answered (the reader thread adds to it).
        self._cancelled: set[Path] = set()

    def cancel(self, job_dir: Path) -> None:
        self._cancelled.add(job_dir)

    def answer(self, job_dir: Path, events: IO[str]) -> None:
        from gpu_core.jobs import make_payload, parse_payload
        from gpu_core.pipeline import ExperimentCancelled

        try:
            job = parse_payload(
                make_payload(
                    "query",
                    json.loads((job_dir / "spec.json").read_bytes()),
                    json.loads((job_dir / "request.json").read_bytes()),
                    json.loads((job_dir / "parent_result.json").read_bytes()),
                )
            )
            if self._session is None:
                self._session = self._open_session(job, job_dir, events)
            stream = self._session.answer(job.request, lambda: job_dir in self._cancelled)
            try:
                for event in stream:
                    emit(events, event)
            finally:
                stream.close()
        except ExperimentCancelled:
            emit(events, {"type": "cancelled"})
        except Exception as exc:
            log.exception("query failed", extra={"job_dir": str(job_dir)})
            emit(events, {"type": "error", "message": plain_message(exc)})
        self._cancelled.discard(job_dir)
        emit(events, DONE)

    def _open_session(self, job: Any, job_dir: Path, events: IO[str]) -> Any:
        from gpu_core.query import QuerySession
        from gpu_core.uploads import download_artifacts, download_event, parse_parent_artifacts

        parent_dir = self._parent_dir
        if parent_dir is None:
            parent_dir = job_dir / DOWNLOADS_DIR
            parent_dir.mkdir(exist_ok=True)
            parent_file = job_dir / PARENT_FILE
            listed = json.loads(parent_file.read_bytes()) if parent_file.is_file() else {}
            entries = parse_parent_artifacts(listed.get("parent_artifacts"))
            if entries:
                emit(events, download_event(entries))
                got = download_artifacts(entries, parent_dir)
                log.info("parent artifacts downloaded", extra={"files": len(got), "listed": len(entries)})
        return QuerySession(job.spec, job.parent_result, parent_dir)


def serve(worker: QueryWorker, requests: IO[str], events: IO[str]) -> None:
    """Answer the jobs named on ``requests`` in order until it ends; cancels are read meanwhile."""
    jobs: queue.Queue[Path | None] = queue.Queue()

    def read() -> None:
        for line in requests:
            if not line.strip():
                continue
            message = json.loads(line)
            if "cancel" in message:
                worker.cancel(Path(message["cancel"]))
            else:
                jobs.put(Path(message["job_dir"]))
        jobs.put(None)

    threading.Thread(target=read, name="requests", daemon=True).start()
    while (job_dir := jobs.get()) is not None:
        worker.answer(job_dir, events)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute_local.query_worker")
    parser.add_argument("--parent-dir", type=Path, default=None)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)

    events = take_stdout()
    configure_logging("compute-local-query-worker", os.environ.get("LOG_LEVEL", "INFO"))
    signal.signal(signal.SIGTERM, on_sigterm)
    worker = QueryWorker(args.parent_dir)
    try:
        die_with_parent(args.parent_pid)
        set_threads(args.threads)
        serve(worker, sys.stdin, events)
        return 0
    except Terminated:
        log.info("terminated; session closed")
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
