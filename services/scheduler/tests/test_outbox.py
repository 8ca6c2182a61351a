"""The money path (issue 22): submit only stores the job; one dispatcher submits it exactly once,
also when a replica is lost before, during or after the provider call; a provider that keeps
refusing fails the job in plain words; usage is a ledger that deleting a job does not refund."""

from __future__ import annotations

import asyncio
import json
import os
import time

import asyncpg
import grpc
import httpx
import pytest

from artifact_store import job_key, job_prefix, open_store
from gpu_core.uploads import CLAIM_NAME, RESULT_NAME, claim_job, presigned_expiry
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


async def _runpod_job(running, h) -> scheduler_pb2.Job:
    await running.stub.SetComputeBackend(
        scheduler_pb2.SetComputeBackendRequest(user_id="rita", backend="runpod")
    )
    return await running.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="rita", spec_json=h.spec_json())
    )


def _claim_through_its_url(request: compute_pb2.SubmitRequest, provider_job_id: str) -> bool:
    """What RunPod's worker does first: claim our job id through the presigned URL it got."""
    urls = {upload.name: upload.url for upload in request.artifact_uploads}
    claim = {
        "job_id": request.job_id,
        "provider": "runpod",
        "provider_job_id": provider_job_id,
        "claimed_at": 1.0,
    }
    return claim_job(urls[CLAIM_NAME], claim)


async def test_a_lost_runpod_answer_is_not_sent_again_but_adopted_from_the_workers_claim(
    start, provider, h, s3_server, database_url
):
    running = await start(store_settings=s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}"))
    provider.servicer.lose_answers = 1
    job = await _runpod_job(running, h)
    taken = await h.until_submitted(provider.servicer, job.id)
    await asyncio.sleep(1.0)  # many dispatcher turns: none sends it again
    assert provider.servicer.submit_received == 1
    dispatcher = running.app.require()[0].dispatcher
    # Waiting for a claim (possibly for hours) takes no claiming room from queued jobs.
    assert dispatcher.held == {job.id} and dispatcher.free() == 2 * 8
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT status, provider_job_id, stage_message FROM jobs WHERE id = $1::uuid", job.id
        )
    finally:
        await conn.close()
    assert (row["status"], row["provider_job_id"]) == ("queued", None)
    assert "RunPod may have received this job" in row["stage_message"]
    assert await asyncio.to_thread(
        _claim_through_its_url, provider.servicer.submit_requests[0], taken.provider_job_id
    )
    events = await h.watch_all(running.stub, "rita", job.id)
    assert json.loads(events[-1].event_json)["state"] == "completed"
    assert provider.servicer.submit_received == 1


async def test_a_lost_runpod_answer_with_no_claim_is_sent_again_only_after_its_urls_expired(
    start, provider, h, s3_server
):
    running = await start(
        store_settings=s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}"),
        scheduler_upload_url_ttl_s=2,
        scheduler_claim_margin_s=0.5,
    )
    provider.servicer.lose_answers = 1
    began = time.monotonic()
    job = await _runpod_job(running, h)
    await h.until_submitted(provider.servicer, job.id)
    events = await h.watch_all(running.stub, "rita", job.id)
    assert json.loads(events[-1].event_json)["state"] == "completed"
    # RunPod dropped the first /run unrun (no worker claimed it before its claim URL expired):
    # one more submit, with fresh URLs, not before the first URLs' life and the margin.
    assert provider.servicer.submit_received == 2
    assert time.monotonic() - began >= 2.5


@pytest.mark.parametrize("killed", ["before the call", "during the call"])
async def test_a_runpod_submit_taken_over_adopts_the_claim_or_sends_only_when_none_was_sent(
    start, provider, h, s3_server, database_url, killed
):
    store_settings = s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    provider.servicer.gate = asyncio.Event()  # replica-a's submit never gets an answer
    provider.servicer.gated = ("Submit",)
    doomed = await start(scheduler_replica_id="replica-a", store_settings=store_settings)
    job = await _runpod_job(doomed, h)
    conn = await asyncpg.connect(database_url)
    try:
        await _wait_for(conn, "SELECT 1 FROM jobs WHERE id = $1::uuid AND submit_sent_at IS NOT NULL", job.id)
        await doomed.stop()
        provider.servicer.gate = None  # the dead replica's call stays stuck at the old gate
        if killed == "before the call":
            await conn.execute("UPDATE jobs SET submit_sent_at = NULL WHERE id = $1::uuid", job.id)
        else:
            # RunPod took the job and its worker claimed it; the answer died with replica-a.
            provider_job_id = await _submit_directly(provider, job.id)
            request = compute_pb2.SubmitRequest(job_id=job.id)
            request.artifact_uploads.extend(await _fresh_uploads(store_settings, job.id))
            assert await asyncio.to_thread(_claim_through_its_url, request, provider_job_id)
        received = provider.servicer.submit_received
        await _abandon(conn, job.id)
        survivor = await start(scheduler_replica_id="replica-b", store_settings=store_settings)
        events = await h.watch_all(survivor.stub, "rita", job.id)
        assert json.loads(events[-1].event_json)["state"] == "completed"
    finally:
        await conn.close()
    assert provider.servicer.submit_received - received == (1 if killed == "before the call" else 0)
    assert list(provider.servicer.jobs) == [job.id]


async def _fresh_uploads(store_settings, job_id: str) -> list[compute_pb2.ArtifactUpload]:
    store = open_store(store_settings)
    return [
        compute_pb2.ArtifactUpload(
            name=CLAIM_NAME, url=await store.presigned_url("PUT", job_key(job_id, CLAIM_NAME), 60)
        )
    ]


async def _put(store_settings, job_id: str, name: str, body: dict) -> None:
    async def chunks():
        yield json.dumps(body).encode()

    await open_store(store_settings).put(job_key(job_id, name), chunks())


async def test_a_duplicate_delivery_switches_to_the_job_that_claimed_it(
    start, provider, h, s3_server, database_url
):
    store_settings = s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    running = await start(store_settings=store_settings)
    # The RunPod job we know of was a second delivery: it found the claim and ran nothing.
    provider.servicer.plan = h.plan(
        outcome="fail", error="Duplicate delivery: job already claimed by p-claimant"
    )
    provider.servicer.gate = asyncio.Event()
    job = await _runpod_job(running, h)
    claim = {"job_id": job.id, "provider": "runpod", "provider_job_id": "p-claimant", "claimed_at": 1.0}
    await _put(store_settings, job.id, CLAIM_NAME, claim)
    provider.servicer.other_runs["p-claimant"] = h.provider_job(
        job.id, "p-claimant", common_pb2.Account(), h.plan()
    )
    provider.servicer.gate.set()
    events = await h.watch_all(running.stub, "rita", job.id)
    assert json.loads(events[-1].event_json)["state"] == "completed"
    conn = await asyncpg.connect(database_url)
    try:
        assert (
            await conn.fetchval("SELECT provider_job_id FROM jobs WHERE id = $1::uuid", job.id)
            == "p-claimant"
        )
    finally:
        await conn.close()
    assert provider.servicer.submit_received == 1


async def test_a_result_runpod_forgot_is_collected_from_the_store(start, provider, h, s3_server):
    store_settings = s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    running = await start(store_settings=store_settings)
    provider.servicer.plan = h.plan(waiting_polls=10_000)  # in the queue until RunPod forgets it
    job = await _runpod_job(running, h)
    await h.until_submitted(provider.servicer, job.id)
    # The worker ran it and left its result in the store; RunPod's retention then ended.
    await _put(
        store_settings,
        job.id,
        RESULT_NAME,
        {"job_id": job.id, "influence": {"scores": [[0.75]]}, "paid": True},
    )
    del provider.servicer.jobs[job.id]
    events = await h.watch_all(running.stub, "rita", job.id)
    assert json.loads(events[-1].event_json)["state"] == "completed"
    result = await running.stub.GetJobResult(scheduler_pb2.GetJobResultRequest(user_id="rita", job_id=job.id))
    assert json.loads(result.result_json)["paid"] is True


async def test_a_forgotten_job_with_no_stored_result_fails_in_plain_words(start, provider, h, s3_server):
    running = await start(store_settings=s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}"))
    provider.servicer.plan = h.plan(waiting_polls=10_000)
    job = await _runpod_job(running, h)
    taken = await h.until_submitted(provider.servicer, job.id)
    # A worker took it (its claim), then RunPod forgot it with no result stored: it ran, so it
    # is not sent again.
    assert _claim_through_its_url(provider.servicer.submit_requests[-1], taken.provider_job_id)
    del provider.servicer.jobs[job.id]
    events = await h.watch_all(running.stub, "rita", job.id)
    last = json.loads(events[-1].event_json)
    assert last["state"] == "failed" and "runpod provider no longer knows this job" in last["error"]
    assert provider.servicer.submit_calls == [job.id]


# The case: the store answers 503 for 10 s while a finished job's files are verified.
_STORE_OUTAGE_S = 10.0


@pytest.mark.parametrize("store_deadline_s", [60.0, 1.0])
async def test_a_store_outage_during_verification_deletes_nothing(
    start, provider, h, s3_server, store_deadline_s
):
    """The outage starts before the job finishes and the test ends it: after 10 s in which the
    follower's checks were refused (the job completes), or once the job has failed past a
    store deadline shorter than the outage. No timing of the machine decides which happens."""
    store_settings = s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    running = await start(
        store_settings=store_settings,
        scheduler_verify_deadline_s=0.3,
        scheduler_store_deadline_s=store_deadline_s,
    )
    provider.servicer.plan = h.plan(artifacts={"scores.npy": b"matrix"}, hold_at=1)
    job = await _runpod_job(running, h)
    taken = await h.until_submitted(provider.servicer, job.id)

    async def chunks():
        yield b"matrix"

    store = open_store(store_settings)
    await store.put(job_key(job.id, "scores.npy"), chunks())  # the worker's upload
    refused_before = s3_server.faults.refused
    s3_server.outage()
    began = time.monotonic()
    taken.plan.release.set()
    try:
        if store_deadline_s > _STORE_OUTAGE_S:
            async with asyncio.timeout(_STORE_OUTAGE_S + 20):
                refused = lambda: s3_server.faults.refused > refused_before  # noqa: E731
                while not refused() or time.monotonic() - began < _STORE_OUTAGE_S:
                    await asyncio.sleep(0.1)
            waiting = await running.stub.GetJob(scheduler_pb2.GetJobRequest(user_id="rita", job_id=job.id))
            assert waiting.state == common_pb2.JOB_STATE_RUNNING, waiting  # each check gave up after 0.3 s
            s3_server.end_outage()
            last = json.loads((await h.watch_all(running.stub, "rita", job.id))[-1].event_json)
            assert last["state"] == "completed"
        else:
            last = json.loads((await h.watch_all(running.stub, "rita", job.id))[-1].event_json)
            assert last["state"] == "failed"
            assert "the artifact store could not be reached to check the job's files" in last["error"]
            assert "left in place" in last["error"]
            assert s3_server.faults.refused > refused_before
    finally:
        s3_server.end_outage()
    keys = {info.key for info in await store.list(job_prefix(job.id))}
    assert job_key(job.id, "scores.npy") in keys


async def test_a_job_that_queued_past_its_upload_urls_is_sent_again_and_uploads(
    start, provider, h, s3_server
):
    """A BYOK job waits in RunPod's queue longer than its first upload URLs live (shortened to
    2 s): RunPod drops it unrun at its ttl (kept within the URLs' life), no worker claimed it, so
    once the URLs have expired it is sent again with fresh ones, and its worker uploads with those."""
    store_settings = s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    running = await start(
        store_settings=store_settings, scheduler_upload_url_ttl_s=2, scheduler_claim_margin_s=0.5
    )
    provider.servicer.plan = h.plan(waiting_polls=10_000)  # no worker takes it
    job = await _runpod_job(running, h)
    await h.until_submitted(provider.servicer, job.id)
    first = {upload.name: upload.url for upload in provider.servicer.submit_requests[-1].artifact_uploads}
    provider.servicer.plan = h.plan(artifacts={"scores.npy": b"matrix"})  # the next delivery runs
    del provider.servicer.jobs[job.id]  # RunPod's ttl ended while it queued: dropped, never run
    async with asyncio.timeout(30):
        while len(provider.servicer.submit_calls) < 2:
            await asyncio.sleep(0.05)
    assert presigned_expiry(first["scores.npy"]) <= time.time()  # sent again only once they lapsed
    fresh = {upload.name: upload.url for upload in provider.servicer.submit_requests[-1].artifact_uploads}
    assert set(fresh) == set(first) and presigned_expiry(fresh["scores.npy"]) > time.time()
    async with httpx.AsyncClient() as http:  # the worker's upload, through the fresh URL
        (await http.put(fresh["scores.npy"], content=b"matrix")).raise_for_status()
    events = [json.loads(e.event_json) for e in await h.watch_all(running.stub, "rita", job.id)]
    assert events[-1]["state"] == "completed"
    assert any("dropped this job from its queue" in str(e.get("message", "")) for e in events)
    assert provider.servicer.submit_calls == [job.id, job.id]
    assert {info.key for info in await open_store(store_settings).list(job_prefix(job.id))} == {
        job_key(job.id, "scores.npy")
    }
