"""Warm workers for follow-up queries: at most ``size`` processes (compute_local.query_worker),
one per experiment, each keeping that experiment's QuerySession between queries and retired
after ``idle_s`` without one. With ``size`` 0 every query gets a fresh worker that is retired
as soon as it has answered.

A worker is a tenant of its device: a query takes one of the device's slots in the queue while it
is answered, and between queries the worker still holds the model in that device's memory. So an
experiment that is given a device first retires the idle workers there (:meth:`evict`), and
the runner gives an experiment the free device with the fewest of them. A busy worker is never
evicted: it is answering a query that holds a slot of the device, so on a GPU (one slot) no
experiment can be given that device meanwhile. "cpu" with several slots (COMPUTE_LOCAL_CPU_SLOTS)
runs experiments and queries side by side in host memory: a worker that a query started there
stays warm while an experiment runs in another slot.

Memory (docs/services.md): a worker holds the base model, the experiment's LoRA adapter and its
gradient index, the same as the experiment held while scoring; the bound and the idle timeout
cap what compute-local keeps beyond the running jobs.
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
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

_MAX_LINE_BYTES = 1 << 30


class WorkerGone(RuntimeError):
    """The worker process ended while answering a query; the message says how."""


class WarmQueryWorker:
    """One worker process; answers one query at a time."""

    def __init__(self, parent_job_id: str, device: str, process: asyncio.subprocess.Process) -> None:
        self.parent_job_id = parent_job_id
        self.device = device
        self.process = process
        self.busy = False
        self.idle_since = time.monotonic()
        self.answered = 0
        # False from sending a job until its "done" line: a worker left mid-answer (its reader
        # stopped early) still has that job's lines to come and must not answer another.
        self.in_sync = True

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def answer(self, job_dir: Path) -> AsyncIterator[dict[str, object]]:
        """The events of one query, up to (not including) the worker's ``done`` line."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.busy = True
        self.in_sync = False
        try:
            await self._send({"job_dir": str(job_dir)})
            async for line in self.process.stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    log.warning(
                        "ignoring a line that is not JSON", extra={"parent_job_id": self.parent_job_id}
                    )
                    continue
                if not isinstance(event, dict):
                    continue
                if event.get("type") == "done":
                    self.answered += 1
                    self.in_sync = True
                    return
                yield event
            returncode = await self.process.wait()
            raise WorkerGone(_describe_exit(returncode))
        finally:
            self.busy = False
            self.idle_since = time.monotonic()

    async def cancel(self, job_dir: Path) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send({"cancel": str(job_dir)})

    async def _send(self, message: dict[str, str]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        await self.process.stdin.drain()

    async def close(self, grace_s: float) -> None:
        """End the process: close its stdin (it exits), SIGTERM, then SIGKILL after ``grace_s``."""
        if self.process.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.process.stdin.close()
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
                return
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signum)
        await self.process.wait()


class WarmQueryPool:
    def __init__(self, size: int, idle_s: float, grace_s: float, log_path: Path) -> None:
        self.size = size
        self.idle_s = idle_s
        self._grace_s = grace_s
        self._log_path = log_path
        self._workers: dict[str, WarmQueryWorker] = {}
        self._reaper: asyncio.Task[None] | None = None

    @property
    def workers(self) -> list[WarmQueryWorker]:
        return list(self._workers.values())

    def on_device(self, device: str) -> list[WarmQueryWorker]:
        """The pool's workers that hold memory on ``device``."""
        return [w for w in self._workers.values() if w.device == device]

    async def evict(self, device: str) -> int:
        """Retire the idle workers on ``device`` (never a busy one); how many were retired."""
        idle = [w for w in self.on_device(device) if not w.busy]
        for worker in idle:
            await self._retire(worker)
        return len(idle)

    def find(self, parent_job_id: str) -> WarmQueryWorker | None:
        worker = self._workers.get(parent_job_id)
        return worker if worker is not None and worker.alive else None

    async def get(
        self, parent_job_id: str, device: str, threads: int, parent_dir: Path | None, env: dict[str, str]
    ) -> WarmQueryWorker:
        """The experiment's warm worker on ``device``, started when there is none (with
        ``threads`` torch threads, the share of a job on that device; retiring the
        longest-idle other worker when the pool is full). While the experiment's worker is busy
        (a query of it in another slot) or the pool holds only busy workers, the new worker
        answers this one query and is retired: the pool never holds more than ``size``."""
        worker = self.find(parent_job_id)
        if worker is not None and not worker.busy:
            if worker.device == device:
                return worker
            await self._retire(worker)
        idle = sorted((w for w in self._workers.values() if not w.busy), key=lambda w: w.idle_since)
        while idle and len(self._workers) >= self.size:
            await self._retire(idle.pop(0))
        worker = await self._start(parent_job_id, device, threads, parent_dir, env)
        if len(self._workers) < self.size and parent_job_id not in self._workers:
            self._workers[parent_job_id] = worker
            if self._reaper is None:
                self._reaper = asyncio.create_task(self._reap_periodically())
        return worker

    async def release(self, worker: WarmQueryWorker) -> None:
        """After a query: keep the pool's worker warm; retire one the pool does not hold, that
        died, or that was left mid-answer."""
        if self._workers.get(worker.parent_job_id) is not worker or not worker.alive or not worker.in_sync:
            await self._retire(worker)

    async def discard(self, worker: WarmQueryWorker) -> None:
        await self._retire(worker)

    async def retire_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [w for w in self._workers.values() if not w.busy and now - w.idle_since >= self.idle_s]
        for worker in expired:
            await self._retire(worker)
        return len(expired)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await asyncio.gather(*(self._retire(worker) for worker in list(self._workers.values())))

    async def _retire(self, worker: WarmQueryWorker) -> None:
        if self._workers.get(worker.parent_job_id) is worker:
            del self._workers[worker.parent_job_id]
        await worker.close(self._grace_s)
        log.info(
            "warm query worker retired",
            extra={"parent_job_id": worker.parent_job_id, "queries": worker.answered},
        )

    async def _start(
        self, parent_job_id: str, device: str, threads: int, parent_dir: Path | None, env: dict[str, str]
    ) -> WarmQueryWorker:
        command = [
            sys.executable,
            "-m",
            "compute_local.query_worker",
            "--parent-pid",
            str(os.getpid()),
            "--threads",
            str(threads),
        ]
        if parent_dir is not None:
            command += ["--parent-dir", str(parent_dir)]
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as worker_log:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=worker_log,
                env=env,
                cwd=str(self._log_path.parent),
                start_new_session=True,
                limit=_MAX_LINE_BYTES,
            )
        log.info(
            "warm query worker started",
            extra={"parent_job_id": parent_job_id, "pid": process.pid, "device": device},
        )
        return WarmQueryWorker(parent_job_id, device, process)

    async def _reap_periodically(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_s, 30.0) / 2)
            await self.retire_idle()


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"the query worker process was killed by {name}{hint} before it answered"
    return f"the query worker process exited with code {returncode} before it answered"
