"""The Scheduler gRPC service and the factory that runs it (usable from tests on port 0).

Start-up never blocks on the database: the server answers at once (readiness NOT_SERVING, RPCs
UNAVAILABLE) while a background task connects, migrates, opens the LISTEN connection and
resumes every non-terminal job; then readiness goes SERVING. A health loop flips it back to
NOT_SERVING whenever the database stops answering.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any, NoReturn, TypeVar

import asyncpg
import grpc

from artifact_store import (
    ArtifactNotFound,
    ArtifactStore,
    StoreError,
    StoreSettings,
    job_key,
    load_store_settings,
    open_store,
)
from gpu_core.jobs import JobInputError
from gpu_core.schemas import SpecError as LabelsInvalid
from gpu_core.schemas import parse_labels
from influence.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler import datasets
from scheduler.admission import AdmissionRefused, JobTooLarge, Usage
from scheduler.artifacts import ArtifactMover
from scheduler.config import Settings
from scheduler.datasets import DatasetInUse, DatasetNotFound, DatasetUploadError
from scheduler.db import apply_migrations, create_pool
from scheduler.experiments import ExperimentCatalog, JobFacts, ListFilters
from scheduler.jobs import (
    BACKENDS,
    JobManager,
    JobNotFound,
    ParentNotCompleted,
    SpecError,
)
from scheduler.metrics import record_job_counts
from scheduler.notify import EventHub
from scheduler.providers import ProviderError, ProviderNotConfigured, Providers
from scheduler.store import JobRow, Store, StoredEvent
from scheduler.tracking import TrackingExporter, checked_tracking_settings
from scheduler.uploads import UploadLimits, UploadRefused, grant_upload
from service_runtime.callers import caller_tokens_of
from service_runtime.grpc_server import GrpcService, create_grpc_server
from service_runtime.jobs import event_message, is_terminal_event, job_state, timestamp
from service_runtime.keyvault import KeyVaultReader
from service_runtime.lifecycle import Readiness, run_service
from service_runtime.metrics import MetricsServer, start_metrics_server

log = logging.getLogger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
_DB_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# Trailing metadata naming the component behind an UNAVAILABLE answer when it is not the
# scheduler itself (a compute provider, the database).
FAILED_COMPONENT_KEY = "x-failed-component"
# Trailing metadata of a RESOURCE_EXHAUSTED refusal: seconds until a retry can succeed.
RETRY_AFTER_KEY = "retry-after-s"
_DEFAULT_LIST_LIMIT = 50
_MAX_LIST_LIMIT = 500
# The longest one step of stop may take (SchedulerServer._bounded).
STOP_STEP_S = 15.0
_R = TypeVar("_R")


class NotReady(Exception):
    """The database has not been reached yet."""


class ArtifactMissing(LookupError):
    """The job has no artifact of that name."""


def job_to_proto(job: JobRow, facts: JobFacts | None = None) -> scheduler_pb2.Job:
    message = scheduler_pb2.Job(
        id=job.id,
        user_id=job.user_id,
        compute_backend=job.compute_backend,
        provider=job.provider,
        provider_job_id=job.provider_job_id,
        state=job_state(job.status),
        stage=job.stage,
        progress=job.progress,
        stage_message=job.stage_message,
        latest_metrics_json=json.dumps(job.latest_metrics).encode(),
        error=job.error,
        estimated_time_s=job.estimated_time_s,
        estimated_cost_usd=job.estimated_cost_usd,
        model_id=job.model_id,
        influence_method=job.influence_method,
        n_train=job.n_train,
        n_eval=job.n_eval,
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        finished_at=timestamp(job.finished_at),
        last_seq=job.last_seq,
        kind=job.kind,
        parent_job_id=job.parent_job_id,
        request_json=json.dumps(job.request).encode() if job.request is not None else b"",
        name=job.name,
        tags=job.tags,
        note=job.note,
        actual=common_pb2.JobCost(**asdict(job.actual)) if job.actual is not None else None,
        estimated_gpu=job.estimated_gpu,
        estimated_usd_per_second=job.estimated_usd_per_second,
        max_cost_usd=job.max_cost_usd,
        shards=job.shards,
        parts=[part_to_proto(part) for part in job.parts],
    )
    if facts is not None:
        started = timestamp(facts.started_at)
        if started is not None:
            message.started_at.CopyFrom(started)
        if facts.outcome:
            message.outcome_json = json.dumps(facts.outcome).encode()
        if facts.tracking:
            message.tracking_json = json.dumps(facts.tracking).encode()
    return message


def part_to_proto(part: dict[str, Any]) -> scheduler_pb2.JobPart:
    shard = part.get("shard")
    return scheduler_pb2.JobPart(
        kind=str(part.get("kind", "")),
        shard=int(shard) if shard is not None else -1,
        job_id=str(part.get("job_id", "")),
        status=str(part.get("status", "")),
        progress=float(part.get("progress", 0.0)),
        attempts=int(part.get("attempts", 0)),
        error=str(part.get("error", "")),
    )


def event_to_proto(stored: StoredEvent) -> common_pb2.ProgressEvent:
    return event_message(stored.event, stored.created_at, stored.seq)


async def _abort_for(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """Turn a known failure into the gRPC status the gateway maps for the researcher."""
    if isinstance(exc, (SpecError, JobInputError, JobTooLarge)):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, ParentNotCompleted):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, AdmissionRefused):
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            exc.message,
            trailing_metadata=((RETRY_AFTER_KEY, str(exc.retry_after_s)),),
        )
    if isinstance(exc, DatasetNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, "dataset not found")
    if isinstance(exc, DatasetUploadError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, DatasetInUse):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, JobNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, "job not found")
    if isinstance(exc, ArtifactMissing):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, ArtifactNotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, "the artifact is no longer in the artifact store")
    if isinstance(exc, StoreError):
        log.error("artifact store failed during an RPC", extra={"error": str(exc)})
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, ProviderNotConfigured):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, ProviderError):
        code = grpc.StatusCode.UNAVAILABLE if exc.retryable else grpc.StatusCode[exc.code]
        # The scheduler is up: the gateway names the component that failed, not the scheduler.
        await context.abort(
            code, exc.message, trailing_metadata=((FAILED_COMPONENT_KEY, f"compute-{exc.provider}"),)
        )
    if isinstance(exc, (NotReady, *_DB_ERRORS)):
        log.warning("database unavailable during an RPC", extra={"error": str(exc)})
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the scheduler's database is unreachable; try again shortly",
            trailing_metadata=((FAILED_COMPONENT_KEY, "scheduler-database"),),
        )
    raise exc


def _rpc(
    method: Callable[[SchedulerServicer, Any, grpc.aio.ServicerContext], Awaitable[_R]],
) -> Callable[[SchedulerServicer, Any, grpc.aio.ServicerContext], Awaitable[_R]]:
    @functools.wraps(method)
    async def wrapper(self: SchedulerServicer, request: Any, context: grpc.aio.ServicerContext) -> _R:
        if hasattr(request, "user_id") and not request.user_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is required")
        try:
            return await method(self, request, context)
        except _KNOWN_ERRORS as exc:
            await _abort_for(context, exc)

    return wrapper


# Never a secret's hash: what a webhook with no stored secret is compared with.
_NO_WEBHOOK = bytes(32)
_KNOWN_ERRORS = (
    SpecError,
    DatasetNotFound,
    DatasetUploadError,
    DatasetInUse,
    JobNotFound,
    ArtifactMissing,
    StoreError,
    ProviderNotConfigured,
    ProviderError,
    NotReady,
    JobInputError,
    ParentNotCompleted,
    JobTooLarge,
    AdmissionRefused,
    *_DB_ERRORS,
)


def _artifact_proto(entry: dict[str, Any]) -> common_pb2.Artifact:
    return common_pb2.Artifact(
        name=entry["name"], bytes=entry["bytes"], sha256=entry["sha256"], media_type=entry["media_type"]
    )


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, app: SchedulerServer) -> None:
        self._app = app
        # Open WatchJob streams per user: each holds a listener subscription and reads per wake-up.
        self._watches: dict[str, int] = {}

    @_rpc
    async def SubmitJob(self, request: scheduler_pb2.SubmitJobRequest, context: Any) -> scheduler_pb2.Job:
        jobs, _ = self._app.require()
        job = await jobs.submit(
            request.user_id,
            request.spec_json,
            request.idempotency_key,
            request.kind,
            request.parent_job_id,
            request.request_json,
            request.max_cost_usd,
        )
        return job_to_proto(job)

    @_rpc
    async def GetJob(self, request: scheduler_pb2.GetJobRequest, context: Any) -> scheduler_pb2.Job:
        return (await self._with_facts([await self._owned_job(request)]))[0]

    async def _with_facts(self, jobs: list[JobRow]) -> list[scheduler_pb2.Job]:
        _, store = self._app.require()
        facts = await ExperimentCatalog(store.pool).facts([job.id for job in jobs])
        return [job_to_proto(job, facts.get(job.id)) for job in jobs]

    @_rpc
    async def ListJobs(
        self, request: scheduler_pb2.ListJobsRequest, context: Any
    ) -> scheduler_pb2.ListJobsResponse:
        _, store = self._app.require()
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must not be negative")
        limit = min(request.limit or _DEFAULT_LIST_LIMIT, _MAX_LIST_LIMIT)
        if request.parent_job_id:
            jobs = await store.list_jobs(request.user_id, limit, request.parent_job_id, request.kind)
        else:
            filters = ListFilters(
                tag=request.tag,
                model_id=request.model_id,
                influence_method=request.influence_method,
                status=request.status,
            )
            jobs = await ExperimentCatalog(store.pool).experiments(request.user_id, limit, filters)
        return scheduler_pb2.ListJobsResponse(jobs=await self._with_facts(jobs))

    @_rpc
    async def UpdateJobLabels(
        self, request: scheduler_pb2.UpdateJobLabelsRequest, context: Any
    ) -> scheduler_pb2.Job:
        _, store = self._app.require()
        labels: dict[str, Any] = {}
        if request.HasField("name"):
            labels["name"] = request.name or None
        if request.HasField("note"):
            labels["note"] = request.note or None
        if request.set_tags:
            labels["tags"] = list(request.tags)
        try:
            checked = parse_labels(labels)
        except LabelsInvalid as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "invalid labels: " + "; ".join(exc.problems)
            )
        job = await ExperimentCatalog(store.pool).update_labels(
            request.user_id, request.job_id, checked.model_dump(include=set(labels))
        )
        if job is None:
            raise JobNotFound(request.job_id)
        return (await self._with_facts([job]))[0]

    async def WatchJob(
        self, request: scheduler_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.ProgressEvent]:
        if not request.user_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is required")
        limit = self._app.settings.scheduler_max_watches_per_user
        open_now = self._watches.get(request.user_id, 0)
        if open_now >= limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"You have {open_now} progress streams open; the limit is {limit} per user "
                "(SCHEDULER_MAX_WATCHES_PER_USER)",
            )
        self._watches[request.user_id] = open_now + 1
        try:
            _, store = self._app.require()
            job = await store.get_job(request.job_id, request.user_id)
            if job is None:
                raise JobNotFound(request.job_id)
            hub = self._app.hub
            # Subscribed before the first read, so an event committed in between still wakes us.
            waiter = hub.subscribe(job.id)
            try:
                after_seq = request.after_seq
                while True:
                    # Read before clearing: a read another watcher began since then answers us too.
                    seen = hub.wakeups(job.id)
                    waiter.clear()
                    events = await hub.shared(
                        job.id,
                        ("events", after_seq),
                        seen,
                        functools.partial(store.events_after, job.id, after_seq),
                    )
                    for stored in events:
                        yield event_to_proto(stored)
                        after_seq = stored.seq
                        if is_terminal_event(stored.event):
                            return
                    if events:
                        continue
                    current = await hub.shared(job.id, "job", seen, functools.partial(store.get_job, job.id))
                    if current is None or (current.terminal and after_seq >= current.last_seq):
                        return
                    await waiter.wait()
            finally:
                hub.unsubscribe(job.id, waiter)
        except (JobNotFound, NotReady, *_DB_ERRORS) as exc:
            await _abort_for(context, exc)
        finally:
            left = self._watches[request.user_id] - 1
            if left:
                self._watches[request.user_id] = left
            else:
                del self._watches[request.user_id]

    # Same shape as GetJobSpec and the other owned-job reads: each RPC reads through its own
    # store call and builds its own response message; a shared wrapper would hide the
    # request/response types that grpc and mypy read.
    @_rpc
    async def GetJobResult(
        self, request: scheduler_pb2.GetJobResultRequest, context: Any
    ) -> scheduler_pb2.GetJobResultResponse:
        _, store = self._app.require()
        found = await store.get_result(request.job_id, request.user_id)
        if found is None:
            raise JobNotFound(request.job_id)
        status, result = found
        if status != "completed" or result is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the job is {status}; its result exists once it has completed",
            )
        return scheduler_pb2.GetJobResultResponse(result_json=json.dumps(result).encode())

    @_rpc
    async def GetJobSpec(
        self, request: scheduler_pb2.GetJobSpecRequest, context: Any
    ) -> scheduler_pb2.GetJobSpecResponse:
        _, store = self._app.require()
        spec = await store.get_spec(request.job_id, request.user_id)
        if spec is None:
            raise JobNotFound(request.job_id)
        return scheduler_pb2.GetJobSpecResponse(spec_json=json.dumps(spec).encode())

    @_rpc
    async def CancelJob(self, request: scheduler_pb2.CancelJobRequest, context: Any) -> scheduler_pb2.Job:
        jobs, _ = self._app.require()
        return job_to_proto(await jobs.cancel(request.user_id, request.job_id))

    @_rpc
    async def DeleteJob(
        self, request: scheduler_pb2.DeleteJobRequest, context: Any
    ) -> scheduler_pb2.DeleteJobResponse:
        jobs, _ = self._app.require()
        removed = await jobs.delete(request.user_id, request.job_id)
        return scheduler_pb2.DeleteJobResponse(deleted_artifacts=removed)

    @_rpc
    async def ListJobArtifacts(
        self, request: scheduler_pb2.ListJobArtifactsRequest, context: Any
    ) -> scheduler_pb2.ListJobArtifactsResponse:
        job = await self._owned_job(request)
        return scheduler_pb2.ListJobArtifactsResponse(artifacts=[_artifact_proto(e) for e in job.artifacts])

    async def _owned_job(self, request: Any) -> JobRow:
        """The request's job when it belongs to the request's user (else JobNotFound)."""
        _, store = self._app.require()
        job = await store.get_job(request.job_id, request.user_id)
        if job is None:
            raise JobNotFound(request.job_id)
        return job

    async def _artifact_of(self, request: scheduler_pb2.JobArtifactRequest) -> tuple[JobRow, dict[str, Any]]:
        job = await self._owned_job(request)
        for entry in job.artifacts:
            if entry["name"] == request.name:
                return job, entry
        raise ArtifactMissing(f"the job has no artifact {request.name!r}")

    @_rpc
    async def OpenJobArtifact(
        self, request: scheduler_pb2.JobArtifactRequest, context: Any
    ) -> scheduler_pb2.OpenJobArtifactResponse:
        job, entry = await self._artifact_of(request)
        artifacts = self._app.artifact_store
        url = ""
        if artifacts.supports_presign:
            url = await artifacts.presigned_url("GET", job_key(job.id, entry["name"]))
        return scheduler_pb2.OpenJobArtifactResponse(artifact=_artifact_proto(entry), download_url=url)

    async def ReadJobArtifact(
        self, request: scheduler_pb2.JobArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.ArtifactChunk]:
        if not request.user_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is required")
        try:
            job, entry = await self._artifact_of(request)
            chunks = await self._app.artifact_store.get(job_key(job.id, entry["name"]))
            async for chunk in chunks:
                yield common_pb2.ArtifactChunk(data=chunk)
        except _KNOWN_ERRORS as exc:
            await _abort_for(context, exc)

    @_rpc
    async def GetRunpodEndpoint(
        self, request: scheduler_pb2.RunpodEndpointRequest, context: Any
    ) -> common_pb2.EndpointInfo:
        jobs, _ = self._app.require()
        return await jobs.runpod_endpoint(request.user_id, request.key_stored)

    @_rpc
    async def DeleteRunpodEndpoint(
        self, request: scheduler_pb2.RunpodEndpointRequest, context: Any
    ) -> common_pb2.EndpointInfo:
        jobs, _ = self._app.require()
        return await jobs.delete_runpod_endpoint(request.user_id)

    async def _settings_of(self, user_id: str) -> scheduler_pb2.ComputeSettings:
        _, store = self._app.require()
        profile = await store.get_profile(user_id)
        return scheduler_pb2.ComputeSettings(
            backend=profile.compute_backend,
            runpod_endpoint_id=profile.runpod_endpoint_id,
            endpoint_status=profile.endpoint_status,
            endpoint_error=profile.endpoint_error,
            hosted_provider=self._app.settings.hosted_provider,
        )

    @_rpc
    async def GetComputeSettings(
        self, request: scheduler_pb2.GetComputeSettingsRequest, context: Any
    ) -> scheduler_pb2.ComputeSettings:
        return await self._settings_of(request.user_id)

    @_rpc
    async def SetComputeBackend(
        self, request: scheduler_pb2.SetComputeBackendRequest, context: Any
    ) -> scheduler_pb2.ComputeSettings:
        if request.backend not in BACKENDS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"backend must be one of {', '.join(BACKENDS)}, got {request.backend!r}",
            )
        _, store = self._app.require()
        await store.set_backend(request.user_id, request.backend)
        return await self._settings_of(request.user_id)

    @_rpc
    async def VerifyProviderKey(
        self, request: scheduler_pb2.VerifyProviderKeyRequest, context: Any
    ) -> scheduler_pb2.VerifyProviderKeyResponse:
        if request.provider != "runpod":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"provider must be 'runpod', got {request.provider!r}"
            )
        if not request.api_key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "api_key is required")
        jobs, _ = self._app.require()
        verdict = await jobs.verify_runpod_key(request.user_id, request.api_key)
        return scheduler_pb2.VerifyProviderKeyResponse(
            valid=verdict.valid,
            balance_usd=verdict.balance_usd,
            message=verdict.message,
            failure=verdict.failure,
        )

    @_rpc
    async def EstimateJob(
        self, request: scheduler_pb2.EstimateJobRequest, context: Any
    ) -> scheduler_pb2.EstimateJobResponse:
        jobs, _ = self._app.require()
        result = await jobs.estimate(
            request.user_id, request.spec_json, request.kind, request.parent_job_id, request.request_json
        )
        return scheduler_pb2.EstimateJobResponse(
            active_backend=result.active_backend, estimates=result.estimates, notes=result.notes
        )

    # ---- stored datasets --------------------------------------------------------------------

    async def UploadDataset(
        self,
        request_iterator: AsyncIterator[scheduler_pb2.UploadDatasetRequest],
        context: grpc.aio.ServicerContext,
    ) -> scheduler_pb2.Dataset:
        try:
            jobs, _ = self._app.require()
            row = await datasets.upload(self._app.artifact_store, jobs.datasets, request_iterator)
        except _KNOWN_ERRORS as exc:
            await _abort_for(context, exc)
        log.info("dataset stored", extra={"dataset_id": row.id, "count": row.count, "bytes": row.bytes})
        return row.to_proto()

    @_rpc
    async def ListDatasets(
        self, request: scheduler_pb2.ListDatasetsRequest, context: Any
    ) -> scheduler_pb2.ListDatasetsResponse:
        jobs, _ = self._app.require()
        rows = await jobs.datasets.list(request.user_id)
        return scheduler_pb2.ListDatasetsResponse(datasets=[row.to_proto() for row in rows])

    @_rpc
    async def GetDataset(self, request: scheduler_pb2.DatasetRequest, context: Any) -> scheduler_pb2.Dataset:
        jobs, _ = self._app.require()
        return (await jobs.datasets.get(request.dataset_id, request.user_id)).to_proto()

    @_rpc
    async def DeleteDataset(
        self, request: scheduler_pb2.DatasetRequest, context: Any
    ) -> scheduler_pb2.Dataset:
        jobs, _ = self._app.require()
        row = await datasets.delete(
            self._app.artifact_store, jobs.datasets, request.dataset_id, request.user_id
        )
        return row.to_proto()

    @_rpc
    async def GetUsage(self, request: scheduler_pb2.GetUsageRequest, context: Any) -> scheduler_pb2.Usage:
        jobs, _ = self._app.require()
        return usage_to_proto(await jobs.usage(request.user_id))

    @_rpc
    async def ListActiveJobs(
        self, request: scheduler_pb2.ListActiveJobsRequest, context: Any
    ) -> scheduler_pb2.ListJobsResponse:
        if request.backend not in BACKENDS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"backend must be one of {', '.join(BACKENDS)}, got {request.backend!r}",
            )
        jobs, _ = self._app.require()
        active = await jobs.active_jobs(request.user_id, request.backend)
        return scheduler_pb2.ListJobsResponse(jobs=[job_to_proto(job) for job in active])

    @_rpc
    async def WakeJob(
        self, request: scheduler_pb2.WakeJobRequest, context: Any
    ) -> scheduler_pb2.WakeJobResponse:
        """A provider's webhook: it proves only that someone holds the job's URL, so all it does
        is make the job's next poll due now (on whichever replica follows it)."""
        _, store = self._app.require()
        stored = await store.webhook_secret_sha256(request.job_id)
        offered = hashlib.sha256(request.secret.encode()).digest()
        # Compared in constant time, against a stand-in when there is nothing to compare with.
        if not hmac.compare_digest(offered, stored or _NO_WEBHOOK) or stored is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        await store.notify_webhook(request.job_id)
        return scheduler_pb2.WakeJobResponse()

    @_rpc
    async def GrantUpload(
        self, request: scheduler_pb2.GrantUploadRequest, context: Any
    ) -> scheduler_pb2.GrantUploadResponse:
        """A worker's request for one file's upload URL, of that file's size (scheduler.uploads)."""
        _, store = self._app.require()
        settings = self._app.settings
        limits = UploadLimits(
            max_file_bytes=settings.scheduler_upload_max_file_bytes,
            max_job_bytes=settings.scheduler_upload_max_job_bytes,
            url_ttl_s=settings.scheduler_upload_grant_ttl_s,
            sign_checksum=settings.scheduler_upload_checksum,
        )
        try:
            url, headers = await grant_upload(
                store,
                self._app.artifact_store,
                limits,
                request.job_id,
                request.secret,
                request.name,
                request.bytes,
                request.sha256,
            )
        except UploadRefused as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        return scheduler_pb2.GrantUploadResponse(url=url, headers=headers)

    @_rpc
    async def GetTrackingSettings(
        self, request: scheduler_pb2.GetTrackingSettingsRequest, context: Any
    ) -> scheduler_pb2.TrackingSettings:
        _, store = self._app.require()
        return await self._tracking_of(store, request.user_id)

    @_rpc
    async def SetTrackingSettings(
        self, request: scheduler_pb2.SetTrackingSettingsRequest, context: Any
    ) -> scheduler_pb2.TrackingSettings:
        try:
            chosen = checked_tracking_settings(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        _, store = self._app.require()
        await store.pool.execute(
            """INSERT INTO profiles
                   (user_id, mlflow_tracking_uri, mlflow_experiment_name, wandb_project, wandb_entity)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (user_id) DO UPDATE SET mlflow_tracking_uri = $2, mlflow_experiment_name = $3,
                   wandb_project = $4, wandb_entity = $5, updated_at = now()""",
            request.user_id,
            *chosen,
        )
        return await self._tracking_of(store, request.user_id)

    async def _tracking_of(self, store: Store, user_id: str) -> scheduler_pb2.TrackingSettings:
        row = await store.pool.fetchrow(
            "SELECT mlflow_tracking_uri, mlflow_experiment_name, wandb_project, wandb_entity "
            "FROM profiles WHERE user_id = $1",
            user_id,
        )
        settings = self._app.settings
        return scheduler_pb2.TrackingSettings(
            **(dict(row) if row is not None else {}),
            operator_mlflow=bool(settings.mlflow_tracking_uri),
            operator_wandb=bool(settings.wandb_project),
        )


def usage_to_proto(usage: Usage) -> scheduler_pb2.Usage:
    return scheduler_pb2.Usage(
        backend=usage.backend,
        limits=[
            scheduler_pb2.UsageLimit(
                name=entry.name,
                used=entry.used,
                limit=entry.limit,
                description=entry.description,
                resets_at=timestamp(entry.resets_at),
            )
            for entry in usage.limits
        ],
        max_job_time_s=usage.max_job_time_s,
        max_job_cost_usd=usage.max_job_cost_usd,
    )


class SchedulerServer:
    """The running scheduler: gRPC server, database pool, listener, dispatcher and pollers, readiness."""

    def __init__(self, settings: Settings, store_settings: StoreSettings | None = None) -> None:
        self.settings = settings
        self._dsn = settings.database_url.get_secret_value()
        self.providers = Providers(settings)
        self.artifact_store_settings = store_settings or load_store_settings()
        self.artifact_store: ArtifactStore = open_store(self.artifact_store_settings)
        # Every connection of this replica carries its name (pg_stat_activity.application_name).
        self.db_application_name = f"scheduler:{settings.scheduler_replica_id}"[:63]
        self.hub = EventHub(self._dsn, settings.scheduler_retry_max_s, self.db_application_name)
        self.grpc: GrpcService = create_grpc_server(
            f"{settings.scheduler_host}:{settings.scheduler_port}",
            self._register,
            "scheduler",
            caller_tokens_of(settings.scheduler_caller_tokens),
        )
        self.readiness = Readiness("scheduler", self._dependencies_up, settings.scheduler_db_check_interval_s)
        self.readiness.attach(self.grpc)
        self.ready = asyncio.Event()
        self.metrics_server: MetricsServer | None = None
        self._pool: asyncpg.Pool | None = None
        self._jobs_counted_at = -math.inf
        self._store: Store | None = None
        self._jobs: JobManager | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Reads a researcher's own W&B key / MLflow token for an export (keyvault lets the
        # caller "scheduler" reveal only those).
        self._keyvault = KeyVaultReader(settings.keyvault_addr, settings.keyvault_token.get_secret_value())
        self.tracking: TrackingExporter | None = None

    def _register(self, server: grpc.aio.Server) -> list[str]:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(self), server)
        return [SERVICE_NAME]

    @property
    def port(self) -> int:
        return self.grpc.port

    def require(self) -> tuple[JobManager, Store]:
        if self._jobs is None or self._store is None:
            raise NotReady()
        return self._jobs, self._store

    async def start(self) -> None:
        """Start serving at once; the database work continues in the background."""
        await self.grpc.server.start()
        await self.readiness.set(False, reason="connecting to the database")
        self.metrics_server = start_metrics_server(
            self.settings.scheduler_host, self.settings.scheduler_metrics_port
        )
        self._tasks.append(asyncio.create_task(self._bootstrap(), name="scheduler-bootstrap"))
        log.info("scheduler listening", extra={"port": self.port})
        settings = self.settings
        if (
            settings.compute_runpod_addr
            and self.artifact_store.signs_headers
            and not settings.scheduler_webhook_base_url
        ):
            # scheduler.uploads: without the upload route, URLs minted at dispatch bound no size.
            log.warning(
                "RunPod workers upload with URLs not bounded in size: set SCHEDULER_WEBHOOK_BASE_URL "
                "to the gateway's public address so that each file's URL is signed for its size",
                extra={"component": "scheduler.uploads"},
            )

    async def wait_serving(self, serving: bool) -> None:
        """Return once readiness is ``serving`` (for supervisors and tests)."""
        await self.readiness.wait_for(serving)

    async def _bootstrap(self) -> None:
        delay = 0.1
        while True:
            try:
                # Same steps as keyvault/store.py's open_database (migrate, close the pool on
                # failure), but each service has its own schema and migrations module, and
                # service_runtime does not depend on asyncpg.
                pool = await create_pool(
                    self._dsn, self.settings.scheduler_db_pool_size, self.db_application_name
                )
                try:
                    async with pool.acquire() as conn:
                        await apply_migrations(conn)
                except BaseException:
                    await pool.close()
                    raise
                break
            except _DB_ERRORS as exc:
                log.warning("database not reachable; retrying", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.scheduler_retry_max_s)
        self._pool = pool
        self._store = Store(pool, self.settings.scheduler_db_acquire_timeout_s)
        self.hub.start()
        await self.hub.connected.wait()
        mover = ArtifactMover(
            self.artifact_store,
            self.settings.scheduler_artifact_attempts,
            self.settings.scheduler_artifact_timeout_s,
        )
        self._jobs = JobManager(self.settings, self._store, self.providers, mover)
        self.hub.on_webhook = self._jobs.follower.wake
        resumed = await self._jobs.resume_all()
        log.info(
            "scheduler ready", extra={"resumed_jobs": resumed, "artifact_store": self.artifact_store.kind}
        )
        await self.readiness.start()  # checks at once (SERVING), then every db check interval
        self.ready.set()
        self._tasks.append(asyncio.create_task(self._retention_loop(), name="scheduler-retention"))
        self.tracking = TrackingExporter(self.settings, self._store, self._keyvault)
        self._tasks.append(asyncio.create_task(self.tracking.run_forever(), name="scheduler-tracking"))

    async def _retention_loop(self) -> None:
        while True:
            if self._jobs is not None:
                try:
                    await self._jobs.sweep_expired_artifacts()
                    await self._jobs.sweep_orphaned_uploads()
                except (StoreError, *_DB_ERRORS) as exc:
                    log.warning("artifact retention sweep failed; will retry", extra={"error": str(exc)})
            await asyncio.sleep(self.settings.scheduler_retention_sweep_s)

    async def check_health(self) -> bool:
        """Ask the database (and the listener), refresh the job gauges, set readiness."""
        return await self.readiness.refresh()

    async def _dependencies_up(self) -> bool:
        if self._pool is None or self._store is None:
            return False
        try:
            timeout = max(self.settings.scheduler_db_check_interval_s, 1.0)
            # Through the pool with the statements' acquire timeout: a starved pool (every
            # connection busy for that long) is NOT_SERVING, like a database that is down.
            async with self._store.connection() as conn:
                await conn.fetchval("SELECT 1", timeout=timeout)
            # Counting every job row is not cheap on a big table: the gauges need not follow each check.
            if time.monotonic() - self._jobs_counted_at >= self.settings.scheduler_job_gauges_interval_s:
                record_job_counts(await self._store.count_by_status())
                self._jobs_counted_at = time.monotonic()
            return self.hub.check()
        except _DB_ERRORS as exc:
            log.warning("database health check failed", extra={"error": str(exc)})
            return False

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain RPCs, stop the dispatcher and the pollers, close every connection. Jobs stay."""
        await self.grpc.stop(self.settings.scheduler_shutdown_grace_s if grace_s is None else grace_s)
        for task in self._tasks:
            task.cancel()
        await self._bounded("background tasks", asyncio.gather(*self._tasks, return_exceptions=True))
        await self._bounded("readiness", self.readiness.stop())
        if self.tracking is not None:
            await self._bounded("tracking exporter", self.tracking.close())
        await self._bounded("keyvault channel", self._keyvault.close())
        if self._jobs is not None:
            await self._bounded("dispatcher and follower", self._jobs.close())
        await self._bounded("event listener", self.hub.close())
        await self._bounded("provider channels", self.providers.close())
        if self._pool is not None:
            # asyncpg's close waits for every connection to come back; terminate does not.
            if not await self._bounded("database pool", self._pool.close()):
                self._pool.terminate()
        if self.metrics_server is not None:
            self.metrics_server.stop()

    async def _bounded(self, what: str, step: Awaitable[Any]) -> bool:
        """One step of stop, given at most STOP_STEP_S: a stop that never ends outlives the
        orchestrator's grace period and is killed with nothing logged. False when abandoned."""
        try:
            await asyncio.wait_for(step, STOP_STEP_S)
        except TimeoutError:
            log.warning(
                "stop: a step did not finish in time; abandoned",
                extra={"component": f"scheduler.stop.{what}", "timeout_s": STOP_STEP_S},
            )
            return False
        return True


async def start_scheduler(settings: Settings, store_settings: StoreSettings | None = None) -> SchedulerServer:
    """Create and start the scheduler (``scheduler_port=0`` picks a free port); the artifact store
    comes from ARTIFACT_STORE_* unless ``store_settings`` is given."""
    server = SchedulerServer(settings, store_settings)
    await server.start()
    return server


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain and stop (service_runtime.lifecycle)."""
    await run_service(SchedulerServer(settings), "scheduler")
