"""Jobs as the scheduler's API sees them: submit (validation, admission and one INSERT, answered
at once: the jobs table is the outbox), cancel, delete, estimates and usage; and the lease loop
that hands this replica's jobs to the dispatcher (dispatcher.py: submits each job exactly once)
and the follower (follower.py: one poller per provider).

With several replicas, a replica works only on the jobs it holds a lease on (a row-level claim
in the jobs table, renewed by a heartbeat; a lease of its own that ran out is claimed again like
any other, never while live). When a replica dies its leases expire and another claims the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import cost_model
from artifact_store import job_prefix
from cost_model import ActualCost
from cost_model.estimate import DEFAULT_PARALLEL_JOBS
from gpu_core import schemas
from gpu_core.jobs import (
    EXPERIMENT,
    MERGE,
    WRITES_ARTIFACTS,
    JobInputError,
    job_kind,
    parse_request,
    parse_result,
    submittable_kind,
    training_count,
)
from gpu_core.schemas import NO_SIZE_LIMITS, parse_spec
from gpu_core.shard_schemas import shard_count
from influence.v1 import common_pb2, compute_pb2
from scheduler.admission import Usage, check_ceiling, check_quota, check_spend_cap, current_usage
from scheduler.artifacts import ArtifactMover
from scheduler.config import Settings
from scheduler.datasets import DatasetReferenceError, DatasetStore, attach_to_spec
from scheduler.db import DbConnection
from scheduler.dispatcher import Dispatcher
from scheduler.follower import DB_ERRORS, Follower
from scheduler.graph import Graph
from scheduler.hub_models import HubModelSizes, HubModelUnknown
from scheduler.model_ids import ModelNotAllowed, check_model_id, sized_from_hub
from scheduler.providers import ProviderError, ProviderNotConfigured, Providers, Route, route_for
from scheduler.store import JobRow, JobUpdate, Lease, Store
from scheduler.uploads import DIRECT_UPLOAD_PROVIDERS, occupy_upload_names, sweep_orphans, uploads_directly
from service_runtime.tracing import trace_carrier

log = logging.getLogger(__name__)

BACKENDS = ("hosted", "runpod")
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
    spec: schemas.ExperimentSpec,
    route: Route,
    kind: str = "",
    request_json: bytes = b"",
    card: cost_model.ModelCard | None = None,
    parallel_jobs: int | None = None,
) -> tuple[float, float]:
    """(time s, USD) from the shared cost model, the figures the providers estimate with (a later
    job of ``kind`` as that kind: a query costs far less than its experiment); the provider's own
    estimate replaces it when the job is submitted."""
    try:
        figures = cost_model.estimate_job(
            spec, route.provider, route.backend, kind, request_json, card=card, parallel_jobs=parallel_jobs
        )
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
        self._lease = Lease(settings.scheduler_replica_id, settings.scheduler_lease_s)
        # Set when a job was stored or a dispatch slot freed: claim queued jobs now, not next turn.
        self._queued = asyncio.Event()
        self.graph = Graph(settings, store, artifacts.store, self._lease, self._queued)
        self.graph.cancel_parts_with(self.cancel)
        self.follower = Follower(settings, store, providers, artifacts, self._lease, self.graph)
        self._hub_models = HubModelSizes(settings.hf_endpoint, settings.scheduler_hub_timeout_s)
        self.dispatcher = Dispatcher(
            settings,
            store,
            providers,
            artifacts,
            self._lease,
            self.follower,
            self.graph,
            slot_freed=self._queued,
        )
        self._lease_task: asyncio.Task[None] | None = None
        self.datasets = DatasetStore(store)

    # ---- submit -------------------------------------------------------------------------

    async def submit(
        self,
        user_id: str,
        spec_json: bytes,
        idempotency_key: str,
        kind: str = "",
        parent_job_id: str = "",
        request_json: bytes = b"",
        max_cost_usd: float = 0.0,
    ) -> JobRow:
        """Validate, admit and store an experiment (``spec_json``), or a later job of ``kind`` on
        the user's completed experiment ``parent_job_id`` (it runs on that experiment's backend
        with its stored spec). No provider is called: the job is answered queued and a
        dispatcher submits it. ``max_cost_usd``: the researcher's spend cap (0 = none); an
        estimate over it is refused here (JobTooLarge), and the follower cancels a running job
        that reaches it."""
        if max_cost_usd < 0:
            raise SpecError("max_cost_usd: must be 0 (no cap) or more")
        parent, request, shards, parallel = None, None, 1, 1
        if submittable_kind(kind).needs_parent:
            parent, request = await self._later_job(user_id, kind, parent_job_id, request_json)
            spec = await self._spec_of(parent.id, user_id)
            parsed = parse_job_spec(json.dumps(spec).encode())
            route = Route(backend=parent.compute_backend, provider=parent.provider)  # type: ignore[arg-type]
        else:
            spec_json = await self._with_datasets(user_id, spec_json)
            parsed = parse_job_spec(spec_json)  # parsed once: stored as it dumps, estimated as it is
            profile = await self._store.get_profile(user_id)
            route = route_for(profile.compute_backend, self._settings)
            # A sharded experiment (scheduler.graph) stores its resolved shard count ("auto": the
            # estimate's, from the size and the jobs the provider runs at once; 1 where its jobs
            # could not pass files through the store); 1 runs it as one job.
            parallel = await self._parallel_jobs(parsed, route)
            shards = shard_count(
                parsed.influence.shards, training_count(parsed), parsed.hyperparams.batch_size, parallel
            )
            if shards > 1 and not self._shards_reach_the_store(route):
                raise SpecError(self._unshardable(route))
            parsed.influence.shards = shards
            spec = parsed.model_dump(mode="json")
            try:
                check_model_id(spec["model_id"], route.hosted, self._settings.model_dir_roots)
            except ModelNotAllowed as exc:
                raise SpecError(str(exc)) from None
        # Raises ProviderNotConfigured before anything is stored: nothing could run the job.
        self._providers.client(route.provider)
        card = None
        if route.hosted and sized_from_hub(parsed.model_id):
            try:
                card = await self._hub_models.card(parsed.model_id)
            except HubModelUnknown as exc:
                raise SpecError(str(exc)) from None
        estimate = admission_estimate(
            parsed,
            route,
            kind,
            json.dumps(request).encode() if request is not None else b"",
            card,
            parallel,
        )

        check_spend_cap(max_cost_usd, estimate[1])
        if kind == MERGE and request is not None and uploads_directly(route.provider, self.artifacts.store):
            params_b = (card or cost_model.lookup_model(parsed.model_id)).params_b
            self._check_merge_uploads(parsed.model_id, params_b, float(request["shard_size_mb"]))

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
            max_cost_usd=max_cost_usd,
            trace_context=trace_carrier(),
            shards=shards,
        )
        if created:
            log.info("job queued", extra={"job_id": job.id, "provider": route.provider})
            self._queued.set()
        return job

    async def _with_datasets(self, user_id: str, spec_json: bytes) -> bytes:
        """The spec with the records of the stored datasets it names (the user's own only)."""
        try:
            return await attach_to_spec(self.datasets, user_id, spec_json)
        except DatasetReferenceError as exc:
            raise SpecError(f"invalid experiment spec: {exc}") from None

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
        spec = await self._spec_of(parent.id, user_id)
        parent_spec = parse_spec(spec, NO_SIZE_LIMITS)
        if parent_spec.stored_datasets:
            # Its workers read the spec's inline examples (gpu_core.query, .counterfactual, .curation).
            raise JobInputError(
                f"parent_job_id: a {later_kind.name} job of an experiment on a stored dataset is not "
                "supported yet"
            )
        if later_kind.check is not None:
            later_kind.check(request, parent_spec, parse_result(found[1]))
        return parent, request.model_dump(mode="json")

    # ---- leases -------------------------------------------------------------------------

    async def resume_all(self) -> int:
        """Claim the active jobs no live replica holds and hand them to the dispatcher or the
        follower; from then on a lease loop renews this replica's leases and claims new jobs and
        jobs whose replica died."""
        claimed = await self._claim()
        if self._lease_task is None:
            self._lease_task = asyncio.create_task(self._lease_loop(), name="scheduler-leases")
        return claimed

    async def _claim(self, takeovers: bool = True) -> int:
        """Claim queued jobs for the dispatcher's free slots and, with ``takeovers``, submitted
        jobs whose replica died (or that were never followed) for the follower."""
        claimed = 0
        free = self.dispatcher.free()
        if free:
            for job in await self._store.claim_jobs(self._lease, free, submitted=False):
                self.dispatcher.dispatch(job.id, job.provider)
                claimed += 1
        if not takeovers:
            return claimed
        for job in await self._store.claim_jobs(self._lease, _CLAIM_BATCH, submitted=True):
            log.info("job claimed", extra={"job_id": job.id, "replica": self._lease.owner})
            self.follower.follow(job.id, job.provider)
            claimed += 1
        return claimed

    async def _lease_loop(self) -> None:
        interval = self._lease.seconds / 3
        renewed_at = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queued.wait(), interval)
            self._queued.clear()
            try:
                # A wake-up (a job stored here, a dispatch slot freed) claims queued jobs only, and
                # none while every slot is busy: under a burst of submits the takeover scan and
                # full-slot claims would otherwise run back to back, one per submit.
                due = time.monotonic() - renewed_at >= interval
                if due:
                    held = self.dispatcher.held | self.follower.held
                    kept = await self._store.renew_leases(self._lease, list(held))
                    renewed_at = time.monotonic()
                    for job_id in held - kept:
                        # Another replica took it over (this one stalled past its lease), or it
                        # ended: stop following; a submit in flight finds its write refused.
                        self.follower.drop(job_id)
                await self._claim(takeovers=due)
            except DB_ERRORS as exc:
                log.warning("leases not renewed; database unavailable", extra={"error": str(exc)})

    # ---- other operations ---------------------------------------------------------------

    async def cancel(
        self,
        user_id: str,
        job_id: str,
        reason: str = "cancelled by the user",
        actual: ActualCost | None = None,
    ) -> JobRow:
        """Cancel at the provider first (on the endpoint the job was submitted on), then store
        it with ``reason`` (and ``actual``, the cost the scheduler measured, when it did). A job
        still being submitted is cancelled by its dispatcher once the provider answers."""
        job = await self._store.get_job(job_id, user_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.terminal:
            return job
        if job.is_graph:
            return await self._cancel_graph(user_id, job)
        if job.provider_job_id:
            route = Route(backend=job.compute_backend, provider=job.provider)  # type: ignore[arg-type]
            account = route.account(user_id, job.endpoint_id)
            try:
                await self._providers.client(route.provider).cancel(job.id, job.provider_job_id, account)
            except ProviderError as exc:
                if exc.code != "NOT_FOUND":
                    raise
        updated = await self._store.apply(
            job.id, JobUpdate(status="cancelled", error=reason, stage_message="cancelled", actual=actual)
        )
        self.follower.drop(job.id)
        return updated or await self._reload(job.id)

    async def _cancel_graph(self, user_id: str, job: JobRow) -> JobRow:
        """A sharded experiment: stored cancelled first (so that no step creates a part any more),
        then every active part is cancelled at its provider."""
        updated = await self._store.apply(
            job.id, JobUpdate(status="cancelled", error="cancelled by the user", stage_message="cancelled")
        )
        self.follower.drop(job.id)
        for part in await self._store.active_jobs(user_id, graph_job_id=job.id):
            await self.cancel(user_id, part.id)
        return updated or await self._reload(job.id)

    async def delete(self, user_id: str, job_id: str) -> int:
        """Cancel the job (and, for an experiment, its active later jobs) at the provider if it
        is still running, then remove its artifacts and the job itself; returns how many
        artifacts were removed. A store failure leaves the job in place. Usage stays counted."""
        job = await self._store.get_job(job_id, user_id)
        if job is None:
            raise JobNotFound(job_id)
        for later in await self._store.active_jobs(user_id, parent_job_id=job.id):
            await self.cancel(user_id, later.id)
        if not job.terminal:
            await self.cancel(user_id, job_id)
        removed = await self.artifacts.store.delete_prefix(job_prefix(job.id))
        parts = [part for part, _ in await self._store.graph_parts(job.id)]
        for part in parts:
            # A sharded experiment's parts go with it (their rows by the foreign key).
            removed += await self.artifacts.store.delete_prefix(job_prefix(part.id))
        if uploads_directly(job.provider, self.artifacts.store):
            spec = await self._store.get_spec(job.id) if job.kind in WRITES_ARTIFACTS else None
            for dead in (job, *parts):
                await occupy_upload_names(self.artifacts.store, dead.id, spec, dead.kind, dead.request)
        await self._store.delete_job(job.id)
        self.follower.drop(job.id)
        log.info("job deleted", extra={"job_id": job.id, "artifacts": removed})
        return removed

    def _check_merge_uploads(self, model_id: str, params_b: float, shard_size_mb: float) -> None:
        """Refuse, before any GPU time, a merge whose files the store would refuse at upload time:
        a safetensors shard over the largest file (one PUT, at most 5 GiB) or merged weights
        (16-bit) over the per-job total."""
        max_file, max_job = (
            self._settings.scheduler_upload_max_file_bytes,
            self._settings.scheduler_upload_max_job_bytes,
        )
        if shard_size_mb * 1e6 > max_file:
            raise SpecError(
                f"request.shard_size_mb: {shard_size_mb:g} MB shards are over the largest file this "
                f"dashboard takes ({max_file / 1e6:,.0f} MB, SCHEDULER_UPLOAD_MAX_FILE_BYTES); "
                "ask for smaller shards"
            )
        weights_bytes = params_b * 2e9
        if weights_bytes > max_job:
            raise SpecError(
                f"a merge of {model_id} writes about {weights_bytes / 1e9:,.1f} GB of 16-bit weights, over "
                f"this dashboard's {max_job / 1e9:,.1f} GB of files per job "
                "(SCHEDULER_UPLOAD_MAX_JOB_BYTES; its operator can raise it)"
            )

    async def _parallel_jobs(self, spec: schemas.ExperimentSpec, route: Route) -> int:
        """How many jobs at once an "auto" sharded experiment is counted for: the provider's own
        figure (its Estimate's parallel_jobs: a RunPod endpoint's workers, compute-local's
        devices), asked only for "auto"; 1 where the parts could not pass files through the store.
        A provider that does not answer raises ProviderError (naming it)."""
        if spec.influence.shards != "auto" or not self._shards_reach_the_store(route):
            return 1
        answer = await self._providers.client(route.provider).estimate(
            json.dumps(spec.model_dump(mode="json")).encode(), route.backend
        )
        return answer.parallel_jobs or DEFAULT_PARALLEL_JOBS[route.provider]

    @staticmethod
    def _unshardable(route: Route) -> str:
        return (
            f"influence.shards: a sharded experiment on {route.provider} passes its files "
            f"between its jobs through the artifact store, which {route.provider}'s workers "
            "cannot reach on this dashboard (its operator must set ARTIFACT_STORE_URL to an "
            'S3-compatible bucket with its keys); set influence.shards to 1 or "auto"'
        )

    def _shards_reach_the_store(self, route: Route) -> bool:
        """Whether a sharded experiment's parts can hand their files to each other (the shards
        download the training job's, the merge the shards'): compute-local reads the store on
        this host; RunPod's and Modal's workers only through URLs the scheduler signs
        (scheduler.uploads.uploads_directly)."""
        return route.provider not in DIRECT_UPLOAD_PROVIDERS or uploads_directly(
            route.provider, self.artifacts.store
        )

    async def active_jobs(self, user_id: str, backend: str) -> list[JobRow]:
        """The user's jobs on ``backend`` that have not ended (every kind)."""
        return await self._store.active_jobs(user_id, backend=backend)

    async def _spec_of(self, job_id: str, user_id: str) -> dict[str, Any]:
        """The stored spec of the user's job (read only where a job is built on it)."""
        spec = await self._store.get_spec(job_id, user_id)
        if spec is None:
            raise JobNotFound(job_id)
        return dict(spec)

    async def _reload(self, job_id: str) -> JobRow:
        job = await self._store.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

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

    async def sweep_orphaned_uploads(self, now: datetime | None = None) -> int:
        """Remove what no job lists from the store (scheduler.uploads.sweep_orphans)."""
        return await sweep_orphans(
            self.artifacts.store,
            self._store.artifact_owners,
            self._settings.scheduler_upload_url_ttl_s + self._settings.scheduler_claim_margin_s,
            now,
        )

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
        if submittable_kind(kind).needs_parent:
            return await self._estimate_later(user_id, kind, parent_job_id, request_json)
        spec = validate_spec(await self._with_datasets(user_id, spec_json))
        normalised = json.dumps(spec).encode()
        active = (await self._store.get_profile(user_id)).compute_backend
        estimates: list[common_pb2.Estimate] = []
        notes: list[str] = []
        for backend in (active, *(b for b in BACKENDS if b != active)):
            route = route_for(backend, self._settings)
            if not self._providers.configured(route.provider):
                notes.append(f"{backend}: the {route.provider} provider is not configured here")
                continue
            asked = normalised
            shards = (spec.get("influence") or {}).get("shards", 1)
            if shards != 1 and not self._shards_reach_the_store(route):
                # Submit runs it as one job ("auto") or refuses it: no estimate of N shards.
                if shards != "auto":
                    notes.append(f"{backend}: {self._unshardable(route)}")
                    continue
                asked = json.dumps({**spec, "influence": {**spec["influence"], "shards": 1}}).encode()
            try:
                estimate = await self._providers.client(route.provider).estimate(asked, backend)
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
                json.dumps(await self._spec_of(parent.id, user_id)).encode(),
                backend,
                job_kind(kind).name,
                json.dumps(request).encode(),
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
        async with self._store.connection() as conn:
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

    async def runpod_endpoint(self, user_id: str, key_stored: bool) -> common_pb2.EndpointInfo:
        """The user's own RunPod endpoint as RunPod reports it now. Without a stored key nothing
        can be looked at: the stored id is reported with state "unknown". One RunPod no longer
        has (deleted in its console) is forgotten, so that nothing calls it ready and the next
        job creates a new one."""
        if not self._providers.configured("runpod"):
            return common_pb2.EndpointInfo(
                unavailable_reason="RunPod is not set up on this server (COMPUTE_RUNPOD_ADDR is empty)",
                state="none",
            )
        stored = (await self._store.get_profile(user_id)).runpod_endpoint_id
        client = self._providers.client("runpod")
        account = common_pb2.Account(user_id=user_id, endpoint_id=stored if key_stored else "")
        info = await client.describe_endpoint(account)
        if stored and not key_stored:
            info.state, info.endpoint_id = "unknown", stored
        if info.state == "gone":
            log.info("runpod endpoint deleted outside the dashboard; forgotten", extra={"user_id": user_id})
            await self._store.set_endpoint(user_id, "", "none")
        return info

    async def delete_runpod_endpoint(self, user_id: str) -> common_pb2.EndpointInfo:
        """Delete the user's RunPod endpoint on their account and forget it (the next job on
        RunPod creates a new one). The caller has dealt with the jobs still running there."""
        stored = (await self._store.get_profile(user_id)).runpod_endpoint_id
        client = self._providers.client("runpod")
        info = await client.delete_endpoint(common_pb2.Account(user_id=user_id, endpoint_id=stored))
        await self._store.set_endpoint(user_id, "", "none")
        log.info("runpod endpoint deleted", extra={"user_id": user_id, "had_endpoint": bool(stored)})
        return info

    async def close(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            await asyncio.gather(self._lease_task, return_exceptions=True)
            self._lease_task = None
        await self.dispatcher.close()
        await self.follower.close()
        try:
            # Another replica takes these jobs over now rather than when the leases expire.
            await self._store.release_leases(self._lease.owner)
        except DB_ERRORS as exc:
            log.warning("leases not released; they expire instead", extra={"error": str(exc)})


def _without(message: str, secret: str) -> str:
    """``message`` with any copy of ``secret`` removed (a provider should never echo a key)."""
    return message.replace(secret, "[REDACTED]") if secret else message
