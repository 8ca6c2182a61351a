"""The money path (issue 22): submit only stores the job; one dispatcher submits it exactly once,
also when a replica is lost before, during or after the provider call; a provider that keeps
refusing fails the job in plain words; usage is a ledger that deleting a job does not refund."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import grpc
import pytest

from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc, scheduler_pb2

pytestmark = pytest.mark.timeout(60)


async def _wait_for(
    conn: asyncpg.Connection, query: str, *args: object, timeout_s: float = 15
) -> asyncpg.Record:
    deadline = time.monotonic() + timeout_s
    while True:
        row = await conn.fetchrow(query, *args)
        if row is not None:
            return row
        assert time.monotonic() < deadline, query
        await asyncio.sleep(0.05)


async def test_submit_answers_at_once_while_the_provider_does_not(scheduler, provider, h):
    provider.servicer.gate = asyncio.Event()  # the provider answers nothing
    began = time.perf_counter()
    jobs = await asyncio.gather(
        *(
            scheduler.stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id=f"u{i}", spec_json=h.spec_json()))
            for i in range(5)
        )
    )
    assert time.perf_counter() - began < 2.0
    assert {job.state for job in jobs} == {common_pb2.JOB_STATE_QUEUED}
    assert provider.servicer.submit_calls == []
    provider.servicer.gate.set()
    for job in jobs:
        events = await h.watch_all(scheduler.stub, job.user_id, job.id)
        assert json.loads(events[-1].event_json)["state"] == "completed"
    assert sorted(provider.servicer.submit_calls) == sorted(job.id for job in jobs)


async def _abandon(conn: asyncpg.Connection, job_id: str, **columns: object) -> None:
    """As if the replica holding the job had been killed: its lease runs out, the row stays as
    that replica left it."""
    sets = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(columns))
    await conn.execute(
        f"""UPDATE jobs SET lease_owner = 'replica-killed', lease_expires_at = now() - interval '1 second'
            {", " + sets if sets else ""} WHERE id = $1::uuid""",
        job_id,
        *columns.values(),
    )


@pytest.mark.parametrize("killed", ["before the call", "during the call", "after the call"])
async def test_a_replica_killed_around_the_provider_call_leaves_one_provider_job(
    start, provider, h, database_url, killed
):
    provider.servicer.gate = asyncio.Event()  # replica-a's submit never gets an answer
    doomed = await start(scheduler_replica_id="replica-a")
    job = await doomed.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json())
    )
    conn = await asyncpg.connect(database_url)
    try:
        # replica-a wrote the submit token, then waits on the provider: the submitting state.
        await _wait_for(conn, "SELECT 1 FROM jobs WHERE id = $1::uuid AND submit_token IS NOT NULL", job.id)
        await doomed.stop()  # its dispatcher dies mid-call: nothing after the token is written
        if killed == "during the call":
            # The provider took the job; its answer never reached the dead replica.
            provider.servicer.gate.set()
            await _submit_directly(provider, job.id)
        elif killed == "after the call":
            provider.servicer.gate.set()
            provider_job_id = await _submit_directly(provider, job.id)
            await conn.execute(
                "UPDATE jobs SET provider_job_id = $2, status = 'submitted' WHERE id = $1::uuid",
                job.id,
                provider_job_id,
            )
        await _abandon(conn, job.id)
        provider.servicer.gate.set()
        survivor = await start(scheduler_replica_id="replica-b")
        events = await h.watch_all(survivor.stub, "alice", job.id)
        assert json.loads(events[-1].event_json)["state"] == "completed"
        seqs = [event.seq for event in events]
        assert seqs == list(range(1, len(seqs) + 1))
    finally:
        await conn.close()
    assert list(provider.servicer.jobs) == [job.id]
    assert provider.servicer.submit_calls == [job.id]


async def _submit_directly(provider, job_id: str) -> str:
    """What the provider keeps of a Submit whose caller died: the job, by our job id."""
    channel = grpc.aio.insecure_channel(provider.address)
    try:
        stub = compute_pb2_grpc.ComputeProviderStub(channel)
        answer = await stub.Submit(
            compute_pb2.SubmitRequest(job_id=job_id, account=common_pb2.Account(user_id="alice", hosted=True))
        )
        return answer.provider_job_id
    finally:
        await channel.close()


async def test_a_live_lease_of_this_replica_is_not_claimed_twice(start, provider, h, database_url):
    """The lease loop claims only leases that ran out: a job this replica is submitting is not
    handed to a second dispatcher (one Submit call, not two)."""
    provider.servicer.gate = asyncio.Event()
    running = await start(scheduler_replica_id="replica-a", scheduler_lease_s=0.3)
    job = await running.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json())
    )
    await asyncio.sleep(1.5)  # several lease turns while the submit hangs
    assert running.app.require()[0].dispatcher.held == {job.id}
    provider.servicer.gate.set()
    events = await h.watch_all(running.stub, "alice", job.id)
    assert json.loads(events[-1].event_json)["state"] == "completed"
    assert provider.servicer.submit_calls == [job.id]


async def test_a_provider_that_keeps_refusing_status_fails_the_job_in_plain_words(start, provider, h):
    running = await start(scheduler_poll_max_failures=3)
    refusal = (grpc.StatusCode.FAILED_PRECONDITION, "no RunPod API key is stored for this user")
    provider.servicer.fail_next["GetStatus"] = [refusal] * 10
    job = await running.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json())
    )
    events = await h.watch_all(running.stub, "alice", job.id)
    last = json.loads(events[-1].event_json)
    assert last["state"] == "failed"
    assert "local provider refused to report on this job 3 times" in last["error"]
    assert "FAILED_PRECONDITION" in last["error"] and "no RunPod API key" in last["error"]
    assert len(provider.servicer.fail_next["GetStatus"]) == 7  # three tries, then no more


async def test_deleting_a_completed_job_refunds_no_usage(scheduler, provider, h):
    stub = scheduler.stub
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="dora", spec_json=h.spec_json()))
    await h.watch_all(stub, "dora", job.id)
    before = await stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="dora"))
    await stub.DeleteJob(scheduler_pb2.DeleteJobRequest(user_id="dora", job_id=job.id))
    after = await stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="dora"))
    used = {limit.name: limit.used for limit in before.limits}
    assert used["submissions_per_hour"] == 1
    assert {limit.name: limit.used for limit in after.limits} == used


async def test_active_jobs_of_a_backend_are_listed(scheduler, provider, h):
    stub = scheduler.stub
    provider.servicer.plan = h.plan(hold_at=1)
    await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="erin", backend="runpod"))
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="erin", spec_json=h.spec_json()))
    active = await stub.ListActiveJobs(scheduler_pb2.ListActiveJobsRequest(user_id="erin", backend="runpod"))
    assert [j.id for j in active.jobs] == [job.id]
    hosted = await stub.ListActiveJobs(scheduler_pb2.ListActiveJobsRequest(user_id="erin", backend="hosted"))
    assert list(hosted.jobs) == []
    await stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="erin", job_id=job.id))
    active = await stub.ListActiveJobs(scheduler_pb2.ListActiveJobsRequest(user_id="erin", backend="runpod"))
    assert list(active.jobs) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListActiveJobs(scheduler_pb2.ListActiveJobsRequest(user_id="erin", backend="gpu"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
