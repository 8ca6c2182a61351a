"""The job queue and the child processes: one job at a time per GPU device and
COMPUTE_LOCAL_CPU_SLOTS jobs at once on "cpu" (the free slots are a list holding each device once
per free slot); the queue takes turns between users (round robin), so one user's backlog never
delays another user's first job.

A job is SUBMITTED while it waits, RUNNING from the moment a device is assigned, COMPLETED as
soon as the child's result line has been stored, FAILED with the child's message (or with the way
it died), CANCELLED on request. Every event and state change is written to the JobStore first,
so a restart keeps every finished result and every queued job.

Shutdown choice: a running experiment cannot be resumed half way (gpu_core has no checkpoint),
and silently running it again later would spend the device twice, so shutdown ends the running
children and their jobs become FAILED "compute-local stopped" (the scheduler reports it and the
researcher can resubmit). Jobs still waiting in the queue are untouched and run after the next
start.

A follow-up query (kind ``query``) runs in its experiment's warm worker (compute_local.warm), which
keeps the fine-tuned model and gradient index loaded between queries. It reads the experiment's
files from this service's own folder of the experiment (the very files the scheduler verified into
the artifact store, so nothing is copied), or, once retention has removed that folder, from the
presigned GETs the scheduler sent, or recomputes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compute_local.child import EXIT_CANCELLED, PARENT_FILE
from compute_local.config import DeviceSlots
from compute_local.jobs import JobRecord, JobState, JobStore, StoredEvent, new_provider_job_id
from compute_local.spec import DATASETS_FILE, later_job_files, read_spec
from compute_local.warm import WarmQueryPool, WarmQueryWorker, WorkerGone
from gpu_core.jobs import EXPERIMENT, IN_PARENT_FOLDER, QUERY, READS_PARENT_ARTIFACTS, job_kind

log = logging.getLogger(__name__)

STOPPED_MESSAGE = "compute-local stopped"
MAX_EVENTS_PER_STATUS = 1000
# A result line carries evaluations, top-k and the heatmap (the matrix itself is scores.npy); the
# pipe reader accepts a generous line so an old or unusual result is never cut.
_MAX_LINE_BYTES = 1 << 30
_MAX_RETENTION_SWEEP_S = 3600.0


class JobNotFound(LookupError):
    pass


class InvalidCursor(ValueError):
    pass


class ResultNotReady(RuntimeError):
    pass


class NotAccepting(RuntimeError):
    pass


class ArtifactNotFound(LookupError):
    pass


@dataclass
class Job:
    record: JobRecord
    events: list[StoredEvent]
    process: asyncio.subprocess.Process | None = None
    # Set once the job is terminal and its child (if any) is gone.
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Why the service is ending the child: CANCELLED (Cancel) or FAILED (shutdown).
    stop_reason: JobState | None = None
    child_error: str = ""
    # The warm worker answering this query while it runs.
    worker: WarmQueryWorker | None = None


@dataclass(frozen=True)
class JobStatus:
    state: JobState
    events: list[StoredEvent]
    cursor: int
    error: str
    result_ready: bool
    stage_message: str
    # Once the job has ended: (host seconds from its start to its end, the device it ran on).
    usage: tuple[float, str] | None = None


class LocalRunner:
    def __init__(
        self,
        store: JobStore,
        devices: tuple[DeviceSlots, ...],
        cancel_grace_s: float,
        retention_s: float,
        log_level: str = "INFO",
        warm_query_workers: int = 2,
        warm_query_idle_s: float = 300.0,
    ) -> None:
        self._store = store
        self._devices = devices
        # One entry per free slot: "cpu" appears once for each CPU job that may still start.
        self._free_devices = [d.device for d in devices for _slot in range(d.slots)]
        self._threads = {d.device: d.threads for d in devices}
        self._devices_text = ", ".join(
            d.device if d.slots == 1 else f"{d.device}: {d.slots} jobs at once" for d in devices
        )
        self._cancel_grace_s = cancel_grace_s
        self._retention_s = retention_s
        self._log_level = log_level
        self._jobs: dict[str, Job] = {}
        self._by_job_id: dict[str, str] = {}
        self._queue: list[Job] = []
        # Round robin: when each user last had a job started (a counter, not a clock).
        self._last_start: dict[str, int] = {}
        self._starts = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._retention_task: asyncio.Task[None] | None = None
        self._accepting = False
        self._changed = asyncio.Event()
        self.finished_counts: Counter[JobState] = Counter()
        self.warm = WarmQueryPool(
            warm_query_workers,
            warm_query_idle_s,
            cancel_grace_s,
            store.query_workers_log_path(),
        )

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the stored jobs, queue the ones that were waiting, and start taking work."""
        self._store.prepare()
        for loaded in await asyncio.to_thread(self._store.load_all):
            job = Job(loaded.record, loaded.events)
            self._jobs[job.record.provider_job_id] = job
            self._by_job_id[job.record.job_id] = job.record.provider_job_id
            if job.record.state is JobState.RUNNING:
                # The previous process died without its shutdown (crash, SIGKILL).
                self._finish(job, JobState.FAILED, STOPPED_MESSAGE)
            elif job.record.state is JobState.SUBMITTED:
                self._queue.append(job)
            else:
                job.done.set()
        self.remove_expired(time.time())
        self._accepting = True
        self._retention_task = asyncio.create_task(self._sweep_periodically())
        log.info(
            "compute-local runner started",
            extra={
                "slots": {d.device: d.slots for d in self._devices},
                "threads": self._threads,
                "jobs": len(self._jobs),
                "queued": len(self._queue),
            },
        )
        self._dispatch()

    def stop_accepting(self) -> None:
        """Refuse new jobs and start no queued one from now on."""
        self._accepting = False

    async def shutdown(self) -> None:
        """Stop taking work and end every running child; their jobs become FAILED."""
        self.stop_accepting()
        if self._retention_task is not None:
            self._retention_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention_task
        running = [job for job in self._jobs.values() if job.record.state is JobState.RUNNING]
        for job in running:
            job.stop_reason = JobState.FAILED
        await asyncio.gather(
            *(
                self.warm.discard(job.worker) if job.worker is not None else self._terminate(job)
                for job in running
            )
        )
        # Children that already sent their result may still be exiting.
        lingering = [job for job in self._jobs.values() if job.process is not None]
        await asyncio.gather(*(self._terminate(job) for job in lingering))
        await self.warm.close()
        log.info("compute-local runner stopped", extra={"stopped_jobs": len(running)})

    # ---- the ComputeProvider operations -----------------------------------------------------

    def submit(
        self,
        job_id: str,
        spec_json: bytes,
        kind: str = "",
        request_json: bytes = b"",
        parent_result_json: bytes = b"",
        user_id: str = "",
        parent_job_id: str = "",
        parent_artifacts: list[dict[str, Any]] | None = None,
        datasets: list[dict[str, Any]] | None = None,
    ) -> str:
        """Queue a job and return its provider job id; the same job_id again returns the same one.
        ``kind`` (gpu_core.jobs): an experiment, or a later job with its request and the
        experiment's result; a query also names its experiment (``parent_job_id``, whose folder
        here holds its files) and may carry presigned GETs of those files for when it does not.
        ``datasets``: where the child reads the stored datasets the spec names."""
        if not job_id:
            raise ValueError("job_id is required")
        existing = self._by_job_id.get(job_id)
        if existing is not None:
            return existing
        if not self._accepting:
            raise NotAccepting("compute-local is not accepting jobs (it is stopping)")
        read_spec(spec_json)
        files = later_job_files(kind, spec_json, request_json, parent_result_json)
        if datasets:
            files[DATASETS_FILE] = json.dumps(datasets).encode()
        if job_kind(kind).name in READS_PARENT_ARTIFACTS:
            files[PARENT_FILE] = json.dumps(
                {"parent_job_id": parent_job_id, "parent_artifacts": parent_artifacts or []}
            ).encode()
        record = JobRecord(
            provider_job_id=new_provider_job_id(),
            job_id=job_id,
            state=JobState.SUBMITTED,
            created_at=time.time(),
            kind=job_kind(kind).name,
            user_id=user_id,
            parent_job_id=parent_job_id,
        )
        self._store.create(record, spec_json, files)
        job = Job(record, [])
        self._jobs[record.provider_job_id] = job
        self._by_job_id[job_id] = record.provider_job_id
        self._queue.append(job)
        self._add_event(
            job,
            {
                "type": "status",
                "stage": "queued",
                "progress": 0.0,
                "message": f"queued for a free device ({self._devices_text})",
            },
        )
        log.info("job queued", extra={"job_id": job_id, "provider_job_id": record.provider_job_id})
        self._dispatch()
        return record.provider_job_id

    def status(self, provider_job_id: str, job_id: str, cursor: str) -> JobStatus:
        job = self._find(provider_job_id, job_id)
        start = self._parse_cursor(cursor, len(job.events))
        events = job.events[start : start + MAX_EVENTS_PER_STATUS]
        record = job.record
        return JobStatus(
            state=record.state,
            events=events,
            cursor=start + len(events),
            error=record.error,
            result_ready=record.state is JobState.COMPLETED,
            stage_message=self._stage_message(job),
            usage=_host_usage(record),
        )

    def result(self, provider_job_id: str, job_id: str) -> bytes:
        job = self._find(provider_job_id, job_id)
        state = job.record.state
        if state is not JobState.COMPLETED:
            detail = f": {job.record.error}" if job.record.error else ""
            raise ResultNotReady(f"the job has no result (it is {state.value.lower()}{detail})")
        try:
            return self._store.read_result(job.record.provider_job_id)
        except FileNotFoundError:
            raise JobNotFound("the result of this job is no longer stored") from None

    def artifact_path(self, provider_job_id: str, job_id: str, name: str) -> Path:
        """The file of a completed job's artifact ``name`` (a path under its artifacts folder)."""
        job = self._find(provider_job_id, job_id)
        if job.record.state is not JobState.COMPLETED:
            raise ResultNotReady(f"the job has no artifacts (it is {job.record.state.value.lower()})")
        root = self._store.artifacts_dir(job.record.provider_job_id).resolve()
        path = (root / name).resolve()
        if not name or path == root or not path.is_relative_to(root):
            raise ArtifactNotFound(f"{name!r} is not an artifact name")
        if not path.is_file():
            raise ArtifactNotFound(f"no artifact {name!r} for this job on compute-local")
        return path

    async def cancel(self, provider_job_id: str, job_id: str) -> JobState:
        """Cancel a job: a queued one leaves the queue, a running one's child is ended (SIGTERM,
        then SIGKILL after the grace period). A finished job keeps its state."""
        job = self._find(provider_job_id, job_id)
        state = job.record.state
        if state is JobState.SUBMITTED:
            self._queue.remove(job)
            self._finish(job, JobState.CANCELLED, "")
            self._dispatch()
        elif state is JobState.RUNNING:
            job.stop_reason = JobState.CANCELLED
            if job.record.kind == QUERY:
                await self._cancel_query(job)
            else:
                await self._terminate(job)
        return job.record.state

    # ---- facts for health, metrics and tests -----------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running_count(self) -> int:
        return sum(1 for job in self._jobs.values() if job.record.state is JobState.RUNNING)

    @property
    def slot_count(self) -> int:
        """Jobs that can run at once: one per GPU device plus the CPU slots."""
        return sum(d.slots for d in self._devices)

    def child_pid(self, provider_job_id: str) -> int | None:
        job = self._jobs.get(provider_job_id)
        return job.process.pid if job is not None and job.process is not None else None

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is re-checked after every event or state change."""
        while not predicate():
            changed = self._changed
            await changed.wait()

    def remove_expired(self, now: float) -> list[str]:
        """Delete the jobs that finished more than the retention period before ``now``."""
        expired = [
            job
            for job in self._jobs.values()
            if job.record.state.terminal
            and job.process is None
            and (job.record.finished_at or 0.0) + self._retention_s < now
        ]
        for job in expired:
            pid = job.record.provider_job_id
            self._store.remove(pid)
            del self._jobs[pid]
            if self._by_job_id.get(job.record.job_id) == pid:
                del self._by_job_id[job.record.job_id]
        if expired:
            log.info("removed expired jobs", extra={"count": len(expired)})
        return [job.record.provider_job_id for job in expired]

    # ---- internals -----------------------------------------------------------------------

    def _find(self, provider_job_id: str, job_id: str) -> Job:
        key = provider_job_id or self._by_job_id.get(job_id, "")
        job = self._jobs.get(key)
        if job is None:
            raise JobNotFound(f"no job {provider_job_id or job_id!r} on compute-local")
        return job

    @staticmethod
    def _parse_cursor(cursor: str, count: int) -> int:
        if cursor == "":
            return 0
        if not cursor.isdecimal():
            raise InvalidCursor(f"cursor {cursor!r} is not one this provider returned")
        position = int(cursor)
        if position > count:
            raise InvalidCursor(f"cursor {cursor!r} is past the {count} events of this job")
        return position

    def _stage_message(self, job: Job) -> str:
        record = job.record
        if record.state is JobState.SUBMITTED:
            position = self._start_order().index(job) + 1
            return (
                f"queued: position {position} of {len(self._queue)}, "
                f"waiting for a free device ({self._devices_text})"
            )
        if record.state is JobState.RUNNING:
            last = job.events[-1].event.get("message", "") if job.events else ""
            return f"running on {record.device}" + (f": {last}" if last else "")
        if record.state is JobState.COMPLETED:
            return "finished; result ready"
        if record.state is JobState.CANCELLED:
            return "cancelled"
        return record.error

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _add_event(self, job: Job, event: dict[str, Any]) -> None:
        stored = StoredEvent(event=event, time=time.time())
        self._store.append_event(job.record.provider_job_id, stored)
        job.events.append(stored)
        self._notify()

    def _last_progress(self, job: Job) -> float:
        for stored in reversed(job.events):
            progress = stored.event.get("progress")
            if isinstance(progress, int | float):
                return float(progress)
        return 0.0

    def _finish(self, job: Job, state: JobState, error: str) -> None:
        record = job.record
        record.state = state
        record.error = error
        record.finished_at = time.time()
        record.pid = None
        self._store.save(record)
        self.finished_counts[state] += 1
        if state is JobState.CANCELLED:
            self._add_event(
                job,
                {
                    "type": "status",
                    "stage": "cancelled",
                    "progress": self._last_progress(job),
                    "message": "cancelled",
                },
            )
        elif state is JobState.FAILED and error != job.child_error:
            self._add_event(job, {"type": "error", "message": error})
        if job.process is None:
            job.done.set()
        log.info(
            "job finished",
            extra={"provider_job_id": record.provider_job_id, "state": state.value, "error": error},
        )
        self._notify()

    def _start_order(self) -> list[Job]:
        """The queue in the order its jobs will start: round robin across users. A user's n-th
        queued job waits behind every other user's jobs of an earlier round (running jobs count
        as rounds taken); within a round, the user who started a job longest ago goes first."""
        running: Counter[str] = Counter(
            job.record.user_id for job in self._jobs.values() if job.record.state is JobState.RUNNING
        )
        seen: Counter[str] = Counter()
        keyed = []
        for position, job in enumerate(self._queue):
            user = job.record.user_id
            keyed.append(((running[user] + seen[user], self._last_start.get(user, -1), position), job))
            seen[user] += 1
        return [job for _key, job in sorted(keyed, key=lambda item: item[0])]

    def _dispatch(self) -> None:
        while self._accepting and self._queue and self._free_devices:
            job = self._start_order()[0]
            self._queue.remove(job)
            self._starts += 1
            self._last_start[job.record.user_id] = self._starts
            device = self._device_for(job)
            self._free_devices.remove(device)
            # RUNNING from here on, so no status call sees a job that is neither queued nor running.
            self._mark_running(job, device)
            task = asyncio.create_task(self._run(job, device))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._queue:
            self._notify()  # queue positions moved

    def _device_for(self, job: Job) -> str:
        """A free device: for a query, its experiment's warm worker's device when that is free;
        otherwise the first free device with the fewest warm workers (the fewest to evict)."""
        warm = self.warm.find(job.record.parent_job_id) if job.record.kind == QUERY else None
        if warm is not None and warm.device in self._free_devices:
            return warm.device
        return min(self._free_devices, key=lambda device: len(self.warm.on_device(device)))

    def _child_environment(self, device: str) -> dict[str, str]:
        env = dict(os.environ)
        threads = str(self._threads[device])
        env.update(
            OMP_NUM_THREADS=threads,
            MKL_NUM_THREADS=threads,
            # The child sees only its own device (as cuda:0); "cpu" hides every GPU.
            CUDA_VISIBLE_DEVICES=device.removeprefix("cuda:") if device.startswith("cuda:") else "",
            GPU_CORE_DEVICE="cuda:0" if device.startswith("cuda:") else "cpu",
            LOG_LEVEL=self._log_level,
            PYTHONUNBUFFERED="1",
        )
        return env

    def _mark_running(self, job: Job, device: str) -> None:
        record = job.record
        record.state = JobState.RUNNING
        record.device = device
        record.started_at = time.time()
        self._store.save(record)
        self._add_event(
            job,
            {"type": "status", "stage": "starting", "progress": 0.0, "message": f"starting on {device}"},
        )

    async def _run(self, job: Job, device: str) -> None:
        record = job.record
        pid = record.provider_job_id
        try:
            if job.stop_reason is not None:  # cancelled or stopped before the child was started
                self._finish_after_exit(job, EXIT_CANCELLED)
            elif job.record.kind == QUERY:
                await self._run_query(job, device)
            else:
                await self._evict_warm_workers(job, device)
                await self._run_child(job, device)
        except asyncio.CancelledError:
            # The event loop is going away without a shutdown(): take the child with it.
            self.stop_accepting()
            self._signal(job, signal.SIGKILL)
            raise
        except Exception as exc:
            log.exception("following the child failed", extra={"provider_job_id": pid})
            if job.process is not None and job.process.returncode is None:
                self._signal(job, signal.SIGKILL)
                await job.process.wait()
            if not record.state.terminal:
                self._finish(job, JobState.FAILED, f"compute-local lost the worker process: {exc}")
        finally:
            job.process = None
            job.done.set()
            self._free_devices.append(device)
            self._notify()
            self._dispatch()

    async def _evict_warm_workers(self, job: Job, device: str) -> None:
        """The experiment needs the device's memory: its idle warm query workers leave first."""
        evicted = await self.warm.evict(device)
        if evicted:
            self._add_event(
                job,
                {
                    "type": "status",
                    "stage": "starting",
                    "progress": 0.0,
                    "message": f"retired {evicted} idle query worker(s) on {device} to free its memory",
                },
            )

    async def _run_child(self, job: Job, device: str) -> None:
        pid = job.record.provider_job_id
        job_dir = self._store.job_dir(pid).resolve()
        # A later job that reads its experiment's files (a merge, an index shard) reads this
        # service's folder of them while it is kept, else the GETs in its parent.json (a shard
        # merge always: its files are every shard's).
        parent_dir = (
            self._parent_artifacts_dir(job.record.parent_job_id)
            if job.record.kind in IN_PARENT_FOLDER
            else None
        )
        with open(self._store.log_path(pid), "ab") as worker_log:
            job.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "compute_local.child",
                "--job-dir",
                str(job_dir),
                "--parent-pid",
                str(os.getpid()),
                "--threads",
                str(self._threads[device]),
                *(["--parent-dir", str(parent_dir)] if parent_dir is not None else []),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=worker_log,
                env=self._child_environment(device),
                # Its own folder: a relative model id ("org/name") never names a directory here.
                cwd=str(job_dir),
                start_new_session=True,  # its own process group: a cancel ends all of it
                limit=_MAX_LINE_BYTES,
            )
        process = job.process
        job.record.pid = process.pid
        self._store.save(job.record)
        log.info("child started", extra={"provider_job_id": pid, "pid": process.pid, "device": device})
        if job.stop_reason is not None:
            self._signal(job, signal.SIGTERM)
        assert process.stdout is not None
        async for line in process.stdout:
            await self._handle_line(job, line)
        returncode = await process.wait()
        self._finish_after_exit(job, returncode)

    async def _run_query(self, job: Job, device: str) -> None:
        """Answer the query in its experiment's warm worker (started here when there is none)."""
        record = job.record
        job_dir = self._store.job_dir(record.provider_job_id).resolve()
        worker = await self.warm.get(
            record.parent_job_id,
            device,
            self._threads[device],
            self._parent_artifacts_dir(record.parent_job_id),
            self._child_environment(device),
        )
        job.worker = worker
        record.pid = worker.process.pid
        self._store.save(record)
        try:
            if job.stop_reason is not None:  # cancelled or stopped while the worker was found
                return
            async for event in worker.answer(job_dir):
                if event.get("type") != "cancelled":
                    await self._handle_event(job, event)
        except WorkerGone as exc:
            job.child_error = job.child_error or str(exc)
        finally:
            job.worker = None
            await self.warm.release(worker)
            self._finish_query(job)

    def _finish_query(self, job: Job) -> None:
        record = job.record
        if not record.state.terminal:
            if job.stop_reason is None and not job.child_error:
                job.child_error = "the query worker answered without a result"
            self._finish_after_exit(job, 0)

    def _parent_artifacts_dir(self, parent_job_id: str) -> Path | None:
        """This service's folder of the completed experiment's files, while it keeps it."""
        parent = self._jobs.get(self._by_job_id.get(parent_job_id, ""))
        if parent is None or parent.record.state is not JobState.COMPLETED:
            return None
        folder = self._store.artifacts_dir(parent.record.provider_job_id).resolve()
        return folder if folder.is_dir() else None

    async def _cancel_query(self, job: Job) -> None:
        """Ask the warm worker to stop the query (it keeps its session); one that does not
        within the grace period is retired, and the next query starts cold. A query whose
        worker is still being found is never sent to it (``_run_query`` checks)."""
        if job.worker is not None:
            await job.worker.cancel(self._store.job_dir(job.record.provider_job_id).resolve())
        if not await self._ended_within_grace(job, "query worker ignored the cancel; retiring it"):
            if job.worker is not None:
                await self.warm.discard(job.worker)
            await job.done.wait()

    async def _handle_line(self, job: Job, line: bytes) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            log.warning(
                "ignoring a line that is not JSON",
                extra={"provider_job_id": job.record.provider_job_id},
            )
            return
        if isinstance(event, dict):
            await self._handle_event(job, event)

    async def _handle_event(self, job: Job, event: dict[str, Any]) -> None:
        if job.record.state.terminal or job.stop_reason is not None:
            return
        kind = event.get("type")
        if kind == "result":
            result_json = json.dumps(event.get("result")).encode()
            await asyncio.to_thread(self._store.write_result, job.record.provider_job_id, result_json)
            self._finish(job, JobState.COMPLETED, "")
            what = {QUERY: "query answered", EXPERIMENT: "experiment finished"}.get(
                job.record.kind, "job finished"
            )
            self._add_event(
                job,
                {"type": "result", "stage": "finished", "progress": 1.0, "message": f"{what}; result ready"},
            )
        elif kind == "error":
            job.child_error = str(event.get("message") or "the experiment failed")
            self._add_event(job, {"type": "error", "message": job.child_error})
        else:
            self._add_event(job, event)

    def _finish_after_exit(self, job: Job, returncode: int) -> None:
        if job.record.state.terminal:
            return
        if job.stop_reason is JobState.CANCELLED:
            self._finish(job, JobState.CANCELLED, "")
        elif job.stop_reason is JobState.FAILED:
            self._finish(job, JobState.FAILED, STOPPED_MESSAGE)
        elif job.child_error:
            self._finish(job, JobState.FAILED, job.child_error)
        else:
            self._finish(job, JobState.FAILED, _describe_exit(returncode))

    def _signal(self, job: Job, signum: signal.Signals) -> None:
        if job.process is None or job.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.process.pid, signum)

    async def _ended_within_grace(self, job: Job, warning: str) -> bool:
        """Wait up to the cancel grace period for ``job`` to end; False (logged as ``warning``)
        when it is still running."""
        try:
            await asyncio.wait_for(job.done.wait(), self._cancel_grace_s)
        except TimeoutError:
            log.warning(warning, extra={"provider_job_id": job.record.provider_job_id})
            return False
        return True

    async def _terminate(self, job: Job) -> None:
        """SIGTERM the child's process group, SIGKILL it after the grace period, wait until gone."""
        self._signal(job, signal.SIGTERM)
        if not await self._ended_within_grace(job, "child ignored SIGTERM; killing it"):
            self._signal(job, signal.SIGKILL)
            await job.done.wait()

    async def _sweep_periodically(self) -> None:
        interval = min(self._retention_s, _MAX_RETENTION_SWEEP_S)
        while True:
            await asyncio.sleep(interval)
            self.remove_expired(time.time())


def _host_usage(record: JobRecord) -> tuple[float, str] | None:
    """The host time a job that ended held its device; None while it runs or if it never started."""
    if record.finished_at is None or record.started_at is None:
        return None
    return max(record.finished_at - record.started_at, 0.0), record.device or ""


def _describe_exit(returncode: int) -> str:
    if returncode == EXIT_CANCELLED:
        return "the worker process was stopped by SIGTERM before it sent a result"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"the worker process was killed by {name}{hint} before it sent a result"
    return f"the worker process exited with code {returncode} before it sent a result"
