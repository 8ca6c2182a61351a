"""Later jobs of an experiment (a counterfactual check) through the real scheduler, real
PostgreSQL and the scripted provider: routed to the experiment's backend with its stored spec and
result, refused (with the field named) until they fit, and listed under their experiment."""

from __future__ import annotations

import asyncio
import json
import os

import asyncpg
import grpc
import pytest

from benchmarks.planted import stand_in_result
from gpu_core.uploads import CLAIM_READ_NAME, WORKER_RECORD_NAMES
from influence.v1 import scheduler_pb2

pytestmark = pytest.mark.timeout(60)

CHECK = {"k": 1, "controls": 2}


async def completed_experiment(scheduler, h, database_url) -> tuple[str, dict, dict]:
    stub = scheduler.stub
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    await h.watch_all(stub, "alice", job.id)
    spec = json.loads(
        (await stub.GetJobSpec(scheduler_pb2.GetJobSpecRequest(user_id="alice", job_id=job.id))).spec_json
    )
    result = stand_in_result(spec)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE jobs SET result = $1::jsonb WHERE id = $2::uuid", json.dumps(result), job.id
        )
    finally:
        await conn.close()
    return job.id, spec, result


def check_request(
    parent: str, user: str = "alice", key: str = "", **request
) -> scheduler_pb2.SubmitJobRequest:
    return scheduler_pb2.SubmitJobRequest(
        user_id=user,
        kind="counterfactual",
        parent_job_id=parent,
        request_json=json.dumps(request or CHECK).encode(),
        idempotency_key=key,
    )


async def test_a_check_runs_on_the_experiments_backend_with_its_spec_and_result(
    scheduler, provider, h, database_url
):
    stub = scheduler.stub
    parent, spec, result = await completed_experiment(scheduler, h, database_url)
    # The profile's backend changes afterwards: the check still goes where the experiment ran.
    await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod"))

    estimate = await stub.EstimateJob(
        scheduler_pb2.EstimateJobRequest(
            user_id="alice",
            kind="counterfactual",
            parent_job_id=parent,
            request_json=json.dumps(CHECK).encode(),
        )
    )
    assert estimate.active_backend == "hosted" and [e.backend for e in estimate.estimates] == ["hosted"]
    asked = provider.servicer.estimate_requests[-1]
    assert asked.kind == "counterfactual" and json.loads(asked.request_json)["controls"] == 2
    assert json.loads(asked.spec_json) == spec

    check = await stub.SubmitJob(check_request(parent, key="k1"))
    again = await stub.SubmitJob(check_request(parent, key="k1"))
    assert again.id == check.id
    assert check.kind == "counterfactual" and check.parent_job_id == parent
    assert check.compute_backend == "hosted" and check.provider == "local"
    assert json.loads(check.request_json) == {
        "eval_ids": None,
        "k": 1,
        "remove": "helpful",
        "controls": 2,
        "lds_subsets": 0,
        "lds_fraction": 0.5,
        "seed": 0,
    }
    await h.until_submitted(provider.servicer, check.id)
    sent = provider.servicer.submit_requests[-1]
    assert sent.job_id == check.id and sent.kind == "counterfactual"
    assert json.loads(sent.spec_json) == spec
    assert json.loads(sent.parent_result_json) == result
    assert json.loads(sent.request_json)["k"] == 1

    events = await h.watch_all(stub, "alice", check.id)
    assert json.loads(events[-1].event_json)["state"] == "completed"
    listed = await stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice", parent_job_id=parent))
    assert [job.id for job in listed.jobs] == [check.id]
    experiments = await stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice"))
    assert [job.id for job in experiments.jobs] == [parent]
    # A check of a check is not a thing.
    with pytest.raises(grpc.aio.AioRpcError) as nested:
        await stub.SubmitJob(check_request(check.id))
    assert nested.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parent_job_id: that job is a counterfactual job" in nested.value.details()


async def test_checks_that_do_not_fit_are_refused_before_anything_is_stored(
    scheduler, provider, h, database_url
):
    stub = scheduler.stub
    provider.servicer.plan = h.plan(hold_at=1)
    running = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    with pytest.raises(grpc.aio.AioRpcError) as not_done:
        await stub.SubmitJob(check_request(running.id))
    assert not_done.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs a completed experiment" in not_done.value.details()
    provider.servicer.plan.release.set()
    await h.watch_all(stub, "alice", running.id)
    provider.servicer.plan = h.plan()

    parent, _spec, _result = await completed_experiment(scheduler, h, database_url)
    cases = [
        (check_request(parent, user="bob"), grpc.StatusCode.NOT_FOUND, "job not found"),
        (check_request("not-a-job"), grpc.StatusCode.NOT_FOUND, "job not found"),
        (check_request(parent, k=0), grpc.StatusCode.INVALID_ARGUMENT, "k: Input should be greater"),
        (check_request(parent, eval_ids=["nope"]), grpc.StatusCode.INVALID_ARGUMENT, "eval_ids: not in"),
        (check_request(parent, k=2), grpc.StatusCode.INVALID_ARGUMENT, "k: must be less than the 2"),
        (check_request(parent, typo=1), grpc.StatusCode.INVALID_ARGUMENT, "typo: Extra inputs"),
        (check_request(""), grpc.StatusCode.INVALID_ARGUMENT, "parent_job_id: a counterfactual job needs"),
    ]
    for request, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.SubmitJob(request)
        assert refused.value.code() == code, request
        assert message in refused.value.details()
    unknown = scheduler_pb2.SubmitJobRequest(user_id="alice", kind="retrain", parent_job_id=parent)
    with pytest.raises(grpc.aio.AioRpcError) as bad_kind:
        await stub.SubmitJob(unknown)
    assert "kind: unknown job kind 'retrain'" in bad_kind.value.details()
    # The parts of a sharded experiment are the scheduler's to create, not a researcher's.
    shard = scheduler_pb2.SubmitJobRequest(user_id="alice", kind="index_shard", parent_job_id=parent)
    with pytest.raises(grpc.aio.AioRpcError) as internal:
        await stub.SubmitJob(shard)
    assert internal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kind: index_shard jobs are parts of a sharded experiment" in internal.value.details()
    listed = await stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice", parent_job_id=parent))
    assert list(listed.jobs) == []
    assert len(provider.servicer.submit_requests) == 2  # the two experiments only
    assert all(r.kind == "" for r in provider.servicer.submit_requests)
    # A sharded experiment is accepted (issue 27): the scheduler runs it as a graph of jobs, whose
    # first part, its training job, is what a provider receives (scheduler/tests/test_graph.py).
    sharded = json.loads(h.spec_json(hyperparams={"epochs": 1, "batch_size": 1}))
    sharded["influence_method"], sharded["influence"] = "trackstar", {"shards": 2}
    graph = await stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=json.dumps(sharded).encode())
    )
    assert graph.shards == 2
    while len(provider.servicer.submit_requests) < 3:
        await asyncio.sleep(0.02)
    assert provider.servicer.submit_requests[2].kind == "training"
    await stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="alice", job_id=graph.id))


async def test_deleting_an_experiment_cancels_its_running_checks_at_the_provider_first(
    scheduler, provider, h, database_url
):
    stub = scheduler.stub
    parent, _, _ = await completed_experiment(scheduler, h, database_url)
    provider.servicer.plan = h.plan(hold_at=1)  # the check runs and waits
    check = await stub.SubmitJob(check_request(parent))
    await h.until_submitted(provider.servicer, check.id)
    await stub.DeleteJob(scheduler_pb2.DeleteJobRequest(user_id="alice", job_id=parent))
    assert provider.servicer.cancel_calls == [check.id]
    assert provider.servicer.jobs[check.id].cancelled
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=check.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_check_on_runpod_gets_its_workers_record_urls_only(
    start, provider, h, database_url, s3_server
):
    """A later job writes no files, but its RunPod worker claims our job id and keeps its result
    in the store: it gets the PUT URLs of those two records (and no file's)."""
    running = await start(store_settings=s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}"))
    stub = running.stub
    await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod"))
    parent, _, _ = await completed_experiment(running, h, database_url)
    check = await stub.SubmitJob(check_request(parent))
    await h.until_submitted(provider.servicer, check.id)
    sent = provider.servicer.submit_requests[-1]
    assert sent.job_id == check.id and sent.kind == "counterfactual"
    assert sorted(upload.name for upload in sent.artifact_uploads) == sorted(
        [*WORKER_RECORD_NAMES, CLAIM_READ_NAME]
    )
    assert all(f"/jobs/{check.id}/_worker/" in upload.url for upload in sent.artifact_uploads)
    events = await h.watch_all(stub, "alice", check.id)
    assert json.loads(events[-1].event_json)["state"] == "completed"


async def test_a_merge_whose_files_the_store_would_refuse_is_refused_before_it_runs(
    start, provider, h, database_url, s3_server
):
    """A merge on RunPod uploads its merged weights itself: shards over the largest file the
    dashboard takes, or weights over its total per job, are refused at submit (422 naming the
    limit), not after the GPU time was paid for."""
    running = await start(
        store_settings=s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}"),
        scheduler_upload_max_file_bytes=100_000_000,
        scheduler_upload_max_job_bytes=1_000,
    )
    stub = running.stub
    await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod"))
    parent, _, result = await completed_experiment(running, h, database_url)
    result["artifacts"] = [
        {
            "name": "adapter/adapter_config.json",
            "bytes": 2,
            "sha256": "0" * 64,
            "media_type": "application/json",
        }
    ]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE jobs SET result = $1::jsonb WHERE id = $2::uuid", json.dumps(result), parent
        )
    finally:
        await conn.close()

    def merge(shard_size_mb: float) -> scheduler_pb2.SubmitJobRequest:
        return scheduler_pb2.SubmitJobRequest(
            user_id="alice",
            kind="merge",
            parent_job_id=parent,
            request_json=json.dumps({"shard_size_mb": shard_size_mb}).encode(),
        )

    submitted = len(provider.servicer.submit_requests)
    with pytest.raises(grpc.aio.AioRpcError) as too_big_shards:
        await stub.SubmitJob(merge(500))
    assert too_big_shards.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request.shard_size_mb: 500 MB shards" in too_big_shards.value.details()
    assert "SCHEDULER_UPLOAD_MAX_FILE_BYTES" in too_big_shards.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as too_big_total:
        await stub.SubmitJob(merge(50))
    assert too_big_total.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SCHEDULER_UPLOAD_MAX_JOB_BYTES" in too_big_total.value.details()
    assert len(provider.servicer.submit_requests) == submitted  # nothing reached the provider
