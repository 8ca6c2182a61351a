"""Job lifecycle: validate, store, estimate, submit (with retries), follow to the end, cancel.

One runner task per non-terminal job submits it (when the provider has not got it yet) and then
follows it with GetStatus until a terminal state, storing every event and the result the moment
it exists. A runner stops only at a terminal state; while a provider or the database is
unreachable it waits with backoff, so a job is never lost.

With several replicas, a replica runs only the runners of jobs it holds a lease on (a row-level
claim in the jobs table, renewed by a heartbeat). When a replica dies its leases expire and
another claims the jobs. A takeover may resubmit a job whose submit was in flight: the attempt
is counted before the call and every provider deduplicates a submit by our job id, so the
provider runs it once; events stay gapless because each follow step stores its events only if
the provider cursor it started from is still the stored one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

import cost_model
from artifact_store import job_prefix
from gpu_core import schemas
from gpu_core.jobs import EXPERIMENT, JobInputError, job_kind, parse_request, parse_result
from gpu_core.schemas import NO_SIZE_LIMITS, parse_spec
from influence.v1 import common_pb2, compute_pb2
from scheduler.admission import Usage, check_ceiling, check_quota, current_usage
from scheduler.artifacts import ArtifactMover, ArtifactTransferError, parse_manifest
from scheduler.config import Settings
from scheduler.db import DbConnection
from scheduler.model_ids import ModelNotAllowed, check_model_id
from scheduler.providers import (
    LaterJob,
    ProviderError,
    ProviderNotConfigured,
    Providers,
    Route,
    route_for,
)
from scheduler.store import JobRow, JobUpdate, Lease, Store
from scheduler.uploads import (
    presigned_parent_downloads,
    presigned_uploads,
    reads_parent_artifacts,
    remove_uploads,
    uploads_directly,
    verify_uploads,
)
from service_runtime.jobs import event_dict

log = logging.getLogger(__name__)

BACKENDS = ("hosted", "runpod")
WAITING_STAGE = "waiting_for_gpu"
_METRIC_KEYS = ("epoch", "total_epochs", "step", "total_steps", "loss", "learning_rate", "eta_s")
_WAITING_STATES = (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_SUBMITTED)
# Jobs one lease-loop turn claims at most (the rest on the next turn).
_CLAIM_BATCH = 100


class SpecError(ValueError):
    """The experiment spec is invalid; the message names the field."""


class JobNotFound(LookupError):
    """No such job for this user (another user's job is not found either)."""


class ParentNotCompleted(Exception):
    """A later job (e.g. a counterfactual check) asked for an experiment that has not completed."""


def parse_job_spec(spec_json: bytes) -> schemas.ExperimentSpec:
    """The spec, validated (size limits are the gateway's), with example ids filled in."""
    try:
        return parse_spec(spec_json, NO_SIZE_LIMITS)
    except schemas.SpecError as exc:
        raise SpecError("invalid experiment spec: " + "; ".join(exc.problems[:5])) from None


def validate_spec(spec_json: bytes) -> dict[str, Any]:
    """The spec as stored and sent to providers."""
    return parse_job_spec(spec_json).model_dump(mode="json")


def admission_estimate(
    spec: schemas.ExperimentSpec, route: Route, kind: str = "", request_json: bytes = b""
) -> tuple[float, float]:
    """(time s, USD) from the shared cost model, the figures the providers estimate with (a later
    job of ``kind`` as that kind: a query costs far less than its experiment); the provider's own
    estimate replaces it when the job is submitted."""
    try:
        figures = cost_model.estimate_job(spec, route.provider, route.backend, kind, request_json)
    except cost_model.PriceTableError as exc:
        log.warning("no estimate for admission", extra={"provider": route.provider, "error": str(exc)})
        return 0.0, 0.0
    return figures.estimated_time_s, figures.estimated_cost_usd


@dataclass(frozen=True)
class Estimates:
    active_backend: str
    estimates: list[common_pb2.Estimate]
    notes: list[str]


class JobManager:
    def __init__(
        self, settings: Settings, store: Store, providers: Providers, artifacts: ArtifactMover
    ) -> None:
        self._settings = settings
        self._store = store
        self._providers = providers
        self.artifacts = artifacts
        self._runners: dict[str, asyncio.Task[None]] = {}
        # When each job's result first failed to arrive (monotonic): collection is bounded in time.
        self._result_failing_since: dict[str, float] = {}
        self._lease = Lease(settings.scheduler_replica_id, settings.scheduler_lease_s)
        self._lease_task: asyncio.Task[None] | None = None

    # ---- submit -------------------------------------------------------------------------

    async def submit(
        self,
        user_id: str,
        spec_json: bytes,
        idempotency_key: str,
        kind: str = "",
        parent_job_id: str = "",
        request_json: bytes = b"",
    ) -> JobRow:
        """Store and submit an experiment (``spec_json``), or a later job of ``kind`` on the
        user's completed experiment ``parent_job_id``, which runs on that experiment's backend
        with its stored spec."""
        parent, request = None, None
        if job_kind(kind).needs_parent:
            parent, request = await self._later_job(user_id, kind, parent_job_id, request_json)
            spec = parent.spec
            route = Route(backend=parent.compute_backend, provider=parent.provider)  # type: ignore[arg-type]
        else:
            spec = validate_spec(spec_json)
            profile = await self._store.get_profile(user_id)
            route = route_for(profile.compute_backend, self._settings)
            try:
                check_model_id(spec["model_id"], route.hosted, self._settings.model_dir_roots)
            except ModelNotAllowed as exc:
                raise SpecError(str(exc)) from None
        # Raises ProviderNotConfigured before anything is stored: nothing could run the job.
        self._providers.client(route.provider)
        estimate = admission_estimate(
            parse_job_spec(json.dumps(spec).encode()),
            route,
            kind,
            json.dumps(request).encode() if request is not None else b"",
        )

        async def admit(conn: DbConnection) -> None:
            usage = await current_usage(conn, self._settings, user_id, route.backend)
            check_ceiling(usage, *estimate)
            check_quota(usage, estimate[0])

        job, created = await self._store.insert_job(
            user_id,
            route.backend,
            route.provider,
            spec,
            idempotency_key or None,
            admit=admit,
            estimate=estimate,
            kind=job_kind(kind).name,
            parent_job_id=parent.id if parent is not None else None,
            request=request,
            lease=self._lease,
        )
        if not created:
            return job
        log.info("job stored", extra={"job_id": job.id, "provider": route.provider})
        try:
            job = await self._attempt_submit(job)
        finally:
            # Whatever happened here, the runner retries (it exits at once on a terminal job).
            self._start_runner(job.id)
        return job

    async def _later_job(
        self, user_id: str, kind: str, parent_job_id: str, request_json: bytes
    ) -> tuple[JobRow, dict[str, Any]]:
        """The parent experiment and the request, checked against it (JobInputError names the
        field; another user's experiment is not found)."""
        later_kind = job_kind(kind)
        if not parent_job_id:
            raise JobInputError(f"parent_job_id: a {later_kind.name} job needs the experiment it builds on")
        parent = await self._store.get_job(parent_job_id, user_id)
        if parent is None:
            raise JobNotFound(parent_job_id)
        if parent.kind != EXPERIMENT:
            raise JobInputError(f"parent_job_id: that job is a {parent.kind} job, not an experiment")
        found = await self._store.get_result(parent.id, user_id)
        if parent.status != "completed" or found is None or found[1] is None:
            raise ParentNotCompleted(
                f"the experiment is {parent.status}; a {later_kind.name} job needs a completed experiment"
            )
        request = parse_request(later_kind, request_json)
        if later_kind.check is not None:
            later_kind.check(request, parse_spec(parent.spec, NO_SIZE_LIMITS), parse_result(found[1]))
        return parent, request.model_dump(mode="json")

    async def _later_payload(self, job: JobRow) -> LaterJob | None:
        """For a later job, its request and its experiment's result as a provider receives them."""
        if job.kind == EXPERIMENT:
            return None
        found = await self._store.get_result(job.parent_job_id, job.user_id)
        parent_result = found[1] if found is not None else None
        downloads: list[compute_pb2.ParentArtifact] = []
        if reads_parent_artifacts(job.kind):
            parent = await self._store.get_job(job.parent_job_id, job.user_id)
            downloads = await presigned_parent_downloads(
                self.artifacts.store,
                job.parent_job_id,
                parent.artifacts if parent is not None else [],
                parent_result,
                self._settings.scheduler_upload_url_ttl_s,
            )
        return LaterJob(
            kind=job.kind,
            request_json=json.dumps(job.request or {}).encode(),
            parent_result_json=json.dumps(parent_result).encode(),
            parent_job_id=job.parent_job_id,
            parent_artifacts=tuple(downloads),
        )

    async def _attempt_submit(self, job: JobRow) -> JobRow:
        """Estimate and submit once. A retryable provider error leaves the job QUEUED with a
        message; any other error fails it with the provider's plain message."""
        try:
            return await self._submit_once(job)
        except ProviderError as exc:
            if exc.retryable:
                log.warning(
                    "submit deferred", extra={"job_id": job.id, "code": exc.code, "error": exc.message}
                )
                message = f"{exc.message}; the scheduler will retry automatically"
                updated = await self._store.apply(job.id, JobUpdate(stage_message=message))
            else:
                updated = await self._store.apply(
                    job.id, JobUpdate(status="failed", error=exc.message, stage_message=exc.message)
                )
        except ProviderNotConfigured as exc:
            updated = await self._store.apply(
                job.id, JobUpdate(status="failed", error=str(exc), stage_message=str(exc))
            )
        return updated or await self._reload(job.id)

    async def _submit_once(self, job: JobRow) -> JobRow:
        route = Route(backend=job.compute_backend, provider=job.provider)  # type: ignore[arg-type]
        client = self._providers.client(route.provider)
        spec_json = json.dumps(job.spec).encode()
        later = await self._later_payload(job)
        estimated_time_s, estimated_cost_usd = job.estimated_time_s, job.estimated_cost_usd
        if job.submit_attempts == 0 or estimated_time_s == 0:
            estimate = await client.estimate(
                spec_json,
                route.backend,
                later.kind if later else "",
                later.request_json if later else b"",
            )
            estimated_time_s, estimated_cost_usd = estimate.estimated_time_s, estimate.estimated_cost_usd
            await self._store.set_estimate(job.id, estimated_time_s, estimated_cost_usd)
        endpoint_id = ""
        if route.needs_endpoint:
            endpoint_id = await self._ensure_endpoint(route, job.user_id, job.spec)
        account = route.account(job.user_id, endpoint_id)
        # Counted before the call: a provider that got the job while its answer was lost
        # deduplicates the resubmission by our job id.
        await self._store.count_submit_attempt(job.id)
        uploads = []
        # Only experiments write files; a later job of one (a counterfactual check) returns JSON.
        if later is None and uploads_directly(route.provider, self.artifacts.store):
            uploads = await presigned_uploads(
                self.artifacts.store, job.id, job.spec, self._settings.scheduler_upload_url_ttl_s
            )
        provider_job_id = await client.submit(
            job.id, account, spec_json, estimated_cost_usd, estimated_time_s, later, uploads
        )
        await self._store.set_provider_job_id(job.id, provider_job_id)
        log.info("job submitted", extra={"job_id": job.id, "provider_job_id": provider_job_id})
        updated = await self._store.apply(
            job.id,
            JobUpdate(
                status="submitted",
                stage=WAITING_STAGE,
                stage_message=f"submitted to {route.provider}; waiting for a worker",
            ),
        )
        if updated is None:
            current = await self._reload(job.id)
            if current.status == "cancelled":
                # Cancelled (on another replica) while this submit was in flight.
                await client.cancel(job.id, provider_job_id, account)
            return current
        return updated

    async def _ensure_endpoint(self, route: Route, user_id: str, spec: dict[str, Any]) -> str:
        """The user's RunPod endpoint, created on first use. A per-user advisory lock makes two
        concurrent first jobs (on any scheduler replica) create one endpoint."""
        client = self._providers.client("runpod")
        model_id = spec.get("model_id", "")
        quantization = spec.get("hyperparams", {}).get("quantization", "none")
        lock_key = f"runpod-endpoint:{user_id}"
        async with self._store.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", lock_key)
            try:
                stored = (await self._store.get_profile(user_id)).runpod_endpoint_id
                if not stored:
                    await self._store.set_endpoint(conn, user_id, None, "creating")
                try:
                    try:
                        prepared = await client.prepare_account(
                            route.account(user_id, stored), model_id, quantization
                        )
                    except ProviderError as exc:
                        if exc.code != "NOT_FOUND" or not stored:
                            raise
                        log.info("stored endpoint is gone; creating a new one", extra={"user_id": user_id})
                        await self._store.set_endpoint(conn, user_id, "", "creating")
                        prepared = await client.prepare_account(
                            route.account(user_id, ""), model_id, quantization
                        )
                    if prepared.status == "error" or not prepared.endpoint_id:
                        raise ProviderError(
                            "runpod",
                            "FAILED_PRECONDITION",
                            "the RunPod endpoint could not be prepared on your account",
                            False,
                        )
                except ProviderError as exc:
                    await self._store.set_endpoint(
                        conn, user_id, None, "none" if exc.retryable else "error", exc.message
                    )
                    raise
                await self._store.set_endpoint(
                    conn, user_id, prepared.endpoint_id, prepared.status or "ready"
                )
                if prepared.created:
                    log.info("runpod endpoint created", extra={"user_id": user_id})
                return prepared.endpoint_id
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", lock_key)

    # ---- following ----------------------------------------------------------------------

    async def resume_all(self) -> int:
        """Claim the active jobs no live replica follows and start their runners; from then on a
        lease loop renews this replica's leases and claims jobs whose replica died."""
        claimed = await self._claim()
        if self._lease_task is None:
            self._lease_task = asyncio.create_task(self._lease_loop(), name="scheduler-leases")
        return claimed

    async def _claim(self) -> int:
        job_ids = await self._store.claim_jobs(self._lease, _CLAIM_BATCH)
        for job_id in job_ids:
            if job_id not in self._runners:
                log.info("job claimed", extra={"job_id": job_id, "replica": self._lease.owner})
            self._start_runner(job_id)
        return len(job_ids)

    async def _lease_loop(self) -> None:
        interval = self._lease.seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                held = await self._store.renew_leases(self._lease, list(self._runners))
                for job_id in [j for j in self._runners if j not in held]:
                    # Another replica took it over (this one stalled past its lease): stop.
                    log.warning("lease lost; no longer following", extra={"job_id": job_id})
                    await self._stop_runner(job_id)
                await self._claim()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("leases not renewed; database unavailable", extra={"error": str(exc)})

    def _start_runner(self, job_id: str) -> None:
        if job_id in self._runners:
            return
        task = asyncio.create_task(self._run(job_id), name=f"job-{job_id}")
        self._runners[job_id] = task
        task.add_done_callback(lambda _t: self._forget(job_id))

    def _forget(self, job_id: str) -> None:
        self._runners.pop(job_id, None)
        self._result_failing_since.pop(job_id, None)

    async def _stop_runner(self, job_id: str) -> None:
        task = self._runners.pop(job_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, job_id: str) -> None:
        poll = self._settings.scheduler_poll_interval_s
        delay = poll
        while True:
            try:
                job = await self._store.get_job(job_id)
                if job is None or job.terminal:
                    return
                if not job.provider_job_id:
                    job = await self._attempt_submit(job)
                    ok = bool(job.provider_job_id) or job.terminal
                else:
                    await self._follow_step(job)
                    ok = True
            except ProviderError as exc:
                log.warning(
                    "provider call failed; will retry",
                    extra={"job_id": job_id, "code": exc.code, "error": exc.message},
                )
                ok = False
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("database unavailable; will retry", extra={"job_id": job_id, "error": str(exc)})
                ok = False
            except Exception:
                log.exception("job runner error; will retry", extra={"job_id": job_id})
                ok = False
            delay = poll if ok else min(max(delay, poll) * 2, self._settings.scheduler_retry_max_s)
            await asyncio.sleep(delay)

    async def _follow_step(self, job: JobRow) -> None:
        route = Route(backend=job.compute_backend, provider=job.provider)  # type: ignore[arg-type]
        client = self._providers.client(route.provider)
        account = route.account(job.user_id, await self._endpoint_for(route, job.user_id))
        try:
            status = await client.get_status(job.id, job.provider_job_id, account, job.provider_cursor)
        except ProviderError as exc:
            if exc.code != "NOT_FOUND":
                raise
            message = f"the {job.provider} provider no longer knows this job: {exc.message}"
            await self._store.apply(job.id, JobUpdate(status="failed", error=message, stage_message=message))
            return
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
            await self._collect_result(job, route, account, update)
        elif status.state == common_pb2.JOB_STATE_FAILED:
            error = status.error or f"the {job.provider} provider reported the job as failed"
            update.status, update.error, update.stage_message = "failed", error, error
            if uploads_directly(route.provider, self.artifacts.store):
                await remove_uploads(self.artifacts.store, job.id)
        elif status.state == common_pb2.JOB_STATE_CANCELLED:
            error = status.error or "cancelled at the provider"
            update.status, update.error, update.stage_message = "cancelled", error, error
        unchanged = (
            not events
            and status.cursor == job.provider_cursor
            and update.status in (None, job.status)
            and update.stage_message in (None, job.stage_message)
        )
        if not unchanged:
            await self._store.apply(job.id, update, expected_cursor=job.provider_cursor)

    async def _collect_result(
        self, job: JobRow, route: Route, account: common_pb2.Account, update: JobUpdate
    ) -> None:
        """Fetch the result, move its artifacts into the store, and put both into ``update`` so
        they are stored with the last events. A provider that keeps failing to hand over a ready
        result fails the job after scheduler_result_deadline_s."""
        client = self._providers.client(route.provider)
        try:
            result_json = await client.get_result(job.id, job.provider_job_id, account)
            result = json.loads(result_json)
        except ProviderError as exc:
            if exc.retryable and not self._result_deadline_passed(job.id):
                raise
            self._result_failing_since.pop(job.id, None)
            message = f"the result could not be collected from the {job.provider} provider: {exc.message}"
            update.status, update.error, update.stage_message = "failed", message, message
            return
        except ValueError:
            message = f"the {job.provider} provider returned a result that is not valid JSON"
            update.status, update.error, update.stage_message = "failed", message, message
            return
        self._result_failing_since.pop(job.id, None)
        try:
            manifest = parse_manifest(result.get("artifacts", []) if isinstance(result, dict) else [])
            if manifest:
                megabytes = sum(entry["bytes"] for entry in manifest) / 1e6
                await self._store.apply(
                    job.id,
                    JobUpdate(stage_message=f"storing the job's {len(manifest)} files ({megabytes:.1f} MB)"),
                )
            if manifest and uploads_directly(route.provider, self.artifacts.store):
                # The worker put the files into the store itself: check them there.
                await verify_uploads(self.artifacts.store, job.id, manifest)
            elif manifest:
                await self.artifacts.collect(job.id, job.provider_job_id, client, account, manifest)
        except ArtifactTransferError as exc:
            message = f"the job's files could not be stored: {exc}"
            update.status, update.error, update.stage_message = "failed", message, message
            return
        update.status, update.result, update.artifacts = "completed", result, manifest
        update.progress, update.stage_message = 1.0, "completed"

    def _result_deadline_passed(self, job_id: str) -> bool:
        now = time.monotonic()
        since = self._result_failing_since.setdefault(job_id, now)
        return now - since >= self._settings.scheduler_result_deadline_s

    async def _endpoint_for(self, route: Route, user_id: str) -> str:
        if not route.needs_endpoint:
            return ""
        return (await self._store.get_profile(user_id)).runpod_endpoint_id

    async def _reload(self, job_id: str) -> JobRow:
        job = await self._store.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    # ---- other operations ---------------------------------------------------------------

    async def cancel(self, user_id: str, job_id: str) -> JobRow:
        job = await self._store.get_job(job_id, user_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.terminal:
            return job
        # Stop the runner first so it cannot submit or complete the job concurrently.
        await self._stop_runner(job.id)
        job = await self._reload(job.id)
        try:
            if job.provider_job_id or job.submit_attempts:
                route = Route(backend=job.compute_backend, provider=job.provider)  # type: ignore[arg-type]
                account = route.account(user_id, await self._endpoint_for(route, user_id))
                try:
                    await self._providers.client(route.provider).cancel(job.id, job.provider_job_id, account)
                except ProviderError as exc:
                    if exc.code != "NOT_FOUND":
                        raise
        except BaseException:
            if not job.terminal:
                self._start_runner(job.id)
            raise
        updated = await self._store.apply(
            job.id, JobUpdate(status="cancelled", error="cancelled by the user", stage_message="cancelled")
        )
        return updated or await self._reload(job.id)

    async def delete(self, user_id: str, job_id: str) -> int:
        """Cancel the job if it is still running, then remove its artifacts and the job itself;
        returns how many artifacts were removed. A store failure leaves the job in place."""
        job = await self._store.get_job(job_id, user_id)
        if job is None:
            raise JobNotFound(job_id)
        if not job.terminal:
            await self.cancel(user_id, job_id)
        await self._stop_runner(job.id)
        removed = await self.artifacts.store.delete_prefix(job_prefix(job.id))
        await self._store.delete_job(job.id)
        log.info("job deleted", extra={"job_id": job.id, "artifacts": removed})
        return removed

    async def sweep_expired_artifacts(self, now: datetime | None = None) -> int:
        """Delete the artifacts of jobs finished more than artifact_retention_days ago; returns
        how many jobs lost theirs. The jobs and their small results stay."""
        days = self._settings.artifact_retention_days
        if days <= 0:
            return 0
        cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
        swept = 0
        while job_ids := await self._store.jobs_with_artifacts_finished_before(cutoff):
            for job_id in job_ids:
                await self.artifacts.store.delete_prefix(job_prefix(job_id))
                await self._store.clear_artifacts(job_id)
                swept += 1
        if swept:
            log.info("expired artifacts removed", extra={"jobs": swept, "retention_days": days})
        return swept

    # Same parameters as submit (less idempotency_key): the estimate is asked for the job that
    # submit would receive; each signature is spelled out for its callers and mypy.
    async def estimate(
        self,
        user_id: str,
        spec_json: bytes,
        kind: str = "",
        parent_job_id: str = "",
        request_json: bytes = b"",
    ) -> Estimates:
        if job_kind(kind).needs_parent:
            return await self._estimate_later(user_id, kind, parent_job_id, request_json)
        spec = validate_spec(spec_json)
        normalised = json.dumps(spec).encode()
        active = (await self._store.get_profile(user_id)).compute_backend
        estimates: list[common_pb2.Estimate] = []
        notes: list[str] = []
        for backend in (active, *(b for b in BACKENDS if b != active)):
            route = route_for(backend, self._settings)
            if not self._providers.configured(route.provider):
                notes.append(f"{backend}: the {route.provider} provider is not configured here")
                continue
            try:
                estimate = await self._providers.client(route.provider).estimate(normalised, backend)
            except ProviderError as exc:
                notes.append(f"{backend}: no estimate ({exc.message})")
                continue
            estimate.backend, estimate.provider = backend, route.provider
            estimates.append(estimate)
        return Estimates(active_backend=active, estimates=estimates, notes=notes)

    async def _estimate_later(
        self, user_id: str, kind: str, parent_job_id: str, request_json: bytes
    ) -> Estimates:
        """A later job runs on its experiment's backend: that one estimate (or a note)."""
        parent, request = await self._later_job(user_id, kind, parent_job_id, request_json)
        backend, provider = parent.compute_backend, parent.provider
        try:
            client = self._providers.client(provider)  # type: ignore[arg-type]
            estimate = await client.estimate(
                json.dumps(parent.spec).encode(), backend, job_kind(kind).name, json.dumps(request).encode()
            )
        except ProviderNotConfigured as exc:
            return Estimates(active_backend=backend, estimates=[], notes=[f"{backend}: {exc}"])
        except ProviderError as exc:
            note = f"{backend}: no estimate ({exc.message})"
            return Estimates(active_backend=backend, estimates=[], notes=[note])
        estimate.backend, estimate.provider = backend, provider
        return Estimates(active_backend=backend, estimates=[estimate], notes=[])

    async def usage(self, user_id: str) -> Usage:
        """The user's usage against the limits of their current backend."""
        backend = (await self._store.get_profile(user_id)).compute_backend
        async with self._store.pool.acquire() as conn:
            return await current_usage(conn, self._settings, user_id, backend)

    async def verify_runpod_key(self, user_id: str, api_key: str) -> compute_pb2.VerifyCredentialsResponse:
        """compute-runpod's verdict on the key (a refusal with its failure), passed on as it is
        but for any copy of the key in its words. The key is passed on and forgotten."""
        client = self._providers.client("runpod")
        account = common_pb2.Account(user_id=user_id, hosted=False)
        try:
            verdict = await client.verify_credentials(account, api_key)
        except ProviderError as exc:
            raise ProviderError(
                exc.provider, exc.code, _without(exc.message, api_key), exc.retryable
            ) from None
        verdict.message = _without(verdict.message, api_key)
        return verdict

    # Same shape as notify.EventHub.close: stopping a background task is cancel, gather, forget;
    # the rest of each close (runners here, the listener connection there) differs.
    async def close(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            await asyncio.gather(self._lease_task, return_exceptions=True)
            self._lease_task = None
        tasks = list(self._runners.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runners.clear()
        try:
            # Another replica takes these jobs over now rather than when the leases expire.
            await self._store.release_leases(self._lease.owner)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("leases not released; they expire instead", extra={"error": str(exc)})


def _without(message: str, secret: str) -> str:
    """``message`` with any copy of ``secret`` removed (a provider should never echo a key)."""
    return message.replace(secret, "[REDACTED]") if secret else message
