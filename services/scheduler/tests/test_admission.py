"""Admission control: per-user limits counted in PostgreSQL at submit time, atomically."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from influence.v1 import common_pb2, scheduler_pb2

pytestmark = pytest.mark.timeout(60)


def submit(stub, user: str, spec: bytes, key: str = ""):
    return stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id=user, spec_json=spec, idempotency_key=key))


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def limits(usage: scheduler_pb2.Usage) -> dict[str, tuple[float, float]]:
    return {entry.name: (entry.used, entry.limit) for entry in usage.limits}


async def test_active_jobs_cap_is_atomic_and_named(start, provider, h) -> None:
    provider.servicer.plan = h.plan(hold_at=1)  # jobs stay running until released
    scheduler = await start(hosted_max_active_jobs=3, hosted_max_submissions_per_hour=0)
    results = await asyncio.gather(
        *(submit(scheduler.stub, "alice", h.spec_json()) for _ in range(8)), return_exceptions=True
    )
    accepted = [r for r in results if isinstance(r, scheduler_pb2.Job)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) == 3 and len(refused) == 5
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "You have 3 active (queued or running) jobs on the hosted backend; the limit is 3 per "
            "user. Wait for one to finish or cancel one."
        )
        retry_after = dict(error.trailing_metadata())["retry-after-s"]
        assert int(retry_after) >= 5
    # Another user is not affected; a resubmission with a known idempotency key is not refused.
    assert (await submit(scheduler.stub, "bob", h.spec_json())).id
    usage = await scheduler.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice"))
    assert usage.backend == "hosted" and limits(usage)["active_jobs"] == (3.0, 3.0)
    cancelled = await scheduler.stub.CancelJob(
        scheduler_pb2.CancelJobRequest(user_id="alice", job_id=accepted[0].id)
    )
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    assert (await submit(scheduler.stub, "alice", h.spec_json(), key="k1")).id
    again = await submit(scheduler.stub, "alice", h.spec_json(), key="k1")
    assert again.id and limits(await scheduler.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice")))[
        "active_jobs"
    ] == (3.0, 3.0)
    provider.servicer.plan.release.set()


async def test_hourly_submissions_and_monthly_gpu_seconds(start, provider, h) -> None:
    provider.servicer.plan = h.plan(hold_at=1)  # running jobs count their estimate (12 s here)
    scheduler = await start(hosted_max_active_jobs=0, hosted_max_submissions_per_hour=2)
    for _ in range(2):
        await submit(scheduler.stub, "alice", h.spec_json())
    error = await refusal(submit(scheduler.stub, "alice", h.spec_json()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "You made 2 hosted submissions in the last hour; the limit is 2 per hour."
    assert 3500 <= int(dict(error.trailing_metadata())["retry-after-s"]) <= 3600

    monthly = await start(
        hosted_max_active_jobs=0, hosted_max_submissions_per_hour=0, hosted_gpu_seconds_per_month=30
    )
    error = await refusal(submit(monthly.stub, "alice", h.spec_json()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details().startswith(
        "You have used 24 hosted GPU-seconds this month of the 30 allowed; this job's estimated"
    )
    assert "renews at the start of next month" in error.details()
    usage = limits(await monthly.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice")))
    assert usage["gpu_seconds_per_month"] == (24.0, 30.0)
    assert usage["submissions_per_hour"] == (2.0, 0.0)
    provider.servicer.plan.release.set()


async def test_gpu_seconds_count_the_actual_time_once_finished(start, h, database_url) -> None:
    import asyncpg

    scheduler = await start()
    job = await submit(scheduler.stub, "alice", h.spec_json())
    await h.watch_all(scheduler.stub, "alice", job.id)
    conn = await asyncpg.connect(database_url)
    try:
        # The ledger settled the job with the time it ran (well under 10 s here) ...
        ran = await conn.fetchval(
            "SELECT gpu_seconds FROM usage_ledger WHERE job_id = $1::uuid AND entry = 'settled'", job.id
        )
        assert 0 < ran < 10
        # ... as if it had run for 100 s.
        await conn.execute(
            "UPDATE usage_ledger SET gpu_seconds = 100 WHERE job_id = $1::uuid AND entry = 'settled'", job.id
        )
    finally:
        await conn.close()
    usage = limits(await scheduler.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice")))
    assert usage["gpu_seconds_per_month"] == (100.0, 36_000.0)


async def test_per_job_ceiling_is_422_naming_the_limit(start, h) -> None:
    scheduler = await start(hosted_max_job_time_s=1)
    error = await refusal(submit(scheduler.stub, "alice", h.spec_json()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the hosted tier's per-job limit of 1 s (HOSTED_MAX_JOB_TIME_S)" in error.details()
    jobs = await scheduler.stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice"))
    assert list(jobs.jobs) == []


async def test_byok_jobs_only_have_the_active_jobs_cap(start, provider, h) -> None:
    provider.servicer.plan = h.plan(hold_at=1)
    scheduler = await start(
        byok_max_active_jobs=2,
        hosted_max_submissions_per_hour=1,
        hosted_gpu_seconds_per_month=1,
        hosted_max_job_time_s=1,
    )
    await scheduler.stub.SetComputeBackend(
        scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod")
    )
    for _ in range(2):
        await submit(scheduler.stub, "alice", h.spec_json())
    error = await refusal(submit(scheduler.stub, "alice", h.spec_json()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 active (queued or running) jobs on the runpod backend; the limit is 2" in error.details()
    usage = await scheduler.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice"))
    assert usage.backend == "runpod" and set(limits(usage)) == {"active_jobs"}
    assert usage.max_job_time_s == 0
    provider.servicer.plan.release.set()
