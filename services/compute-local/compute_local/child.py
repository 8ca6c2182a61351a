"""The child process that runs one experiment: ``python -m compute_local.child --job-dir DIR``.

It reads ``DIR/spec.json`` (and, for a later job such as a counterfactual check, the kind in
``DIR/job.json`` with ``request.json`` and ``parent_result.json``; a merge also reads the
experiment's files from ``--parent-dir`` or downloads them as ``parent.json`` lists), iterates
``gpu_core.jobs.run_job`` (an experiment is ``gpu_core.pipeline.run_experiment``) and writes every event
as one JSON line to its stdout, which the service reads through a pipe. Everything else the
process prints (logs, library chatter, tracebacks) goes to stderr, so the event stream stays
clean: stdout is moved to a private descriptor and fd 1 is pointed at stderr before gpu_core is
imported. A failure ends the stream with ``{"type": "error", "message": "..."}``.

SIGTERM closes the generator (gpu_core frees its memory) and exits with 143. The child also
asks Linux to send it SIGTERM when the service dies, so no orphan keeps a device busy.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import IO, Any

from compute_local.spec import DATASETS_FILE, read_spec
from service_runtime.logs import configure_logging

log = logging.getLogger("compute_local.child")

EXIT_CANCELLED = 128 + signal.SIGTERM
# A later job's record of its experiment (parent_job_id, presigned GETs of its files), and the
# folder those files are downloaded into when compute-local's own folder of them is gone.
PARENT_FILE = "parent.json"
DOWNLOADS_DIR = "parent_artifacts"
_PR_SET_PDEATHSIG = 1


class Terminated(Exception):
    """Raised in the main thread by the SIGTERM handler."""


def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        raise Terminated


def take_stdout() -> IO[str]:
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", encoding="utf-8")


def emit(stream: IO[str], event: dict[str, Any]) -> None:
    stream.write(json.dumps(event) + "\n")
    stream.flush()


def plain_message(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else f"the experiment failed ({type(exc).__name__})"


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def parent_files(job_dir: Path, parent_dir: Path | None, events: IO[str]) -> Path | None:
    """Where a later job reads its experiment's files: ``parent_dir`` (compute-local's folder of
    the experiment) when given, else the presigned GETs listed in ``parent.json``, downloaded
    into the job's folder; None for a job without a parent."""
    if parent_dir is not None:
        return parent_dir
    listing = job_dir / PARENT_FILE
    if not listing.is_file():
        return None
    from gpu_core.uploads import download_artifacts, download_event, parse_parent_artifacts

    downloads = job_dir / DOWNLOADS_DIR
    downloads.mkdir(exist_ok=True)
    entries = parse_parent_artifacts(json.loads(listing.read_bytes()).get("parent_artifacts"))
    if entries:
        emit(events, download_event(entries))
        download_artifacts(entries, downloads)
    return downloads


def run(job_dir: Path, threads: int, events: IO[str], parent_dir: Path | None = None) -> int:
    set_threads(threads)
    from gpu_core.datasets import parse_dataset_files, read_datasets, reading_event
    from gpu_core.jobs import make_payload, parse_payload, run_job

    read_spec((job_dir / "spec.json").read_bytes())
    kind = json.loads((job_dir / "job.json").read_text()).get("kind", "experiment")
    spec = json.loads((job_dir / "spec.json").read_bytes())
    if (job_dir / DATASETS_FILE).is_file():
        files = parse_dataset_files(json.loads((job_dir / DATASETS_FILE).read_bytes()))
        reading = reading_event(spec)
        if reading is not None:
            emit(events, reading)
        spec = read_datasets(spec, files, job_dir / "datasets")
    request = parent = None
    if (job_dir / "request.json").is_file():
        request = json.loads((job_dir / "request.json").read_bytes())
        parent = json.loads((job_dir / "parent_result.json").read_bytes())
    artifacts = job_dir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    job = parse_payload(make_payload(kind, spec, request, parent))
    experiment = run_job(job, artifacts, parent_artifacts_dir=parent_files(job_dir, parent_dir, events))
    try:
        for event in experiment:
            emit(events, event)
    finally:
        experiment.close()
    return 0


# Same start-up shape as query_worker.main: each child process declares its own flags, logger
# name and run loop; only the argparse/signal calls line up.
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute_local.child")
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--parent-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    events = take_stdout()
    configure_logging("compute-local-child", os.environ.get("LOG_LEVEL", "INFO"))
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        die_with_parent(args.parent_pid)
        return run(args.job_dir, args.threads, events, args.parent_dir)
    except Terminated:
        log.info("terminated; experiment closed")
        return EXIT_CANCELLED
    except Exception as exc:
        log.exception("experiment failed")
        emit(events, {"type": "error", "message": plain_message(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
