"""The dispatcher: submits each queued job to its provider exactly once.

Submitting a job (jobs.py) only inserts it; the replica that claims it (``FOR UPDATE SKIP
LOCKED``) dispatches it here, with at most ``scheduler_dispatch_concurrency`` submits in flight
per provider. Every step borrows a connection for one short statement and gives it back before
any network call: read, release, call, reacquire, write.

Exactly one provider job per job: before the call the submit token is stored under the lease (the
durable "submitting" state), and just before the provider call the time it is made
(submit_sent_at). A job found submitting (this replica's earlier attempt failed ambiguously, or
another replica died mid-call) is reconciled:
- RunPod with a store that signs URLs: RunPod cannot look a job up by our id, and compute-runpod
  answers UNKNOWN when its /run may have been accepted, so the job is never sent again while a
  worker may still run it. The worker's claim in the store (scheduler.artifacts
  read_worker_claim) names the RunPod job that runs it: the job adopts that id. With no claim
  once the call's upload URLs (the claim's among them) have expired plus a margin, no worker can
  ever run it (RunPod dropped it unrun at its ttl), and it is submitted again.
- Otherwise the same SubmitRequest is sent again: its job_id is the idempotency key the provider
  deduplicates on (compute-local by job id, compute-modal by a Dict put-if-absent), so it
  answers the job it already has.
The answer is stored only while the lease is still held and the token unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from artifact_store import StoreError
from gpu_core.jobs import EXPERIMENT, INDEX_SHARD, SHARD_MERGE, TRAINING, WRITES_ARTIFACTS
from gpu_core.schemas import NO_SIZE_LIMITS, parse_spec
from gpu_core.uploads import needed_shard_inputs
from influence.v1 import compute_pb2
from scheduler.artifacts import ArtifactMover, read_worker_claim
from scheduler.config import Settings
from scheduler.datasets import dataset_files
from scheduler.follower import DB_ERRORS, WAITING_STAGE, Follower
from scheduler.graph import Graph
from scheduler.providers import LaterJob, ProviderError, ProviderNotConfigured, Providers, Route
from scheduler.store import JobRow, JobUpdate, Lease, Store, SubmitWork
from scheduler.uploads import (
    part_downloads,
    presigned_parent_downloads,
    presigned_uploads,
    reads_parent_artifacts,
    uploads_directly,
)
from service_runtime.tracing import continued_trace

log = logging.getLogger(__name__)

# Answers to a RunPod Submit after which RunPod may hold the job: compute-runpod's UNKNOWN (its
# /run was accepted or not, it cannot tell) and our own call's deadline or cancellation.
_AMBIGUOUS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "CANCELLED"})


@dataclass(frozen=True)
class _Prepared:
    endpoint_id: str
    submit: Callable[[], Awaitable[str]]
    webhook_secret_sha256: bytes | None = None
    upload_secret_sha256: bytes | None = None


class Endpoints:
    """The user's RunPod serverless endpoint, created on first use. No connection or lock is held
    across PrepareAccount: the creation is claimed on the profile row (so replicas create one
    endpoint), and waiters re-read the profile."""

    def __init__(self, settings: Settings, store: Store, providers: Providers) -> None:
        self._settings = settings
        self._store = store
        self._providers = providers
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def ensure(self, route: Route, user_id: str, spec: dict[str, Any]) -> str:
        client = self._providers.client("runpod")
        model_id = str(spec.get("model_id", ""))
        quantization = str(spec.get("hyperparams", {}).get("quantization", "none"))
        # The job's pools, fixed in its spec at submit: chosen before any submit token exists.
        runpod_gpu = str(spec.get("runpod_gpu") or "")
        claim_s = 2 * self._settings.scheduler_provider_timeout_s
        deadline = time.monotonic() + claim_s
        async with self._locks[user_id]:
            while True:
                stored = (await self._store.get_profile(user_id)).runpod_endpoint_id
                if stored:
                    try:
                        prepared = await client.prepare_account(
                            route.account(user_id, stored), model_id, quantization, runpod_gpu
                        )
                    except ProviderError as exc:
                        if exc.code != "NOT_FOUND":
                            raise
                        log.info("stored endpoint is gone; creating a new one", extra={"user_id": user_id})
                        await self._store.set_endpoint(user_id, "", "none")
                        continue
                elif await self._store.claim_endpoint_creation(user_id, claim_s):
                    try:
                        prepared = await client.prepare_account(
                            route.account(user_id, ""), model_id, quantization, runpod_gpu
                        )
                    except ProviderError as exc:
                        await self._store.set_endpoint(
                            user_id, None, "none" if exc.retryable else "error", exc.message
                        )
                        raise
                else:
                    if time.monotonic() > deadline:
                        raise ProviderError(
                            "runpod", "UNAVAILABLE", "your RunPod endpoint is still being created", True
                        )
                    await asyncio.sleep(0.2)
                    continue
                if prepared.status == "error" or not prepared.endpoint_id:
                    message = "the RunPod endpoint could not be prepared on your account"
                    await self._store.set_endpoint(user_id, None, "error", message)
                    raise ProviderError("runpod", "FAILED_PRECONDITION", message, False)
                await self._store.set_endpoint(user_id, prepared.endpoint_id, prepared.status or "ready")
                if prepared.created:
                    log.info("runpod endpoint created", extra={"user_id": user_id})
                return prepared.endpoint_id


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: Providers,
        artifacts: ArtifactMover,
        lease: Lease,
        follower: Follower,
        graph: Graph,
        slot_freed: asyncio.Event | None = None,
    ) -> None:
        self._settings = settings
        self._graph = graph
        self._slot_freed = slot_freed
        self._store = store
        self._providers = providers
        self._artifacts = artifacts
        self._lease = lease
        self._follower = follower
        self._endpoints = Endpoints(settings, store, providers)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._awaiting_claim: set[str] = set()  # RunPod jobs whose submit answer was lost
        self._slots: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(settings.scheduler_dispatch_concurrency)
        )

    @property
    def held(self) -> set[str]:
        return set(self._tasks)

    def free(self) -> int:
        """How many more queued jobs this replica should claim: twice its submit slots, so a
        replica never hoards the queue while another idles. A job waiting for its worker's claim
        (possibly for hours) makes no submit and does not count."""
        busy = len(self._tasks.keys() - self._awaiting_claim)
        return max(0, 2 * self._settings.scheduler_dispatch_concurrency - busy)

    def dispatch(self, job_id: str, provider: str) -> None:
        if job_id in self._tasks:
            return
        task = asyncio.create_task(self._run(job_id, provider), name=f"dispatch-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._forget(job_id))

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._awaiting_claim.discard(job_id)
        if self._slot_freed is not None:
            self._slot_freed.set()

    async def close(self) -> None:
        # A submit cut off here stays "submitting": whoever claims the job next reconciles it.
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _run(self, job_id: str, provider: str) -> None:
        delay = self._settings.scheduler_poll_interval_s
        while True:
            async with self._slots[provider]:
                done = await self._attempt(job_id)
            if done:
                return
            # Waits outside the slot: a provider that is down does not block the others' submits.
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._settings.scheduler_retry_max_s)

    def _claims(self, provider: str) -> bool:
        """Whether a lost submit answer is reconciled through the worker's claim in the store:
        RunPod (which cannot look a job up by our id) with a store that mints upload URLs."""
        return provider == "runpod" and uploads_directly(provider, self._artifacts.store)

    async def _attempt(self, job_id: str) -> bool:
        """One submit attempt; False when it should be tried again."""
        try:
            work = await self._store.begin_submit(job_id, self._lease)
        except DB_ERRORS as exc:
            log.warning("database unavailable; submit deferred", extra={"job_id": job_id, "error": str(exc)})
            return False
        if work is None:
            return True  # cancelled, already submitted, or the lease went to another replica
        job = work.job
        if job.is_graph:
            return await self._start_graph(work)
        if work.reconciling:
            log.warning(
                "reconciling a submit whose outcome is unknown, under the same job id",
                extra={"job_id": job.id, "provider": job.provider, "attempt": job.submit_attempts},
            )
            if self._claims(job.provider):
                adopted = await self._reconcile_by_claim(work)
                if adopted is not None:
                    return adopted
        sent = False
        try:
            with continued_trace(job.trace_context):
                prepared = await self._prepare(work)
                if not await self._store.mark_sent(
                    job.id,
                    self._lease,
                    work.token,
                    prepared.endpoint_id,
                    prepared.webhook_secret_sha256,
                    prepared.upload_secret_sha256,
                ):
                    return True  # the lease went to another replica, which reconciles it
                sent = True
                provider_job_id = await prepared.submit()
        except ProviderNotConfigured as exc:
            return await self._fail(job, str(exc))
        except ProviderError as exc:
            if sent and exc.code in _AMBIGUOUS and job.provider == "runpod":
                return await self._after_lost_answer(job, exc)
            if not exc.retryable:
                return await self._fail(job, exc.message)
            log.warning("submit deferred", extra={"job_id": job.id, "code": exc.code, "error": exc.message})
            await self._note(job, f"{exc.message}; the scheduler will retry automatically")
            return False
        except (StoreError, *DB_ERRORS) as exc:
            log.warning("submit deferred", extra={"job_id": job.id, "error": str(exc)})
            return False
        return await self._record(work, provider_job_id, prepared.endpoint_id)

    async def _start_graph(self, work: SubmitWork) -> bool:
        """A sharded experiment goes to no provider: its graph stores its first part (scheduler.graph)
        and the follower steps it from then on."""
        try:
            started = await self._graph.start(work)
        except (StoreError, *DB_ERRORS) as exc:
            log.warning(
                "sharded experiment not started yet", extra={"job_id": work.job.id, "error": str(exc)}
            )
            return False
        if started:
            log.info("sharded experiment started", extra={"job_id": work.job.id, "shards": work.job.shards})
            self._follower.follow(work.job.id, work.job.provider)
        return True

    async def _record(self, work: SubmitWork, provider_job_id: str, endpoint_id: str) -> bool:
        """Store the provider job id (fenced by the lease and the submit token) and follow it."""
        job = work.job
        try:
            updated = await self._store.apply(
                job.id,
                JobUpdate(
                    status="submitted",
                    stage=WAITING_STAGE,
                    stage_message=f"submitted to {job.provider}; waiting for a worker",
                    provider_job_id=provider_job_id,
                    endpoint_id=endpoint_id,
                ),
                lease=self._lease,
                submit_token=work.token,
            )
        except DB_ERRORS as exc:
            # The provider has the job; the next attempt reconciles it under the same job id.
            log.warning("submitted job not recorded yet", extra={"job_id": job.id, "error": str(exc)})
            return False
        if updated is None:
            await self._after_lost_write(job, provider_job_id, endpoint_id)
            return True
        log.info("job submitted", extra={"job_id": job.id, "provider_job_id": provider_job_id})
        self._follower.follow(job.id, job.provider)
        return True

    async def _after_lost_answer(self, job: JobRow, exc: ProviderError) -> bool:
        """RunPod may have accepted the job but its answer was lost. Sending it again could run
        (and bill) it twice, so the job stays submitting and the next attempts wait for the
        worker's claim; without a store to hold claims the job fails in plain words instead."""
        if not self._claims(job.provider):
            if exc.retryable:
                # Our own call's deadline: compute-runpod answers the same job id with the job it
                # already sent (its submit lock), as before claims existed.
                await self._note(job, f"{exc.message}; the scheduler will retry automatically")
                return False
            return await self._fail(
                job,
                f"RunPod may have received this job, but its answer was lost ({exc.message}); "
                "without an artifact store that signs URLs the scheduler cannot tell whether it "
                "runs, so it was not sent again: check your RunPod console before resubmitting",
            )
        self._awaiting_claim.add(job.id)
        log.warning(
            "runpod submit answer lost; waiting for the worker's claim",
            extra={"job_id": job.id, "code": exc.code, "error": exc.message},
        )
        await self._note(
            job,
            "RunPod may have received this job but its answer was lost; it is not sent again: "
            "the scheduler waits for RunPod's worker to claim it",
        )
        return False

    async def _reconcile_by_claim(self, work: SubmitWork) -> bool | None:
        """A RunPod job found submitting: adopt the provider job its worker claimed (True); wait
        (False) while a worker may still claim it; None when sending it is safe: its call was
        never made, or no claim appeared before the call's upload URLs expired."""
        job = work.job
        wait_s = self._settings.scheduler_upload_url_ttl_s + self._settings.scheduler_claim_margin_s
        try:
            # The wait is read before the claim: a claim written after this read must have been
            # written before the URLs expired, so "over and no claim" means never.
            wait_over = await self._store.claim_wait_over(job.id, wait_s)
            claim = await read_worker_claim(self._artifacts.store, job.id)
        except (StoreError, *DB_ERRORS) as exc:
            log.warning("could not read the worker's claim yet", extra={"job_id": job.id, "error": str(exc)})
            return False
        if claim is not None:
            log.info(
                "submit reconciled through the worker's claim",
                extra={"job_id": job.id, "provider_job_id": claim.provider_job_id},
            )
            return await self._record(work, claim.provider_job_id, job.endpoint_id)
        if wait_over is None:
            return None  # the earlier attempt died before its provider call
        if not wait_over:
            self._awaiting_claim.add(job.id)
            return False
        self._awaiting_claim.discard(job.id)
        # No worker claimed it and none can any more (its claim URL has expired): RunPod dropped
        # it unrun at its ttl (kept within the URLs' life by compute-runpod), so nothing ran or
        # was billed and submitting it again, with fresh URLs, is safe.
        log.warning(
            "no worker claimed a lost submit before its URLs expired; sending it again",
            extra={"job_id": job.id},
        )
        return None

    async def _prepare(self, work: SubmitWork) -> _Prepared:
        """Everything the provider needs for Submit; no connection is held during any call."""
        job, spec = work.job, work.spec
        route = Route(backend=job.compute_backend, provider=job.provider)  # type: ignore[arg-type]
        client = self._providers.client(route.provider)
        spec_json = json.dumps(spec).encode()
        later = await self._later_payload(job)
        estimated_time_s, estimated_cost_usd = job.estimated_time_s, job.estimated_cost_usd
        # Also when an earlier attempt failed before the provider's estimate was stored (its GPU
        # and price): the actual cost is priced at them.
        if job.submit_attempts == 1 or estimated_time_s == 0 or job.estimated_usd_per_second <= 0:
            estimate = await client.estimate(
                spec_json, route.backend, later.kind if later else "", later.request_json if later else b""
            )
            estimated_time_s, estimated_cost_usd = estimate.estimated_time_s, estimate.estimated_cost_usd
            await self._store.set_estimate(
                job.id,
                self._lease,
                estimated_time_s,
                estimated_cost_usd,
                estimate.gpu,
                estimate.usd_per_second,
            )
        if 0 < job.max_cost_usd < estimated_cost_usd:
            # The provider's estimate (its own GPU and prices) can exceed the admission one.
            raise ProviderError(
                job.provider,
                "FAILED_PRECONDITION",
                f"Not submitted: the {job.provider} estimate is ${estimated_cost_usd:.4f}, over your "
                f"spend cap of ${job.max_cost_usd:.4f}",
                False,
            )
        endpoint_id = await self._endpoints.ensure(route, job.user_id, spec) if route.needs_endpoint else ""
        uploads: list[compute_pb2.ArtifactUpload] = []
        upload_secret_sha256: bytes | None = None
        # Experiments, merges and a sharded experiment's parts write files; another later job (a
        # query, a counterfactual check) returns JSON, but on RunPod its worker still claims the
        # job id and keeps its result in the store (the records a lost answer and RunPod's
        # retention are reconciled with).
        writes_files = job.kind in WRITES_ARTIFACTS and uploads_directly(
            route.provider, self._artifacts.store
        )
        if writes_files or self._claims(route.provider):
            grant_url, upload_secret_sha256 = self._upload_route(job.id)
            uploads = await presigned_uploads(
                self._artifacts.store,
                job.id,
                spec if writes_files else None,
                self._settings.scheduler_upload_url_ttl_s,
                job.kind if writes_files else EXPERIMENT,
                grant_url,
                job.request if writes_files else None,
            )
        # The stored datasets the spec names, for a later job of the experiment too: the worker
        # reads its examples from them.
        datasets = await dataset_files(
            self._artifacts.store, parse_spec(spec, NO_SIZE_LIMITS), self._settings.scheduler_upload_url_ttl_s
        )
        webhook_url, webhook_secret_sha256 = self._webhook(job.id, route.provider)
        return _Prepared(
            endpoint_id,
            functools.partial(
                client.submit,
                job.id,
                route.account(job.user_id, endpoint_id),
                spec_json,
                estimated_cost_usd,
                estimated_time_s,
                later,
                uploads,
                datasets,
                webhook_url,
            ),
            webhook_secret_sha256,
            upload_secret_sha256,
        )

    def _upload_route(self, job_id: str) -> tuple[str, bytes | None]:
        """The job's upload route, where its worker asks for each file's URL of that file's size
        (scheduler.uploads), with a fresh per-job secret (only its hash is stored, by mark_sent),
        where the deployment is reachable; ("", None): URLs minted now, not bounded in size."""
        base = self._settings.scheduler_webhook_base_url
        if not base:
            return "", None
        secret = secrets.token_urlsafe(32)
        return f"{base}/api/uploads/{job_id}/{secret}", hashlib.sha256(secret.encode()).digest()

    def _webhook(self, job_id: str, provider: str) -> tuple[str, bytes | None]:
        """RunPod's webhook URL for this submit, with a fresh per-job secret (only its hash is
        stored, by mark_sent), where the deployment is reachable; ("", None): polling only."""
        base = self._settings.scheduler_webhook_base_url
        if provider != "runpod" or not base:
            return "", None
        secret = secrets.token_urlsafe(32)
        return f"{base}/api/webhooks/runpod/{job_id}/{secret}", hashlib.sha256(secret.encode()).digest()

    async def _later_payload(self, job: JobRow) -> LaterJob | None:
        """For a later job, its request and its experiment's result as a provider receives them."""
        if job.kind == EXPERIMENT:
            return None
        if job.graph_job_id:
            return await self._part_payload(job)
        found = await self._store.get_result(job.parent_job_id, job.user_id)
        parent_result = found[1] if found is not None else None
        downloads: list[compute_pb2.ParentArtifact] = []
        if reads_parent_artifacts(job.kind):
            parent = await self._store.get_job(job.parent_job_id, job.user_id)
            downloads = await presigned_parent_downloads(
                self._artifacts.store,
                job.parent_job_id,
                parent.artifacts if parent is not None else [],
                parent_result,
                self._settings.scheduler_upload_url_ttl_s,
                job.kind,
                local_paths=job.provider == "local",
            )
        return LaterJob(
            kind=job.kind,
            request_json=json.dumps(job.request or {}).encode(),
            parent_result_json=json.dumps(parent_result).encode(),
            parent_job_id=job.parent_job_id,
            parent_artifacts=tuple(downloads),
        )

    async def _part_payload(self, job: JobRow) -> LaterJob:
        """A sharded experiment's part: its request, the training job's result (an index shard's and
        the merge's parent) and GETs of the files it reads: the training job's adapter and
        checkpoints (an index shard), every shard's columns and index manifests (the merge)."""
        if job.kind == TRAINING:
            return LaterJob(kind=job.kind, request_json=b"{}", parent_result_json=b"null")
        training = await self._store.get_job(job.parent_job_id, job.user_id)
        found = await self._store.get_result(job.parent_job_id, job.user_id)
        if training is None or found is None or found[1] is None:
            raise ProviderError(
                job.provider, "FAILED_PRECONDITION", "the training job's result is gone", False
            )
        sources: list[JobRow] = [training]
        if job.kind == SHARD_MERGE:
            parts = await self._store.graph_parts(job.graph_job_id)
            sources = [row for row, _ in parts if row.kind == INDEX_SHARD and row.status == "completed"]
        files: list[tuple[str, dict[str, Any]]] = []
        for source in sources:
            wanted = set(needed_shard_inputs(job.kind, [entry["name"] for entry in source.artifacts]))
            files.extend((source.id, entry) for entry in source.artifacts if entry["name"] in wanted)
        downloads = await part_downloads(
            self._artifacts.store, files, self._settings.scheduler_upload_url_ttl_s
        )
        return LaterJob(
            kind=job.kind,
            request_json=json.dumps(job.request or {}).encode(),
            parent_result_json=json.dumps(found[1]).encode(),
            parent_job_id=job.parent_job_id,
            parent_artifacts=tuple(downloads),
        )

    async def _after_lost_write(self, job: JobRow, provider_job_id: str, endpoint_id: str) -> None:
        """The provider took the job but the row would not take its id: cancelled meanwhile (then
        cancel it at the provider too), or the lease was lost (the new holder reconciles it)."""
        current = await self._store.get_job(job.id)
        if current is None or current.status == "cancelled":
            route = Route(backend=job.compute_backend, provider=job.provider)  # type: ignore[arg-type]
            try:
                await self._providers.client(route.provider).cancel(
                    job.id, provider_job_id, route.account(job.user_id, endpoint_id)
                )
            except ProviderError as exc:
                log.warning(
                    "could not cancel a job submitted while it was cancelled",
                    extra={"job_id": job.id, "code": exc.code, "error": exc.message},
                )

    async def _fail(self, job: JobRow, message: str) -> bool:
        """Fail the job with the provider's words; False when the database did not take it."""
        try:
            await self._store.apply(
                job.id, JobUpdate(status="failed", error=message, stage_message=message), lease=self._lease
            )
        except DB_ERRORS as exc:
            log.warning("could not fail the job yet", extra={"job_id": job.id, "error": str(exc)})
            return False
        return True

    async def _note(self, job: JobRow, message: str) -> None:
        try:
            await self._store.apply(job.id, JobUpdate(stage_message=message), lease=self._lease)
        except DB_ERRORS:
            pass  # only a message; the attempt is retried either way
