"""Fixtures: a scripted ComputeProvider on loopback and real schedulers on port 0.

The scripted provider is our own contract (influence.v1.ComputeProvider), driven by the test:
it injects provider behaviour (UNAVAILABLE then recovery, failures with a message, events in
chunks, a job held at a point until the test releases it, RunPod endpoint creation).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from artifact_store import StoreSettings
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from scheduler.config import Settings
from scheduler.server import SchedulerServer, start_scheduler

GOOD_KEY = "rpa_GOODKEY1234567890"

SPEC: dict[str, Any] = {
    "training_data": [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}],
    "eval_data": [{"prompt": "1+1=", "expected": "2"}],
    "hyperparams": {"epochs": 1},
}


def spec_json(**changes: Any) -> bytes:
    return json.dumps({**SPEC, **changes}).encode()


def progress_events(n: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "progress",
            "stage": "training",
            "progress": (i + 1) / (n + 1),
            "message": f"step {i + 1} of {n}",
            "step": i + 1,
            "total_steps": n,
            "loss": 2.0 - i * 0.1,
            "learning_rate": 2e-4,
            "eta_s": float(n - i),
        }
        for i in range(n)
    ]


@dataclass
class Plan:
    """How the scripted provider runs each new job."""

    events: list[dict[str, Any]] = field(default_factory=lambda: progress_events(5))
    waiting_polls: int = 1  # GetStatus answers SUBMITTED this many times first
    chunk: int = 2  # events per GetStatus answer
    hold_at: int | None = None  # emit no more than this many events until ``release`` is set
    release: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str = "complete"  # "complete" | "fail"
    error: str = ""
    # Files the job "wrote": listed in the result's manifest and served by FetchArtifact.
    artifacts: dict[str, bytes] = field(default_factory=dict)
    # FetchArtifact sends this many chunks and then fails, once per entry (then streams whole).
    fetch_breaks: list[int] = field(default_factory=list)
    # Bytes FetchArtifact sends instead of the listed ones (a corrupted transfer).
    corrupt: bool = False
    # GPU-seconds the provider reports having measured once the job ends (None: no usage).
    usage_s: float | None = None


@dataclass
class ProviderJob:
    job_id: str
    provider_job_id: str
    account: common_pb2.Account
    plan: Plan
    polls: int = 0
    cancelled: bool = False


class ScriptedProvider(compute_pb2_grpc.ComputeProviderServicer):
    def __init__(self) -> None:
        self.plan = Plan()
        self.jobs: dict[str, ProviderJob] = {}
        self.submit_calls: list[str] = []
        self.submit_requests: list[compute_pb2.SubmitRequest] = []
        self.estimate_requests: list[compute_pb2.EstimateRequest] = []
        self.cancel_calls: list[str] = []
        self.fail_next: dict[str, list[tuple[grpc.StatusCode, str]]] = {}
        self.endpoints: set[str] = set()
        self.endpoints_created = 0
        self.prepare_requests: list[compute_pb2.PrepareAccountRequest] = []
        self.verified_keys: list[str] = []
        # key -> the refusal VerifyCredentials answers for it (default: invalid)
        self.refusals: dict[str, compute_pb2.VerifyCredentialsResponse] = {}
        self.result_calls = 0
        # What Estimate answers: time and $/s (the cost is their product).
        self.estimated_time_s = 12.0
        self.usd_per_second = {"runpod": 0.5 / 12.0, "hosted": 0.0}
        self.parallel_jobs = 0  # what Estimate says of the jobs it runs at once (0: unsaid)
        self.fetch_calls: list[str] = []
        # While set and not yet released, Estimate, PrepareAccount and Submit wait on it (a
        # provider that does not answer).
        self.gate: asyncio.Event | None = None
        self.gated = ("Estimate", "PrepareAccount", "Submit")  # the calls that wait on it
        # Submit calls received (past the gate), a repeat of a known job id included.
        self.submit_received = 0
        # Submits to take and then answer UNKNOWN, as compute-runpod answers a /run that RunPod
        # may have accepted.
        self.lose_answers = 0
        # Other provider jobs for a job id (a duplicate delivery's claimant), by provider job id.
        self.other_runs: dict[str, ProviderJob] = {}

    async def _maybe_fail(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if self.gate is not None and method in self.gated:
            await self.gate.wait()
        queue = self.fail_next.get(method)
        if queue:
            code, message = queue.pop(0)
            await context.abort(code, message)

    async def VerifyCredentials(self, request: Any, context: Any) -> compute_pb2.VerifyCredentialsResponse:
        await self._maybe_fail("VerifyCredentials", context)
        self.verified_keys.append(request.api_key)
        if request.api_key != GOOD_KEY:
            # As compute-runpod answers a refused key: a verdict with its reason, not an error.
            return self.refusals.get(request.api_key) or compute_pb2.VerifyCredentialsResponse(
                valid=False, failure=common_pb2.KEY_FAILURE_INVALID, message="Invalid RunPod API key"
            )
        return compute_pb2.VerifyCredentialsResponse(
            valid=True, account_id="acct-1", balance_usd=25.0, message="key verified"
        )

    async def PrepareAccount(self, request: Any, context: Any) -> compute_pb2.PrepareAccountResponse:
        await self._maybe_fail("PrepareAccount", context)
        self.prepare_requests.append(request)
        endpoint_id = request.account.endpoint_id
        if endpoint_id:
            if endpoint_id not in self.endpoints:
                await context.abort(grpc.StatusCode.NOT_FOUND, "endpoint not found")
            return compute_pb2.PrepareAccountResponse(endpoint_id=endpoint_id, status="ready")
        # Creating an endpoint takes a round trip to RunPod: long enough for a race to show.
        await asyncio.sleep(0.05)
        self.endpoints_created += 1
        new_id = f"ep-{self.endpoints_created}"
        self.endpoints.add(new_id)
        return compute_pb2.PrepareAccountResponse(endpoint_id=new_id, created=True, status="ready")

    async def DescribeEndpoint(self, request: Any, context: Any) -> common_pb2.EndpointInfo:
        endpoint_id = request.account.endpoint_id
        if not endpoint_id:
            return common_pb2.EndpointInfo(byok_available=True, state="none")
        state = "live" if endpoint_id in self.endpoints else "gone"
        return common_pb2.EndpointInfo(byok_available=True, state=state, endpoint_id=endpoint_id)

    async def DeleteEndpoint(self, request: Any, context: Any) -> common_pb2.EndpointInfo:
        self.endpoints.discard(request.account.endpoint_id)
        return common_pb2.EndpointInfo(byok_available=True, state="none")

    async def Submit(self, request: Any, context: Any) -> compute_pb2.SubmitResponse:
        await self._maybe_fail("Submit", context)
        self.submit_received += 1
        existing = self.jobs.get(request.job_id)
        if existing is not None:
            return compute_pb2.SubmitResponse(provider_job_id=existing.provider_job_id)
        self.submit_calls.append(request.job_id)
        self.submit_requests.append(request)
        job = ProviderJob(request.job_id, f"p-{request.job_id}", request.account, self.plan)
        self.jobs[request.job_id] = job
        if self.lose_answers:
            self.lose_answers -= 1
            await context.abort(grpc.StatusCode.UNKNOWN, "RunPod may have accepted this job")
        return compute_pb2.SubmitResponse(provider_job_id=job.provider_job_id)

    async def GetStatus(self, request: Any, context: Any) -> compute_pb2.GetStatusResponse:
        await self._maybe_fail("GetStatus", context)
        job = self.jobs.get(request.job_id)
        if job is not None and job.provider_job_id != request.provider_job_id:
            job = self.other_runs.get(request.provider_job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown job")
        if job.cancelled:
            return compute_pb2.GetStatusResponse(state=common_pb2.JOB_STATE_CANCELLED, cursor=request.cursor)
        job.polls += 1
        plan = job.plan
        if job.polls <= plan.waiting_polls:
            return compute_pb2.GetStatusResponse(
                state=common_pb2.JOB_STATE_SUBMITTED,
                cursor=request.cursor,
                stage_message="waiting for a GPU worker (cold start can take 30-120 s)",
            )
        start = int(request.cursor or 0)
        limit = len(plan.events)
        if plan.hold_at is not None and not plan.release.is_set():
            limit = min(limit, plan.hold_at)
        end = min(start + plan.chunk, limit)
        events = [
            common_pb2.ProgressEvent(
                type=e["type"],
                stage=e["stage"],
                progress=e["progress"],
                message=e["message"],
                event_json=json.dumps(e).encode(),
            )
            for e in plan.events[start:end]
        ]
        response = compute_pb2.GetStatusResponse(
            state=common_pb2.JOB_STATE_RUNNING, events=events, cursor=str(end)
        )
        if end == len(plan.events):
            if plan.outcome == "fail":
                response.state = common_pb2.JOB_STATE_FAILED
                response.error = plan.error
            else:
                response.result_ready = True
            if plan.usage_s is not None:
                response.usage.CopyFrom(
                    common_pb2.JobUsage(gpu_seconds=plan.usage_s, gpu="cpu", source="scripted timing")
                )
        return response

    async def GetResult(self, request: Any, context: Any) -> compute_pb2.GetResultResponse:
        await self._maybe_fail("GetResult", context)
        self.result_calls += 1
        result: dict[str, Any] = {"job_id": request.job_id, "influence": {"scores": [[0.5, -0.25]]}}
        job = self.jobs.get(request.job_id)
        if job is not None and job.plan.artifacts:
            result["artifacts"] = [
                {
                    "name": name,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "media_type": "application/octet-stream",
                }
                for name, data in job.plan.artifacts.items()
            ]
        return compute_pb2.GetResultResponse(result_json=json.dumps(result).encode())

    async def FetchArtifact(self, request: Any, context: Any) -> AsyncIterator[common_pb2.ArtifactChunk]:
        await self._maybe_fail("FetchArtifact", context)
        self.fetch_calls.append(request.name)
        job = self.jobs.get(request.job_id)
        if job is None or request.name not in job.plan.artifacts:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such artifact")
        data = job.plan.artifacts[request.name]
        if job.plan.corrupt:
            data = bytes(reversed(data))
        breaks_after = job.plan.fetch_breaks.pop(0) if job.plan.fetch_breaks else None
        for index, start in enumerate(range(0, len(data), 64 * 1024)):
            if breaks_after is not None and index == breaks_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "worker connection reset mid-transfer")
            yield common_pb2.ArtifactChunk(data=data[start : start + 64 * 1024])

    async def Cancel(self, request: Any, context: Any) -> compute_pb2.CancelResponse:
        await self._maybe_fail("Cancel", context)
        self.cancel_calls.append(request.job_id)
        job = self.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown job")
        job.cancelled = True
        return compute_pb2.CancelResponse(state=common_pb2.JOB_STATE_CANCELLED)

    async def Estimate(self, request: Any, context: Any) -> compute_pb2.EstimateResponse:
        await self._maybe_fail("Estimate", context)
        self.estimate_requests.append(request)
        rate = self.usd_per_second.get(request.backend, 0.0)
        return compute_pb2.EstimateResponse(
            estimate=common_pb2.Estimate(
                backend=request.backend,
                gpu="AMPERE_80",
                estimated_time_s=self.estimated_time_s,
                usd_per_second=rate,
                estimated_cost_usd=self.estimated_time_s * rate,
                parallel_jobs=self.parallel_jobs,
            )
        )


@dataclass
class ProviderHandle:
    servicer: ScriptedProvider
    address: str


@pytest.fixture
async def provider() -> AsyncIterator[ProviderHandle]:
    servicer = ScriptedProvider()
    server = grpc.aio.server()
    compute_pb2_grpc.add_ComputeProviderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield ProviderHandle(servicer, f"127.0.0.1:{port}")
    await server.stop(0)


def scheduler_settings(database_url: str, provider_address: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "scheduler_port": 0,
        "scheduler_metrics_port": -1,
        "hosted_provider": "local",
        "compute_local_addr": provider_address,
        "compute_runpod_addr": provider_address,
        "scheduler_poll_interval_s": 0.02,
        "scheduler_poll_max_interval_s": 0.2,
        "scheduler_retry_max_s": 0.2,
        "scheduler_db_check_interval_s": 0.1,
        "scheduler_job_gauges_interval_s": 0,
        "scheduler_provider_timeout_s": 5.0,
        "scheduler_shutdown_grace_s": 0.5,
        "scheduler_lease_s": 1.0,
    }
    values.update(overrides)
    return Settings.load(**values)


@dataclass
class RunningScheduler:
    app: SchedulerServer
    channel: grpc.aio.Channel
    stub: scheduler_pb2_grpc.SchedulerStub

    async def stop(self) -> None:
        await self.channel.close()
        await self.app.stop(0)


StartScheduler = Callable[..., Awaitable[RunningScheduler]]


@pytest.fixture
async def start(database_url: str, provider: ProviderHandle, tmp_path: Path) -> AsyncIterator[StartScheduler]:
    """Start a scheduler on the test database (settings overridable) and wait until it is ready;
    its artifact store is a directory under tmp_path."""
    running: list[RunningScheduler] = []

    async def _start(wait_ready: bool = True, **overrides: Any) -> RunningScheduler:
        dsn = overrides.pop("database_url", database_url)
        store = overrides.pop("store_settings", StoreSettings(url=str(tmp_path / "artifacts")))
        settings = scheduler_settings(dsn, provider.address, **overrides)
        app = await start_scheduler(settings, store)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        handle = RunningScheduler(app, channel, scheduler_pb2_grpc.SchedulerStub(channel))
        running.append(handle)
        if wait_ready:
            await asyncio.wait_for(app.ready.wait(), 20)
        return handle

    yield _start
    for handle in running:
        await handle.stop()


@pytest.fixture
async def scheduler(start: StartScheduler) -> RunningScheduler:
    return await start()


async def watch_all(
    stub: scheduler_pb2_grpc.SchedulerStub, user_id: str, job_id: str, after_seq: int = 0
) -> list[common_pb2.ProgressEvent]:
    """Every event from after_seq to the end of the stream."""
    request = scheduler_pb2.WatchJobRequest(user_id=user_id, job_id=job_id, after_seq=after_seq)
    return [event async for event in stub.WatchJob(request, timeout=20)]


async def until_submitted(servicer: ScriptedProvider, job_id: str, timeout_s: float = 10) -> ProviderJob:
    """The provider's job for ``job_id`` once a dispatcher has submitted it (submit only stores
    a job; the dispatcher sends it right after)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while job_id not in servicer.jobs:
        assert asyncio.get_running_loop().time() < deadline, f"job {job_id} was never submitted"
        await asyncio.sleep(0.02)
    return servicer.jobs[job_id]


@dataclass(frozen=True)
class Helpers:
    """Test helpers, handed out as a fixture (test modules cannot import conftest)."""

    good_key: str = GOOD_KEY
    spec_json: Callable[..., bytes] = spec_json
    progress_events: Callable[[int], list[dict[str, Any]]] = progress_events
    watch_all: Callable[..., Awaitable[list[common_pb2.ProgressEvent]]] = watch_all
    until_submitted: Callable[..., Awaitable[ProviderJob]] = until_submitted
    settings: Callable[..., Settings] = scheduler_settings
    plan: type[Plan] = Plan
    provider_job: type[ProviderJob] = ProviderJob


@pytest.fixture
def h() -> Helpers:
    return Helpers()
