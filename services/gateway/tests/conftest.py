"""Scripted Scheduler and KeyVault servicers on real loopback gRPC servers, and the real gateway
served by uvicorn on a free loopback port, talking to them."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.config import Settings
from gateway.server import GatewayServer, start_gateway
from influence.v1 import common_pb2, keyvault_pb2, keyvault_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from service_runtime.grpc_server import GrpcService, create_grpc_server

KEYVAULT_TOKEN = "gateway-caller-token-for-tests"
TERMINAL = {common_pb2.JOB_STATE_COMPLETED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}


def now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


@dataclass
class StoredJob:
    job: scheduler_pb2.Job
    spec_json: bytes
    events: list[common_pb2.ProgressEvent] = field(default_factory=list)
    result_json: bytes = b""
    # name -> bytes; served by ReadJobArtifact, or by ``download_url`` when it is set
    artifacts: dict[str, bytes] = field(default_factory=dict)
    download_url: str = ""


class ScriptedScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Keeps jobs and profiles in memory, answers another user's job with NOT_FOUND (as the real
    scheduler must), records what the gateway sent, and lets a test script key verification."""

    def __init__(self) -> None:
        self.jobs: dict[str, StoredJob] = {}
        self.idempotency: dict[tuple[str, str], str] = {}
        self.backends: dict[str, str] = {}
        self.tracking: dict[str, scheduler_pb2.TrackingSettings] = {}
        # user -> their RunPod endpoint id; ``endpoint_deletes`` records each delete in order
        self.endpoints: dict[str, str] = {}
        self.endpoint_deletes: list[str] = []
        self.submit_requests: list[scheduler_pb2.SubmitJobRequest] = []
        self.watch_requests: list[scheduler_pb2.WatchJobRequest] = []
        self.estimate_requests: list[scheduler_pb2.EstimateJobRequest] = []
        self.verify_requests: list[scheduler_pb2.VerifyProviderKeyRequest] = []
        self.verify_answer: Callable[[str], Awaitable[scheduler_pb2.VerifyProviderKeyResponse]] | None = None
        self.metadata_seen: list[dict[str, str]] = []
        # job id -> its webhook secret; ``woken`` records each WakeJob that matched
        self.webhook_secrets: dict[str, str] = {}
        self.woken: list[str] = []
        # GrantUpload: each request it got, and the refusal (code, message) it answers, if set
        self.upload_requests: list[scheduler_pb2.GrantUploadRequest] = []
        self.upload_refusal: tuple[grpc.StatusCode, str] | None = None
        # Set: artifact reads answer UNAVAILABLE with this message (the store is down).
        self.store_failure = ""
        self.active_watchers = 0
        self.watchers_changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()

    # ---- test helpers -----------------------------------------------------------------------

    def add_job(self, user_id: str, state: int = common_pb2.JOB_STATE_RUNNING) -> str:
        job_id = f"job-{next(self._ids)}"
        self.jobs[job_id] = StoredJob(
            job=scheduler_pb2.Job(
                id=job_id,
                user_id=user_id,
                compute_backend="hosted",
                provider="local",
                state=state,
                created_at=now(),
                updated_at=now(),
                model_id="local/tiny-llama",
            ),
            spec_json=b"{}",
        )
        return job_id

    async def add_event(self, job_id: str, stage: str, progress: float, **extra: Any) -> None:
        stored = self.jobs[job_id]
        seq = len(stored.events) + 1
        body = {"type": "progress", "stage": stage, "progress": progress, **extra}
        stored.events.append(
            common_pb2.ProgressEvent(
                seq=seq,
                type="progress",
                stage=stage,
                progress=progress,
                message=extra.get("message", ""),
                event_json=json.dumps(body).encode(),
                time=now(),
            )
        )
        stored.job.last_seq = seq
        stored.job.stage = stage
        stored.job.progress = progress
        stored.job.latest_metrics_json = json.dumps(extra).encode()
        async with self._changed:
            self._changed.notify_all()

    async def finish(self, job_id: str, result: dict[str, Any] | None = None) -> None:
        stored = self.jobs[job_id]
        stored.job.state = common_pb2.JOB_STATE_COMPLETED
        stored.job.finished_at.CopyFrom(now())
        stored.result_json = json.dumps(result or {}).encode()
        async with self._changed:
            self._changed.notify_all()

    def answer_verification(
        self, answer: grpc.StatusCode | scheduler_pb2.VerifyProviderKeyResponse, details: str = ""
    ) -> None:
        """Answer every VerifyProviderKey with ``answer``: a response, or an error status."""

        async def verify(_api_key: str) -> scheduler_pb2.VerifyProviderKeyResponse:
            if isinstance(answer, grpc.StatusCode):
                raise _Abort(answer, details)
            return answer

        self.verify_answer = verify

    # ---- RPCs -----------------------------------------------------------------------------

    def _owned(self, user_id: str, job_id: str, context: grpc.aio.ServicerContext) -> StoredJob:
        self.metadata_seen.append(dict(context.invocation_metadata() or ()))
        stored = self.jobs.get(job_id)
        if stored is None or stored.job.user_id != user_id:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"job {job_id} not found")
        return stored

    async def SubmitJob(self, request, context):
        self.submit_requests.append(request)
        self.metadata_seen.append(dict(context.invocation_metadata() or ()))
        key = (request.user_id, request.idempotency_key)
        if request.idempotency_key and key in self.idempotency:
            return self.jobs[self.idempotency[key]].job
        job_id = self.add_job(request.user_id, common_pb2.JOB_STATE_QUEUED)
        stored = self.jobs[job_id]
        stored.spec_json = request.spec_json
        stored.job.estimated_time_s = 120.0
        stored.job.estimated_cost_usd = 0.05
        if request.idempotency_key:
            self.idempotency[key] = job_id
        return stored.job

    async def GetJob(self, request, context):
        return await _answer(context, lambda: self._owned(request.user_id, request.job_id, context).job)

    async def ListJobs(self, request, context):
        jobs = [s.job for s in self.jobs.values() if s.job.user_id == request.user_id]
        return scheduler_pb2.ListJobsResponse(jobs=jobs[: request.limit or None])

    async def WatchJob(self, request, context):
        self.watch_requests.append(request)
        try:
            stored = self._owned(request.user_id, request.job_id, context)
        except _Abort as abort:
            await context.abort(abort.code, abort.details)
        sent = request.after_seq
        self.active_watchers += 1
        try:
            while True:
                for event in stored.events:
                    if event.seq > sent:
                        yield event
                        sent = event.seq
                if stored.job.state in TERMINAL:
                    return
                async with self._changed:
                    await self._changed.wait_for(
                        lambda seen=sent: stored.job.last_seq > seen or stored.job.state in TERMINAL
                    )
        finally:
            self.active_watchers -= 1
            async with self.watchers_changed:
                self.watchers_changed.notify_all()

    async def GetJobResult(self, request, context):
        def answer() -> scheduler_pb2.GetJobResultResponse:
            stored = self._owned(request.user_id, request.job_id, context)
            if stored.job.state != common_pb2.JOB_STATE_COMPLETED:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "the job has not completed")
            return scheduler_pb2.GetJobResultResponse(result_json=stored.result_json)

        return await _answer(context, answer)

    async def CancelJob(self, request, context):
        def answer() -> scheduler_pb2.Job:
            stored = self._owned(request.user_id, request.job_id, context)
            stored.job.state = common_pb2.JOB_STATE_CANCELLED
            return stored.job

        return await _answer(context, answer)

    async def ListActiveJobs(self, request, context):
        def answer() -> scheduler_pb2.ListJobsResponse:
            active = (
                common_pb2.JOB_STATE_QUEUED,
                common_pb2.JOB_STATE_SUBMITTED,
                common_pb2.JOB_STATE_RUNNING,
            )
            return scheduler_pb2.ListJobsResponse(
                jobs=[
                    stored.job
                    for stored in self.jobs.values()
                    if stored.job.user_id == request.user_id
                    and stored.job.compute_backend == request.backend
                    and stored.job.state in active
                ]
            )

        return await _answer(context, answer)

    async def WakeJob(self, request, context):
        if self.webhook_secrets.get(request.job_id) != request.secret:
            await context.abort(grpc.StatusCode.NOT_FOUND, "not found")
        self.woken.append(request.job_id)
        return scheduler_pb2.WakeJobResponse()

    async def GrantUpload(self, request, context):
        self.upload_requests.append(request)
        if self.upload_refusal is not None:
            await context.abort(*self.upload_refusal)
        return scheduler_pb2.GrantUploadResponse(
            url=f"https://store.example/jobs/{request.job_id}/{request.name}?X-Amz-Signature=f00",
            headers={"Content-Length": str(request.bytes), "If-None-Match": "*"},
        )

    async def DeleteJob(self, request, context):
        def answer() -> scheduler_pb2.DeleteJobResponse:
            stored = self._owned(request.user_id, request.job_id, context)
            del self.jobs[request.job_id]
            return scheduler_pb2.DeleteJobResponse(deleted_artifacts=len(stored.artifacts))

        return await _answer(context, answer)

    @staticmethod
    def _artifact(name: str, data: bytes) -> common_pb2.Artifact:
        return common_pb2.Artifact(
            name=name,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            media_type="application/x-npy" if name.endswith(".npy") else "application/json",
        )

    async def ListJobArtifacts(self, request, context):
        def answer() -> scheduler_pb2.ListJobArtifactsResponse:
            stored = self._owned(request.user_id, request.job_id, context)
            return scheduler_pb2.ListJobArtifactsResponse(
                artifacts=[self._artifact(name, data) for name, data in stored.artifacts.items()]
            )

        return await _answer(context, answer)

    def _owned_artifact(self, request, context) -> tuple[StoredJob, bytes]:
        stored = self._owned(request.user_id, request.job_id, context)
        if self.store_failure:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, self.store_failure)
        if request.name not in stored.artifacts:
            raise _Abort(grpc.StatusCode.NOT_FOUND, "no such artifact")
        return stored, stored.artifacts[request.name]

    async def OpenJobArtifact(self, request, context):
        def answer() -> scheduler_pb2.OpenJobArtifactResponse:
            stored, data = self._owned_artifact(request, context)
            return scheduler_pb2.OpenJobArtifactResponse(
                artifact=self._artifact(request.name, data), download_url=stored.download_url
            )

        return await _answer(context, answer)

    async def ReadJobArtifact(self, request, context):
        try:
            _, data = self._owned_artifact(request, context)
        except _Abort as abort:
            await context.abort(abort.code, abort.details)
        for start in range(0, len(data), 1000):
            yield common_pb2.ArtifactChunk(data=data[start : start + 1000])

    def _settings(self, user_id: str) -> scheduler_pb2.ComputeSettings:
        endpoint = self.endpoints.get(user_id, "")
        return scheduler_pb2.ComputeSettings(
            backend=self.backends.get(user_id, "hosted"),
            runpod_endpoint_id=endpoint,
            endpoint_status="ready" if endpoint else "none",
            hosted_provider="local",
        )

    async def GetRunpodEndpoint(self, request, context):
        endpoint = self.endpoints.get(request.user_id, "")
        if not endpoint:
            return common_pb2.EndpointInfo(byok_available=True, state="none")
        return common_pb2.EndpointInfo(
            byok_available=True,
            state="live" if request.key_stored else "unknown",
            endpoint_id=endpoint,
            gpu_pools=["AMPERE_80"],
            workers_max=1,
            console_url=f"https://console.runpod.io/serverless/user/endpoint/{endpoint}",
        )

    async def DeleteRunpodEndpoint(self, request, context):
        self.endpoint_deletes.append(self.endpoints.pop(request.user_id, ""))
        return common_pb2.EndpointInfo(byok_available=True, state="none")

    async def GetComputeSettings(self, request, context):
        return self._settings(request.user_id)

    async def SetComputeBackend(self, request, context):
        if request.backend not in ("hosted", "runpod"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown backend {request.backend!r}")
        self.backends[request.user_id] = request.backend
        return self._settings(request.user_id)

    async def GetTrackingSettings(self, request, context):
        return self.tracking.get(request.user_id, scheduler_pb2.TrackingSettings(operator_wandb=True))

    async def SetTrackingSettings(self, request, context):
        uri = request.mlflow_tracking_uri
        if uri and not uri.startswith(("http://", "https://")):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "mlflow_tracking_uri: expected an http:// or https:// URL"
            )
        self.tracking[request.user_id] = scheduler_pb2.TrackingSettings(
            mlflow_tracking_uri=uri.rstrip("/"),
            mlflow_experiment_name=request.mlflow_experiment_name,
            wandb_project=request.wandb_project,
            wandb_entity=request.wandb_entity,
            operator_wandb=True,
        )
        return self.tracking[request.user_id]

    async def VerifyProviderKey(self, request, context):
        self.verify_requests.append(request)
        self.metadata_seen.append(dict(context.invocation_metadata() or ()))
        assert self.verify_answer is not None, "the test scripts the verification"
        try:
            return await self.verify_answer(request.api_key)
        except _Abort as abort:
            await context.abort(abort.code, abort.details)

    async def EstimateJob(self, request, context):
        self.estimate_requests.append(request)
        active = self.backends.get(request.user_id, "hosted")
        other = "runpod" if active == "hosted" else "hosted"
        return scheduler_pb2.EstimateJobResponse(
            active_backend=active,
            estimates=[
                common_pb2.Estimate(backend=active, provider="local", gpu="host", estimated_time_s=30),
                common_pb2.Estimate(
                    backend=other,
                    provider="runpod",
                    gpu="AMPERE_80",
                    gpu_memory_gb=80,
                    estimated_time_s=90,
                    usd_per_second=0.00076,
                    estimated_cost_usd=0.0684,
                    prices_as_of="2026-08-01",
                    notes=["includes a cold start"],
                ),
            ],
            notes=["modal is not configured on this deployment"],
        )


class ScriptedKeyVault(keyvault_pb2_grpc.KeyVaultServicer):
    """Keeps keys in memory and refuses callers without the gateway's token."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], str] = {}
        self.store_requests: list[keyvault_pb2.StoreKeyRequest] = []
        self.metadata_seen: list[dict[str, str]] = []

    async def _check_caller(self, context: grpc.aio.ServicerContext) -> None:
        self.metadata_seen.append(dict(context.invocation_metadata() or ()))
        if self.metadata_seen[-1].get("x-caller-token") != KEYVAULT_TOKEN:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown caller")

    def _info(self, user_id: str, provider: str) -> keyvault_pb2.KeyInfo:
        return keyvault_pb2.KeyInfo(
            user_id=user_id,
            provider=provider,
            last4=self.keys[(user_id, provider)][-4:],
            key_version=1,
            created_at=now(),
            verified_at=now(),
            updated_at=now(),
        )

    async def StoreKey(self, request, context):
        await self._check_caller(context)
        self.store_requests.append(request)
        self.keys[(request.user_id, request.provider)] = request.plaintext
        return self._info(request.user_id, request.provider)

    async def GetKeyInfo(self, request, context):
        await self._check_caller(context)
        if (request.user_id, request.provider) not in self.keys:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no key stored")
        return self._info(request.user_id, request.provider)

    async def DeleteKey(self, request, context):
        await self._check_caller(context)
        deleted = self.keys.pop((request.user_id, request.provider), None) is not None
        return keyvault_pb2.DeleteKeyResponse(deleted=deleted)

    async def RevealKey(self, request, context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the gateway may not reveal keys")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


async def _answer(context: grpc.aio.ServicerContext, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except _Abort as abort:
        await context.abort(abort.code, abort.details)


@dataclass
class Upstream:
    scheduler: ScriptedScheduler
    keyvault: ScriptedKeyVault
    scheduler_service: GrpcService
    keyvault_service: GrpcService

    @property
    def scheduler_addr(self) -> str:
        return f"127.0.0.1:{self.scheduler_service.port}"

    @property
    def keyvault_addr(self) -> str:
        return f"127.0.0.1:{self.keyvault_service.port}"


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    scheduler, keyvault = ScriptedScheduler(), ScriptedKeyVault()

    def add_scheduler(server: grpc.aio.Server) -> list[str]:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, server)
        return ["influence.v1.Scheduler"]

    def add_keyvault(server: grpc.aio.Server) -> list[str]:
        keyvault_pb2_grpc.add_KeyVaultServicer_to_server(keyvault, server)
        return ["influence.v1.KeyVault"]

    services = [
        create_grpc_server("127.0.0.1:0", add_scheduler, "scheduler-test"),
        create_grpc_server("127.0.0.1:0", add_keyvault, "keyvault-test"),
    ]
    for service in services:
        await service.server.start()
        await service.set_ready(True)
    yield Upstream(scheduler, keyvault, *services)
    for service in services:
        await service.server.stop(None)


@dataclass
class Gateway:
    running: GatewayServer
    client: httpx.AsyncClient
    settings: Settings

    async def sign_in(self, username: str) -> dict[str, str]:
        """Local sign-in; answers the Authorization header for that user."""
        response = await self.client.post("/api/auth/local", json={"username": username})
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(upstream: Upstream) -> AsyncIterator[GatewayFactory]:
    """Start a gateway with settings overrides (default: local auth, the scripted upstreams)."""
    started: list[Gateway] = []

    async def make(**overrides: Any) -> Gateway:
        values: dict[str, Any] = {
            "gateway_host": "127.0.0.1",
            "gateway_port": 0,
            "gateway_metrics_port": 0,
            "scheduler_addr": upstream.scheduler_addr,
            "keyvault_addr": upstream.keyvault_addr,
            "keyvault_token": KEYVAULT_TOKEN,
            "auth_mode": "local",
            "gateway_rpc_timeout_s": 5.0,
            **overrides,
        }
        settings = Settings.load(**values)
        running = await start_gateway(settings)
        client = httpx.AsyncClient(base_url=running.url, timeout=10.0)
        gateway = Gateway(running, client, settings)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.client.aclose()
        await gateway.running.stop()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


def tiny_spec(n_train: int = 2, n_eval: int = 1) -> dict[str, Any]:
    return {
        "training_data": [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(n_train)],
        "eval_data": [{"prompt": f"e{i}", "expected": f"x{i}"} for i in range(n_eval)],
        "hyperparams": {"epochs": 1},
    }


@pytest.fixture
def make_spec() -> Callable[..., dict[str, Any]]:
    return tiny_spec
