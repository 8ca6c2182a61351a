"""Job lifecycle through the real scheduler gRPC server, real PostgreSQL and a scripted provider."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import grpc
import pytest

import cost_model
from gpu_core.schemas import TINY_MODEL_ID
from influence.v1 import common_pb2, scheduler_pb2

pytestmark = pytest.mark.timeout(60)


def _seqs(events: list[common_pb2.ProgressEvent]) -> list[int]:
    return [event.seq for event in events]


async def test_submit_follows_events_and_stores_result(scheduler, provider, h, database_url):
    stub = scheduler.stub
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    # Stored and answered queued; the dispatcher submits it and the provider's estimate replaces
    # the admission one.
    assert job.state == common_pb2.JOB_STATE_QUEUED
    assert job.provider == "local" and job.compute_backend == "hosted"
    assert job.n_train == 2 and job.n_eval == 1

    events = await h.watch_all(stub, "alice", job.id)

    assert _seqs(events) == list(range(1, len(events) + 1))
    kinds = [(e.type, json.loads(e.event_json).get("state")) for e in events]
    assert kinds[0] == ("status", "submitted")
    assert events[0].stage == "waiting_for_gpu"
    assert [e.message for e in events if e.type == "progress"] == [f"step {i} of 5" for i in range(1, 6)]
    assert kinds[-1] == ("status", "completed")

    done = await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=job.id))
    assert done.state == common_pb2.JOB_STATE_COMPLETED
    assert done.estimated_time_s == 12.0
    assert done.progress == 1.0 and done.last_seq == events[-1].seq
    assert done.HasField("finished_at")
    assert json.loads(done.latest_metrics_json) == {
        "step": 5,
        "total_steps": 5,
        "loss": pytest.approx(1.6),
        "learning_rate": 2e-4,
        "eta_s": 1.0,
    }
    result = await stub.GetJobResult(scheduler_pb2.GetJobResultRequest(user_id="alice", job_id=job.id))
    assert json.loads(result.result_json)["job_id"] == job.id
    assert provider.servicer.submit_calls == [job.id]
    stored_spec = await stub.GetJobSpec(scheduler_pb2.GetJobSpecRequest(user_id="alice", job_id=job.id))
    assert json.loads(stored_spec.spec_json)["training_data"][0]["id"]

    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT runpod_job_id, provider_job_id, status FROM jobs")
    finally:
        await conn.close()
    assert row["status"] == "completed" and row["provider_job_id"] == f"p-{job.id}"
    assert row["runpod_job_id"] is None  # only filled for RunPod jobs


async def test_invalid_spec_names_the_field(scheduler, h):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.SubmitJob(
            scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json(training_data=[]))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training_data" in caught.value.details()
    jobs = await scheduler.stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice"))
    assert list(jobs.jobs) == []
    # A filter with a NUL (which PostgreSQL text cannot hold) matches nothing (the fuzzer's 503).
    filtered = await scheduler.stub.ListJobs(
        scheduler_pb2.ListJobsRequest(user_id="alice", tag="a\x00b", model_id="m\x00")
    )
    assert list(filtered.jobs) == []


async def test_idempotency_key_gives_one_job_also_concurrently(scheduler, provider, h):
    stub = scheduler.stub

    def request(key: str) -> scheduler_pb2.SubmitJobRequest:
        return scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json(), idempotency_key=key)

    first = await stub.SubmitJob(request("k-1"))
    again = await stub.SubmitJob(request("k-1"))
    assert again.id == first.id
    concurrent = await asyncio.gather(*(stub.SubmitJob(request("k-2")) for _ in range(6)))
    assert len({job.id for job in concurrent}) == 1
    assert concurrent[0].id != first.id

    listed = await stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice"))
    assert sorted(job.id for job in listed.jobs) == sorted([first.id, concurrent[0].id])
    await h.watch_all(stub, "alice", concurrent[0].id)
    assert sorted(provider.servicer.submit_calls) == sorted([first.id, concurrent[0].id])


async def test_another_users_job_is_not_found_everywhere(scheduler, provider, h):
    stub = scheduler.stub
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    await h.watch_all(stub, "alice", job.id)

    calls = [
        stub.GetJob(scheduler_pb2.GetJobRequest(user_id="bob", job_id=job.id)),
        stub.GetJobResult(scheduler_pb2.GetJobResultRequest(user_id="bob", job_id=job.id)),
        stub.GetJobSpec(scheduler_pb2.GetJobSpecRequest(user_id="bob", job_id=job.id)),
        stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="bob", job_id=job.id)),
        h.watch_all(stub, "bob", job.id),
        stub.GetJob(scheduler_pb2.GetJobRequest(user_id="bob", job_id="not-a-uuid")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="bob"))
    assert list(listed.jobs) == []
    still = await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=job.id))
    assert still.state == common_pb2.JOB_STATE_COMPLETED


async def test_restart_mid_job_loses_and_duplicates_nothing(start, provider, h):
    plan = h.plan(events=h.progress_events(8), hold_at=3)
    provider.servicer.plan = plan
    first = await start()
    job = await first.stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    seen = []
    stream = first.stub.WatchJob(scheduler_pb2.WatchJobRequest(user_id="alice", job_id=job.id), timeout=20)
    async for event in stream:
        seen.append(event)
        if event.type == "progress" and event.message == "step 3 of 8":
            break
    stream.cancel()
    await first.stop()

    plan.release.set()
    second = await start()
    rest = await h.watch_all(second.stub, "alice", job.id, after_seq=seen[-1].seq)
    everything = await h.watch_all(second.stub, "alice", job.id)

    assert _seqs(seen + rest) == list(range(1, len(everything) + 1))
    messages = [e.message for e in everything if e.type == "progress"]
    assert messages == [f"step {i} of 8" for i in range(1, 9)]
    assert json.loads(everything[-1].event_json) == {"type": "status", "state": "completed"}
    assert provider.servicer.submit_calls == [job.id]


async def test_watch_from_after_seq_then_live(scheduler, provider, h):
    plan = h.plan(events=h.progress_events(6), hold_at=2, chunk=1)
    provider.servicer.plan = plan
    stub = scheduler.stub
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    stream = stub.WatchJob(scheduler_pb2.WatchJobRequest(user_id="alice", job_id=job.id), timeout=20)
    early = []
    async for event in stream:
        early.append(event)
        if event.message == "step 2 of 6":
            break
    stream.cancel()

    # A second watcher from after_seq=2 gets the stored events 3 and 4, then live ones.
    watcher = stub.WatchJob(
        scheduler_pb2.WatchJobRequest(user_id="alice", job_id=job.id, after_seq=2), timeout=20
    )
    stored = [await watcher.read(), await watcher.read()]
    assert _seqs(stored) == [3, 4]
    plan.release.set()
    live = []
    while (event := await watcher.read()) is not grpc.aio.EOF:
        live.append(event)
    tail = stored + live
    assert _seqs(early[:2] + tail) == list(range(1, len(tail) + 3))
    assert [e.message for e in live if e.type == "progress"] == [f"step {i} of 6" for i in range(3, 7)]
    assert json.loads(tail[-1].event_json)["state"] == "completed"


async def test_provider_unavailable_then_recovery(scheduler, provider, h):
    unavailable = (grpc.StatusCode.UNAVAILABLE, "connection refused")
    provider.servicer.fail_next = {"Submit": [unavailable] * 2, "GetStatus": [unavailable] * 3}
    stub = scheduler.stub
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    assert job.state == common_pb2.JOB_STATE_QUEUED

    events = await h.watch_all(stub, "alice", job.id)
    assert json.loads(events[-1].event_json)["state"] == "completed"
    assert _seqs(events) == list(range(1, len(events) + 1))
    assert provider.servicer.submit_calls == [job.id]
    assert provider.servicer.fail_next == {"Submit": [], "GetStatus": []}


async def test_provider_refusals_fail_the_job_with_the_plain_message(scheduler, provider, h):
    stub = scheduler.stub
    low_balance = "Your RunPod balance is $0.20; this job is estimated at $0.50"
    provider.servicer.fail_next = {"Submit": [(grpc.StatusCode.FAILED_PRECONDITION, low_balance)]}
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    events = await h.watch_all(stub, "alice", job.id)
    assert json.loads(events[-1].event_json) == {"type": "status", "state": "failed", "error": low_balance}
    refused = await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=job.id))
    assert refused.state == common_pb2.JOB_STATE_FAILED and refused.error == low_balance
    assert provider.servicer.submit_calls == []  # refused once, never sent again

    provider.servicer.plan = h.plan(outcome="fail", error="CUDA out of memory: pick a bigger GPU")
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    events = await h.watch_all(stub, "alice", job.id)
    assert json.loads(events[-1].event_json)["error"] == "CUDA out of memory: pick a bigger GPU"
    failed = await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=job.id))
    assert failed.state == common_pb2.JOB_STATE_FAILED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetJobResult(scheduler_pb2.GetJobResultRequest(user_id="alice", job_id=job.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancel_stops_the_job_at_the_provider(scheduler, provider, h):
    provider.servicer.plan = h.plan(hold_at=1)
    stub = scheduler.stub
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    await h.until_submitted(provider.servicer, job.id)
    # Until the dispatcher has stored the provider's answer a cancel reaches the provider later
    # (the dispatcher cancels what it submitted meanwhile); this test is about the direct path.
    while (await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=job.id))).state == (
        common_pb2.JOB_STATE_QUEUED
    ):
        await asyncio.sleep(0.02)
    cancelled = await stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="alice", job_id=job.id))
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    assert provider.servicer.cancel_calls == [job.id]
    events = await h.watch_all(stub, "alice", job.id)
    assert json.loads(events[-1].event_json)["state"] == "cancelled"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetJobResult(scheduler_pb2.GetJobResultRequest(user_id="alice", job_id=job.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancelled" in caught.value.details()


async def test_cancel_during_the_submit_cancels_at_the_provider_once_it_answers(scheduler, provider, h):
    provider.servicer.gate = asyncio.Event()  # the submit is in flight and unanswered
    stub = scheduler.stub
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    await asyncio.sleep(0.3)
    cancelled = await stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="alice", job_id=job.id))
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    provider.servicer.gate.set()
    await h.until_submitted(provider.servicer, job.id)
    deadline = asyncio.get_running_loop().time() + 10
    while provider.servicer.cancel_calls != [job.id]:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert provider.servicer.jobs[job.id].cancelled


async def test_runpod_endpoint_created_once_for_concurrent_first_jobs(scheduler, provider, h):
    stub = scheduler.stub
    await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="carol", backend="runpod"))
    jobs = await asyncio.gather(
        *(
            stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="carol", spec_json=h.spec_json()))
            for _ in range(2)
        )
    )
    for job in jobs:
        await h.until_submitted(provider.servicer, job.id)
    assert provider.servicer.endpoints_created == 1
    # The pool is chosen by the spec's model: its id, and its size from the cost model's catalog.
    prepared = provider.servicer.prepare_requests[-1]
    assert prepared.model_id == TINY_MODEL_ID  # the spec's default
    assert prepared.model_params_b == cost_model.lookup_model(TINY_MODEL_ID).params_b > 0
    assert prepared.runpod_gpu == ""  # no choice: the fitting pools within the price band
    settings = await stub.GetComputeSettings(scheduler_pb2.GetComputeSettingsRequest(user_id="carol"))
    assert (settings.runpod_endpoint_id, settings.endpoint_status) == ("ep-1", "ready")
    for job in jobs:
        assert job.provider == "runpod" and job.compute_backend == "runpod"
        account = provider.servicer.jobs[job.id].account
        assert (account.user_id, account.endpoint_id, account.hosted) == ("carol", "ep-1", False)
        await h.watch_all(stub, "carol", job.id)

    # RunPod no longer has the stored endpoint: the scheduler asks for a new one, once; the job's
    # GPU pool, chosen in its spec, goes with it (issue 24 item 7).
    provider.servicer.endpoints.clear()
    pinned = h.spec_json(runpod_gpu="AMPERE_24")
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="carol", spec_json=pinned))
    await h.until_submitted(provider.servicer, job.id)
    assert provider.servicer.endpoints_created == 2
    assert provider.servicer.prepare_requests[-1].runpod_gpu == "AMPERE_24"
    assert provider.servicer.jobs[job.id].account.endpoint_id == "ep-2"
    settings = await stub.GetComputeSettings(scheduler_pb2.GetComputeSettingsRequest(user_id="carol"))
    assert settings.runpod_endpoint_id == "ep-2"
    await h.watch_all(stub, "carol", job.id)

    # Settings sees the endpoint as RunPod reports it: live; without a key, unknown (not asked).
    def endpoint_of(key_stored: bool):
        return stub.GetRunpodEndpoint(
            scheduler_pb2.RunpodEndpointRequest(user_id="carol", key_stored=key_stored)
        )

    assert ((await endpoint_of(True)).state, (await endpoint_of(True)).endpoint_id) == ("live", "ep-2")
    assert ((await endpoint_of(False)).state, (await endpoint_of(False)).endpoint_id) == ("unknown", "ep-2")
    # Deleted in RunPod's console: reported gone once, then forgotten (nothing calls it ready).
    provider.servicer.endpoints.clear()
    assert (await endpoint_of(True)).state == "gone"
    settings = await stub.GetComputeSettings(scheduler_pb2.GetComputeSettingsRequest(user_id="carol"))
    assert (settings.runpod_endpoint_id, settings.endpoint_status) == ("", "none")
    assert (await endpoint_of(True)).state == "none"
    # Deleted from Settings: RunPod deletes it, the profile forgets it.
    provider.servicer.endpoints.add("ep-9")
    await scheduler.app.require()[1].set_endpoint("carol", "ep-9", "ready")
    await stub.DeleteRunpodEndpoint(scheduler_pb2.RunpodEndpointRequest(user_id="carol", key_stored=True))
    assert "ep-9" not in provider.servicer.endpoints
    settings = await stub.GetComputeSettings(scheduler_pb2.GetComputeSettingsRequest(user_id="carol"))
    assert (settings.runpod_endpoint_id, settings.endpoint_status) == ("", "none")


async def test_hosted_tier_on_runpod_uses_the_operators_account(start, provider, h):
    running = await start(hosted_provider="runpod", compute_local_addr="")
    job = await running.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="dave", spec_json=h.spec_json())
    )
    assert job.provider == "runpod" and job.compute_backend == "hosted"
    account = (await h.until_submitted(provider.servicer, job.id)).account
    assert account.hosted and account.endpoint_id == ""
    assert provider.servicer.endpoints_created == 0


@pytest.mark.parametrize("hosted_provider", ["runpod", "modal"])
async def test_a_sharded_experiment_on_a_remote_provider_needs_a_store_its_workers_reach(
    start, provider, h, s3_server, hosted_provider
):
    """Its jobs pass their files through the store: with the local directory (which RunPod's and
    Modal's workers cannot reach) N > 1 is refused before anything is stored; with an S3 store the
    scheduler signs URLs for, it is accepted."""
    sharded = json.loads(h.spec_json(hyperparams={"epochs": 1, "batch_size": 1}))
    sharded["influence_method"], sharded["influence"] = "trackstar", {"shards": 2}
    request = scheduler_pb2.SubmitJobRequest(user_id="sam", spec_json=json.dumps(sharded).encode())
    local = await start(hosted_provider=hosted_provider, compute_modal_addr=provider.address)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await local.stub.SubmitJob(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"influence.shards: a sharded experiment on {hosted_provider} passes its files" in (
        refused.value.details()
    )
    listed = await local.stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="sam"))
    assert list(listed.jobs) == []
    await local.stop()
    remote = await start(
        hosted_provider=hosted_provider,
        compute_modal_addr=provider.address,
        store_settings=s3_server.store_settings(prefix=f"shards-{hosted_provider}"),
    )
    accepted = await remote.stub.SubmitJob(request)
    assert accepted.shards == 2
    await remote.stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="sam", job_id=accepted.id))


async def test_unconfigured_provider_is_failed_precondition(start, h):
    running = await start(hosted_provider="modal")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="erin", spec_json=h.spec_json()))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "COMPUTE_MODAL_ADDR" in caught.value.details()
    estimates = await running.stub.EstimateJob(
        scheduler_pb2.EstimateJobRequest(user_id="erin", spec_json=h.spec_json())
    )
    assert [e.backend for e in estimates.estimates] == ["runpod"]
    assert any("hosted" in note and "modal" in note for note in estimates.notes)
