"""The researcher's spend cap and the real cost of a job, through a real scheduler and a scripted
provider (issue 24, items 4 and 8)."""

from __future__ import annotations

import asyncio
import json

from influence.v1 import common_pb2, scheduler_pb2


async def wait_terminal(stub, job_id: str, timeout_s: float = 20) -> scheduler_pb2.Job:
    async with asyncio.timeout(timeout_s):
        while True:
            job = await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=job_id))
            if job.state in (
                common_pb2.JOB_STATE_COMPLETED,
                common_pb2.JOB_STATE_FAILED,
                common_pb2.JOB_STATE_CANCELLED,
            ):
                return job
            await asyncio.sleep(0.05)


async def test_a_running_job_that_reaches_its_cap_is_cancelled_in_plain_words(scheduler, provider, h):
    servicer = provider.servicer
    servicer.plan = h.plan(hold_at=1)  # runs until cancelled
    servicer.estimated_time_s, servicer.usd_per_second["hosted"] = 0.5, 1.0  # $0.50 estimated
    job = await scheduler.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json(), max_cost_usd=0.8)
    )
    assert job.max_cost_usd == 0.8
    ended = await wait_terminal(scheduler.stub, job.id)
    assert ended.state == common_pb2.JOB_STATE_CANCELLED
    assert servicer.cancel_calls == [job.id]
    assert ended.error.startswith("Cancelled at your spend cap: it had run ")
    assert "on AMPERE_80 at $1.000000/s" in ended.error and "reaching your cap of $0.8000" in ended.error
    # Priced at the time the scheduler saw it run (the cancelled call reported no timing).
    assert ended.actual.gpu_seconds >= 0.8
    assert ended.actual.source.startswith("run time as the scheduler saw it (cancelled at the spend cap)")
    events = await h.watch_all(scheduler.stub, "alice", job.id)
    assert json.loads(events[-1].event_json)["state"] == "cancelled"


async def test_a_provider_estimate_over_the_cap_is_never_submitted(scheduler, provider, h):
    servicer = provider.servicer
    servicer.estimated_time_s, servicer.usd_per_second["hosted"] = 10.0, 0.1  # $1.00 estimated
    job = await scheduler.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json(), max_cost_usd=0.5)
    )
    ended = await wait_terminal(scheduler.stub, job.id)
    assert ended.state == common_pb2.JOB_STATE_FAILED
    assert ended.error == "Not submitted: the local estimate is $1.0000, over your spend cap of $0.5000"
    assert servicer.submit_calls == []


async def test_a_finished_job_carries_the_providers_timing_priced(scheduler, provider, h):
    provider.servicer.plan = h.plan(usage_s=3.25)
    job = await scheduler.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json())
    )
    ended = await wait_terminal(scheduler.stub, job.id)
    assert ended.state == common_pb2.JOB_STATE_COMPLETED
    assert ended.estimated_gpu == "AMPERE_80"
    # compute-local's table prices its host at $0; the device "cpu" is not in it.
    assert (ended.actual.gpu_seconds, ended.actual.gpu, ended.actual.cost_usd) == (3.25, "host", 0.0)
    assert ended.actual.source.startswith("scripted timing; local price table of ")
