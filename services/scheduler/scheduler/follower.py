"""Following submitted jobs: one poller per provider on each replica, for the jobs whose lease
this replica holds.

A poller reads the jobs that are due in one statement (never their specs) and asks the provider
for each (bounded concurrency, on the endpoint the job was submitted on), stores the events and
the result the moment it exists, and decides when to ask next: soon after a submit and while a
job makes progress, then less and less often while nothing changes (a job waiting in a queue).
Every write is fenced by the lease and by the provider cursor the step started from, so events
stay gapless even if a stalled replica wakes up after another took its jobs over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

import cost_model
from artifact_store import StoreError
from gpu_core.uploads import DUPLICATE_DELIVERY
from influence.v1 import common_pb2
from scheduler.artifacts import (
    ArtifactMover,
    ArtifactTransferError,
    StoreUnavailable,
    fetch_stored_result,
    parse_manifest,
    read_worker_claim,
)
from scheduler.config import Settings
from scheduler.graph import Graph
from scheduler.providers import ProviderClient, ProviderError, Providers, Route
from scheduler.store import JobRow, JobUpdate, Lease, Store
from scheduler.uploads import remove_uploads, uploads_directly, verify_uploads
from service_runtime.jobs import TERMINAL_STATES, event_dict
from service_runtime.tracing import continued_trace

log = logging.getLogger(__name__)

WAITING_STAGE = "waiting_for_gpu"
DB_ERRORS = (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
_METRIC_KEYS = ("epoch", "total_epochs", "step", "total_steps", "loss", "learning_rate", "eta_s")
_WAITING_STATES = (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_SUBMITTED)
# How much longer the next poll waits each time a job did not change.
_SLOWDOWN = 1.5
# Jobs one poller reads in one statement.
_BATCH = 200


@dataclass
class _Followed:
    provider: str
    due: float  # monotonic time of the next poll; inf while one is in flight
    interval: float
    refusals: int = 0  # non-retryable answers in a row
    woken: bool = False  # a webhook came while a poll was in flight: poll again at once after it
    result_failing_since: float | None = None
    store_failing_since: float | None = None  # verification found the store unavailable


class Follower:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: Providers,
        artifacts: ArtifactMover,
        lease: Lease,
        graph: Graph,
    ) -> None:
        self._settings = settings
        self._graph = graph
        self._store = store
        self._providers = providers
        self._artifacts = artifacts
        self._lease = lease
        self._jobs: dict[str, _Followed] = {}
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._steps: set[asyncio.Task[None]] = set()

    @property
    def held(self) -> set[str]:
        return set(self._jobs)

    def follow(self, job_id: str, provider: str) -> None:
        """Follow ``job_id`` from now on (its first poll at once)."""
        if job_id not in self._jobs:
            self._jobs[job_id] = _Followed(
                provider, time.monotonic(), self._settings.scheduler_poll_interval_s
            )
        if provider not in self._pollers:
            self._wake[provider] = asyncio.Event()
            self._pollers[provider] = asyncio.create_task(
                self._poll_loop(provider), name=f"poller-{provider}"
            )
        self._wake[provider].set()

    def wake(self, job_id: str) -> None:
        """A provider's webhook for ``job_id`` came: poll it now (if this replica follows it).
        The poll's answer, not the webhook, decides what happened to the job."""
        followed = self._jobs.get(job_id)
        if followed is None:
            return
        if followed.due == float("inf"):
            followed.woken = True  # the poll in flight may have read the provider just before
            return
        followed.due = time.monotonic()
        followed.interval = self._settings.scheduler_poll_interval_s
        self._wake[followed.provider].set()

    def drop(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    async def close(self) -> None:
        tasks = [*self._pollers.values(), *self._steps]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pollers.clear()
        self._jobs.clear()

    async def _poll_loop(self, provider: str) -> None:
        limit = asyncio.Semaphore(self._settings.scheduler_poll_concurrency)
        wake = self._wake[provider]
        while True:
            now = time.monotonic()
            due = [job_id for job_id, f in self._jobs.items() if f.provider == provider and f.due <= now][
                :_BATCH
            ]
            if due:
                for job_id in due:
                    self._jobs[job_id].due = float("inf")
                try:
                    rows = {job.id: job for job in await self._store.get_jobs(due)}
                except DB_ERRORS as exc:
                    log.warning("database unavailable; polls deferred", extra={"error": str(exc)})
                    rows = None
                for job_id in due:
                    followed = self._jobs.get(job_id)
                    if followed is None:
                        continue
                    if rows is None:
                        followed.due = now + self._settings.scheduler_retry_max_s
                    elif job_id not in rows or rows[job_id].terminal:
                        self.drop(job_id)
                    else:
                        task = asyncio.create_task(self._step(rows[job_id], followed, limit))
                        self._steps.add(task)
                        task.add_done_callback(self._steps.discard)
            upcoming = [f.due for f in self._jobs.values() if f.provider == provider]
            wait = min(upcoming, default=now + 1.0) - time.monotonic()
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(max(wait, 0.005), 1.0))

    async def _step(self, job: JobRow, followed: _Followed, limit: asyncio.Semaphore) -> None:
        fast = self._settings.scheduler_poll_interval_s
        interval = followed.interval
        try:
            async with limit:
                with continued_trace(job.trace_context):
                    progressed, terminal = await self._follow_step(job, followed)
            followed.refusals = 0
            if terminal:
                self.drop(job.id)
                return
            interval = (
                fast
                if progressed
                else min(interval * _SLOWDOWN, self._settings.scheduler_poll_max_interval_s)
            )
        except ProviderError as exc:
            interval = min(max(interval, fast) * 2, self._settings.scheduler_retry_max_s)
            if not exc.retryable:
                followed.refusals += 1
                if followed.refusals >= self._settings.scheduler_poll_max_failures:
                    await self._fail_refused(job, exc, followed.refusals)
                    return
            log.warning(
                "provider status failed; will retry",
                extra={"job_id": job.id, "code": exc.code, "error": exc.message},
            )
        except (StoreError, StoreUnavailable) as exc:
            log.warning("artifact store unavailable; will retry", extra={"job_id": job.id, "error": str(exc)})
            interval = min(max(interval, fast) * 2, self._settings.scheduler_retry_max_s)
        except DB_ERRORS as exc:
            log.warning("database unavailable; will retry", extra={"job_id": job.id, "error": str(exc)})
            interval = min(max(interval, fast) * 2, self._settings.scheduler_retry_max_s)
        except Exception:
            log.exception("follow step error; will retry", extra={"job_id": job.id})
            interval = min(max(interval, fast) * 2, self._settings.scheduler_retry_max_s)
        followed.interval = interval
        followed.due = time.monotonic() + (0.0 if followed.woken else interval)
        followed.woken = False
        wake = self._wake.get(followed.provider)
        if wake is not None:
            wake.set()

    async def _fail_refused(self, job: JobRow, exc: ProviderError, tries: int) -> None:
        """A provider that keeps refusing to report on a job (bad key, endpoint gone): the job
        fails with the provider's words rather than staying active for ever."""
        message = (
            f"the {job.provider} provider refused to report on this job {tries} times in a row "
            f"({exc.code}): {exc.message}"
        )
        try:
            await self._store.apply(
                job.id, JobUpdate(status="failed", error=message, stage_message=message), lease=self._lease
            )
            self.drop(job.id)
        except DB_ERRORS as db_exc:
            log.warning(
                "could not fail a refused job; will retry", extra={"job_id": job.id, "error": str(db_exc)}
            )
            followed = self._jobs.get(job.id)
            if followed is not None:
                followed.due = time.monotonic() + self._settings.scheduler_retry_max_s

    async def _follow_step(self, job: JobRow, followed: _Followed) -> tuple[bool, bool]:
        """One poll: (whether the job progressed, whether it is now terminal). A sharded
        experiment is stepped by its graph instead; a part's change wakes its experiment."""
        if job.is_graph:
            return await self._graph.step(job)
        progressed, terminal = await self._poll(job, followed)
        if progressed and job.graph_job_id:
            self.wake(job.graph_job_id)
        return progressed, terminal

    async def _poll(self, job: JobRow, followed: _Followed) -> tuple[bool, bool]:
        route = Route(backend=job.compute_backend, provider=job.provider)  # type: ignore[arg-type]
        client = self._providers.client(route.provider)
        account = route.account(job.user_id, job.endpoint_id)
        try:
            status = await client.get_status(job.id, job.provider_job_id, account, job.provider_cursor)
        except ProviderError as exc:
            if exc.code != "NOT_FOUND":
                raise
            # RunPod forgets a job after its retention (say the scheduler was down meanwhile):
            # the worker's copy of the result in the store is collected before giving up.
            update = JobUpdate(cursor=job.provider_cursor)
            if not await self._collect_result(job, route, account, update, followed, forgotten=exc):
                if await self._send_again_if_never_ran(job):
                    return False, False
                message = f"the {job.provider} provider no longer knows this job: {exc.message}"
                update.status, update.error, update.stage_message = "failed", message, message
            stored = await self._store.apply(
                job.id, update, expected_cursor=job.provider_cursor, lease=self._lease
            )
            return True, stored is not None and stored.terminal
        events = [event_dict(e) for e in status.events if e.type != "result"]
        update = JobUpdate(events=events, cursor=status.cursor)
        for event in events:
            if event.get("type") != "progress":
                continue
            if event.get("stage"):
                update.stage = str(event["stage"])
            if isinstance(event.get("progress"), int | float):
                update.progress = float(event["progress"])
            update.stage_message = str(event.get("message", ""))
            metrics = {key: event[key] for key in _METRIC_KEYS if event.get(key) is not None}
            if metrics:
                update.latest_metrics = metrics
        if status.state in _WAITING_STATES:
            update.status = "submitted"
            update.stage = WAITING_STAGE
            update.stage_message = status.stage_message or "waiting for a worker"
        elif status.state == common_pb2.JOB_STATE_RUNNING:
            update.status = "running"
            if update.stage_message is None and status.stage_message:
                update.stage_message = status.stage_message
        if status.result_ready or status.state == common_pb2.JOB_STATE_COMPLETED:
            await self._collect_result(job, route, account, update, followed)
        elif status.state == common_pb2.JOB_STATE_FAILED and await self._switch_to_claimant(
            job, status.error
        ):
            return True, False
        elif status.state == common_pb2.JOB_STATE_FAILED:
            error = status.error or f"the {job.provider} provider reported the job as failed"
            update.status, update.error, update.stage_message = "failed", error, error
            if uploads_directly(route.provider, self._artifacts.store):
                await remove_uploads(self._artifacts.store, job.id)
        elif status.state == common_pb2.JOB_STATE_CANCELLED:
            error = status.error or "cancelled at the provider"
            update.status, update.error, update.stage_message = "cancelled", error, error
        if update.status in TERMINAL_STATES and status.HasField("usage"):
            update.actual = actual_cost(job, status.usage, update.result)
        elif update.status not in TERMINAL_STATES:
            await self._stop_at_spend_cap(job, client, account, update)
        # Progress (events, a new state) polls again soon; a new waiting message alone (a queue
        # position, an ETA) is stored but lets the interval keep growing.
        progressed = (
            bool(events) or status.cursor != job.provider_cursor or update.status not in (None, job.status)
        )
        if not progressed and update.stage_message in (None, job.stage_message):
            return False, False
        stored = await self._store.apply(
            job.id, update, expected_cursor=job.provider_cursor, lease=self._lease
        )
        return progressed, stored is not None and stored.terminal

    async def _stop_at_spend_cap(
        self, job: JobRow, client: ProviderClient, account: common_pb2.Account, update: JobUpdate
    ) -> None:
        """Cancel a running job whose time so far, at the rate its estimate priced, has reached the
        researcher's spend cap; ``update`` then ends it, priced at the time the scheduler saw."""
        if job.max_cost_usd <= 0 or job.started_at is None or job.estimated_usd_per_second <= 0:
            return
        run_s = (datetime.now(UTC) - job.started_at).total_seconds()
        spent = run_s * job.estimated_usd_per_second
        if spent < job.max_cost_usd:
            return
        await client.cancel(job.id, job.provider_job_id, account)
        message = (
            f"Cancelled at your spend cap: it had run {run_s:.0f} s on {job.estimated_gpu or 'its GPU'} "
            f"at ${job.estimated_usd_per_second:.6f}/s, about ${spent:.4f}, reaching your cap of "
            f"${job.max_cost_usd:.4f}"
        )
        log.info("job cancelled at its spend cap", extra={"job_id": job.id, "spent_usd": spent})
        update.status, update.error, update.stage_message = "cancelled", message, message
        usage = common_pb2.JobUsage(
            gpu_seconds=run_s, source="run time as the scheduler saw it (cancelled at the spend cap)"
        )
        update.actual = actual_cost(job, usage, None)

    async def _send_again_if_never_ran(self, job: JobRow) -> bool:
        """A RunPod job that RunPod no longer knows and whose worker never claimed it was dropped
        from the queue unrun (its ttl, kept within its upload URLs' life, ended first): nothing ran
        or was billed. Once those URLs (the claim's among them) have expired, so that no late
        worker can claim it either, it goes back to the queue and is sent again with fresh ones;
        until then it waits (True). False: it ran, or this is no RunPod job with a store."""
        if job.provider != "runpod" or not uploads_directly(job.provider, self._artifacts.store):
            return False
        wait_s = self._settings.scheduler_upload_url_ttl_s + self._settings.scheduler_claim_margin_s
        # Read before the claim (as the dispatcher does): a claim written after this read was
        # written before the URLs expired, so "over and no claim" means it never ran.
        wait_over = await self._store.claim_wait_over(job.id, wait_s)
        if await read_worker_claim(self._artifacts.store, job.id) is not None or wait_over is None:
            return False
        if not wait_over:
            waiting = (
                "RunPod dropped this job from its queue before any worker took it (nothing ran or "
                "was billed); it is sent again once its first upload URLs expire"
            )
            if job.stage_message != waiting:
                await self._store.apply(job.id, JobUpdate(stage_message=waiting), lease=self._lease)
            return True
        message = "RunPod dropped this job from its queue before any worker took it; sent again"
        if await self._store.requeue_unrun(job.id, self._lease, job.provider_job_id, message):
            log.warning("a job RunPod dropped unrun goes back to the queue", extra={"job_id": job.id})
            self.drop(job.id)
        return True

    async def _switch_to_claimant(self, job: JobRow, error: str) -> bool:
        """A second RunPod/Modal job for our job id (a resent /run) ends with "Duplicate
        delivery" once it finds the first one's claim: that is not our job failing. Follow the
        claimant instead (True); False when the claim is this provider job's own (a real
        failure) or there is none. A store that fails raises StoreError: the poll is retried."""
        if not error.startswith(DUPLICATE_DELIVERY) or not uploads_directly(
            job.provider, self._artifacts.store
        ):
            return False
        claim = await read_worker_claim(self._artifacts.store, job.id)
        if claim is None or claim.provider_job_id in ("", job.provider_job_id):
            return False
        log.warning(
            "a duplicate delivery ended; following the job that claimed it",
            extra={
                "job_id": job.id,
                "duplicate": job.provider_job_id,
                "provider_job_id": claim.provider_job_id,
            },
        )
        await self._store.apply(
            job.id,
            JobUpdate(provider_job_id=claim.provider_job_id, cursor=""),
            expected_cursor=job.provider_cursor,
            lease=self._lease,
        )
        return True

    async def _collect_result(
        self,
        job: JobRow,
        route: Route,
        account: common_pb2.Account,
        update: JobUpdate,
        followed: _Followed,
        forgotten: ProviderError | None = None,
    ) -> bool:
        """Fetch the result, move its artifacts into the store, and put both into ``update`` so
        they are stored with the last events. A provider that keeps failing to hand over a ready
        result fails the job after scheduler_result_deadline_s. A provider that no longer knows
        the job (``forgotten``, or a result answered NOT_FOUND) hands over nothing: the worker's
        copy in the store is used; False (``update`` unchanged) when there is none either."""
        client = self._providers.client(route.provider)
        try:
            if forgotten is not None:
                raise forgotten
            result_json = await client.get_result(job.id, job.provider_job_id, account)
        except ProviderError as exc:
            stored = await self._stored_result(job) if exc.code == "NOT_FOUND" else None
            if stored is not None:
                log.info("result collected from the artifact store", extra={"job_id": job.id})
                result_json = stored
            elif forgotten is not None:
                return False
            else:
                now = time.monotonic()
                since = followed.result_failing_since = followed.result_failing_since or now
                if exc.retryable and now - since < self._settings.scheduler_result_deadline_s:
                    raise
                message = f"the result could not be collected from the {job.provider} provider: {exc.message}"
                update.status, update.error, update.stage_message = "failed", message, message
                return True
        try:
            result = json.loads(result_json)
        except ValueError:
            message = f"the {job.provider} provider returned a result that is not valid JSON"
            update.status, update.error, update.stage_message = "failed", message, message
            return True
        followed.result_failing_since = None
        check_started = time.monotonic()
        try:
            manifest = parse_manifest(result.get("artifacts", []) if isinstance(result, dict) else [])
            if manifest:
                megabytes = sum(entry["bytes"] for entry in manifest) / 1e6
                await self._store.apply(
                    job.id,
                    JobUpdate(stage_message=f"storing the job's {len(manifest)} files ({megabytes:.1f} MB)"),
                    lease=self._lease,
                )
            if manifest and uploads_directly(route.provider, self._artifacts.store):
                # The worker put the files into the store itself: check them there.
                await verify_uploads(
                    self._artifacts.store, job.id, manifest, self._settings.scheduler_verify_deadline_s
                )
            elif manifest:
                await self._artifacts.collect(job.id, job.provider_job_id, client, account, manifest)
        except StoreUnavailable as exc:
            # Nothing was deleted: the files are checked again at the next poll (the job stays
            # running) until scheduler_store_deadline_s, counted from the start of the first
            # check that failed.
            now = time.monotonic()
            since = followed.store_failing_since = followed.store_failing_since or check_started
            if now - since < self._settings.scheduler_store_deadline_s:
                raise
            message = (
                f"the artifact store could not be reached to check the job's files for "
                f"{now - since:.0f} s ({exc}); the files were left in place"
            )
            update.status, update.error, update.stage_message = "failed", message, message
            return True
        except ArtifactTransferError as exc:
            message = f"the job's files could not be stored: {exc}"
            update.status, update.error, update.stage_message = "failed", message, message
            return True
        followed.store_failing_since = None
        update.status, update.result, update.artifacts = "completed", result, manifest
        update.progress, update.stage_message = 1.0, "completed"
        return True

    async def _stored_result(self, job: JobRow) -> bytes | None:
        """The result the worker left in the store (RunPod and Modal workers write one), None
        when it left none. A store that fails raises StoreError: the poll is retried."""
        if not uploads_directly(job.provider, self._artifacts.store):
            return None
        return await fetch_stored_result(self._artifacts.store, job.id)


def actual_cost(job: JobRow, usage: common_pb2.JobUsage, result: Any) -> cost_model.ActualCost | None:
    """The job's real cost: the provider's measured seconds, priced at the rate of the GPU the
    worker reported (the result's environment.gpu_name), the provider named, or the estimate
    priced. None when the price table cannot be read (the job still ends)."""
    environment = result.get("environment") if isinstance(result, dict) else None
    device = environment.get("gpu_name") if isinstance(environment, dict) else None
    try:
        return cost_model.actual_cost(
            job.provider,
            usage.gpu_seconds,
            usage.delay_seconds,
            str(device or usage.gpu),
            job.estimated_gpu,
            usage.source or f"measured by the {job.provider} provider",
        )
    except cost_model.PriceTableError as exc:
        log.warning("job not priced", extra={"job_id": job.id, "error": str(exc)})
        return None
