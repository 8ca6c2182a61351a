"""A sharded experiment's graph (scheduler.graph) through the real scheduler, real PostgreSQL and
the scripted provider: its parts are jobs the provider receives one by one (training, then the
shards), a failed shard runs again alone until its attempts are spent and then fails the
experiment naming the shard and the cause, a failed training job fails it, cancel and delete
reach every part, and the usage ledger counts the parts' time once."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os

import asyncpg
import grpc
import pytest

from artifact_store import job_key, open_store
from gpu_core.schemas import NO_SIZE_LIMITS, parse_spec
from gpu_core.shard_schemas import ShardRequest
from gpu_core.uploads import planned_shard_artifact_names, planned_training_artifact_names
from influence.v1 import common_pb2, scheduler_pb2

pytestmark = pytest.mark.timeout(60)


def sharded_spec(h, shards: int = 2) -> bytes:
    spec = json.loads(h.spec_json(hyperparams={"epochs": 1, "batch_size": 1}))
    spec["influence_method"], spec["influence"] = "trackstar", {"shards": shards}
    return json.dumps(spec).encode()


async def submit(stub, h, key: str = "") -> scheduler_pb2.Job:
    return await stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=sharded_spec(h), idempotency_key=key)
    )


async def until(condition, timeout_s: float = 20.0):
    """``condition()``'s first true answer (it may be a coroutine function)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = condition()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return found
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def get(stub, job_id: str) -> scheduler_pb2.Job:
    return await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=job_id))


def kinds(servicer) -> list[str]:
    return [request.kind for request in servicer.submit_requests]


async def test_a_shard_that_keeps_failing_is_retried_alone_then_fails_the_experiment(
    start, provider, h, database_url
):
    running = await start(scheduler_shard_retries=1, scheduler_shard_retry_backoff_s=0.5)
    stub, servicer = running.stub, provider.servicer
    job = await submit(stub, h)
    assert job.shards == 2 and job.state == common_pb2.JOB_STATE_QUEUED
    # The experiment itself goes to no provider: its training job does, then the shards.
    await until(lambda: kinds(servicer) == ["training"])
    servicer.plan = h.plan(outcome="fail", error="the worker process was killed (signal 9)")
    events = await h.watch_all(stub, "alice", job.id)
    final = json.loads(events[-1].event_json)
    assert final["state"] == "failed"
    failed = await get(stub, job.id)
    assert failed.error.startswith("index shard ")
    assert "of 2 (training examples " in failed.error
    assert "failed after 2 attempts: the worker process was killed (signal 9)" in failed.error
    # Each shard ran twice at most (one retry), alone: never the training job again.
    assert kinds(servicer).count("training") == 1
    assert 2 <= kinds(servicer).count("index_shard") <= 4
    assert "shard_merge" not in kinds(servicer)
    parts = {(p.kind, p.shard): p for p in failed.parts}
    assert parts[("training", -1)].status == "completed" and parts[("training", -1)].attempts == 1
    assert max(parts[("index_shard", i)].attempts for i in (0, 1)) == 2
    assert parts[("shard_merge", -1)].status == "pending"
    # The parts are not experiments.
    listed = await stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice"))
    assert [j.id for j in listed.jobs] == [job.id]
    # Each retry waited out its backoff after the failure, and the experiment said so meanwhile.
    messages = [json.loads(e.event_json).get("message", "") for e in events]
    assert any("failed and waiting to run again" in m for m in messages)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT shard, created_at, finished_at FROM jobs
               WHERE graph_job_id = $1::uuid AND kind = 'index_shard' ORDER BY shard, created_at""",
            job.id,
        )
    finally:
        await conn.close()
    retried = [(a, b) for a, b in zip(rows, rows[1:], strict=False) if a["shard"] == b["shard"]]
    assert retried
    assert all((b["created_at"] - a["finished_at"]).total_seconds() >= 0.5 for a, b in retried)


async def test_a_failed_training_job_fails_the_experiment_with_its_cause(scheduler, provider, h):
    stub, servicer = scheduler.stub, provider.servicer
    servicer.plan = h.plan(outcome="fail", error="CUDA out of memory")
    job = await submit(stub, h)
    events = await h.watch_all(stub, "alice", job.id)
    assert json.loads(events[-1].event_json)["state"] == "failed"
    assert (await get(stub, job.id)).error == "the training job failed: CUDA out of memory"
    assert kinds(servicer) == ["training"]


async def test_cancel_and_delete_reach_every_part_and_the_ledger_counts_parts_once(
    scheduler, provider, h, database_url
):
    stub, servicer = scheduler.stub, provider.servicer
    servicer.plan = h.plan(hold_at=1, usage_s=7.0)  # the training job runs and waits
    job = await submit(stub, h, key="graph-1")
    again = await submit(stub, h, key="graph-1")
    assert again.id == job.id
    training = await h.until_submitted(servicer, (await _training_id(database_url, job.id)))
    cancelled = await stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="alice", job_id=job.id))
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    # The provider has the part, but its answer may not be stored yet: then the part's dispatcher
    # cancels it once the answer is in (JobManager.cancel), a moment after CancelJob returns.
    await until(lambda: servicer.cancel_calls)
    assert servicer.cancel_calls == [training.job_id] and training.cancelled
    part = await until(lambda: _state_is(stub, training.job_id, common_pb2.JOB_STATE_CANCELLED))
    assert part.kind == "training"
    conn = await asyncpg.connect(database_url)
    try:

        async def settled() -> dict[tuple[str, str], float] | None:
            entries = await conn.fetch(
                "SELECT job_id::text AS job_id, entry, gpu_seconds FROM usage_ledger WHERE user_id = 'alice'"
            )
            found = {(row["job_id"], row["entry"]): row["gpu_seconds"] for row in entries}
            return found if (training.job_id, "settled") in found else None

        by_job = await until(settled)
        # Admitted once, as the experiment; settled by the part that ran, the experiment at 0.
        assert (job.id, "admitted") in by_job and (training.job_id, "admitted") not in by_job
        assert by_job[(job.id, "settled")] == 0
        assert (training.job_id, "settled") in by_job
        await stub.DeleteJob(scheduler_pb2.DeleteJobRequest(user_id="alice", job_id=job.id))
        remaining = await conn.fetchval("SELECT count(*) FROM jobs WHERE user_id = 'alice'")
        assert remaining == 0
    finally:
        await conn.close()
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await get(stub, training.job_id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def _state_is(stub, job_id: str, state: int) -> scheduler_pb2.Job | None:
    job = await get(stub, job_id)
    return job if job.state == state else None


async def _training_id(database_url: str, job_id: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:

        async def found() -> str | None:
            value = await conn.fetchval(
                "SELECT id::text FROM jobs WHERE graph_job_id = $1::uuid AND kind = 'training'", job_id
            )
            return str(value) if value else None

        return await until(found)
    finally:
        await conn.close()


async def test_on_runpod_each_part_uploads_its_own_names_and_a_shard_downloads_the_training_files(
    start, provider, h, s3_server
):
    """Where workers upload directly, the training job gets PUT URLs for its adapter and
    checkpoints; once it completed (its files verified in the store), each index shard gets
    presigned GETs of exactly those files and PUT URLs for its own slice's files."""
    settings = s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    running = await start(store_settings=settings)
    stub, servicer = running.stub, provider.servicer
    await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod"))
    files = {"adapter/adapter_config.json": b'{"r": 8}', "checkpoints/epoch-1.safetensors": b"state"}
    servicer.plan = h.plan(hold_at=1, artifacts=files)
    job = await submit(stub, h)
    await until(lambda: kinds(servicer) == ["training"])
    training = servicer.submit_requests[0]
    spec = parse_spec(json.loads(sharded_spec(h)), NO_SIZE_LIMITS)
    uploads = {upload.name: upload.url for upload in training.artifact_uploads}
    assert set(planned_training_artifact_names(spec)) <= set(uploads)
    assert all(f"/jobs/{training.job_id}/" in url for url in uploads.values())
    store = open_store(settings)
    for name, data in files.items():  # what the training job's worker uploads
        await store.put(job_key(training.job_id, name), _chunks(data))
    servicer.plan = h.plan(hold_at=1)  # the shards run and wait
    training_plan = servicer.jobs[training.job_id].plan
    training_plan.release.set()
    await until(lambda: kinds(servicer).count("index_shard") == 2)
    for request in servicer.submit_requests[1:]:
        shard = json.loads(request.request_json)
        assert request.parent_job_id == training.job_id
        downloads = {artifact.name: artifact for artifact in request.parent_artifacts}
        assert sorted(downloads) == sorted(files)
        assert all(f"/jobs/{training.job_id}/" in a.url for a in downloads.values())
        assert all(a.sha256 == hashlib.sha256(files[name]).hexdigest() for name, a in downloads.items())
        planned = planned_shard_artifact_names(spec, ShardRequest.model_validate(shard))
        names = {upload.name for upload in request.artifact_uploads}
        assert set(planned) <= names and any(
            n.startswith(f"shards/shard-{shard['shard']:05d}/") for n in names
        )
    await stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="alice", job_id=job.id))
    # A shard whose submit answer was still on its way is cancelled once it arrives.
    # (The user's cancel and a graph step that finds the experiment cancelled may both reach a
    # shard: a second cancel of a job is harmless, so each shard is counted once.)
    shards = {r.job_id for r in servicer.submit_requests[1:]}
    await until(lambda: set(servicer.cancel_calls) == shards)


async def _chunks(data: bytes):
    yield data


async def test_the_spend_cap_holds_for_the_whole_graph(scheduler, provider, h):
    """The training job's settled time and the running shards' time so far are added up: once
    they reach the cap, every active part is cancelled and the experiment ends naming the cap
    and the amount, although neither shard alone came near it."""
    stub, servicer = scheduler.stub, provider.servicer
    # Each part's estimate: $0.05 at $0.10/s; the cap is $0.30.
    servicer.estimated_time_s, servicer.usd_per_second["hosted"] = 0.5, 0.1
    servicer.plan = h.plan(hold_at=1)  # the training job runs until released
    job = await stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=sharded_spec(h), max_cost_usd=0.3)
    )
    await until(lambda: kinds(servicer) == ["training"])
    training = servicer.jobs[servicer.submit_requests[0].job_id]
    await until(lambda: training.polls >= 2)  # it is running
    await asyncio.sleep(2.2)  # about $0.22 of the cap
    assert (await get(stub, job.id)).state != common_pb2.JOB_STATE_CANCELLED
    servicer.plan = h.plan(hold_at=1)  # the shards run until cancelled
    training.plan.release.set()
    ended = await until(lambda: _ended(stub, job.id), timeout_s=30)
    assert ended.state == common_pb2.JOB_STATE_CANCELLED
    assert ended.error.startswith("Cancelled at your spend cap: its 3 jobs (training, index shards, merge)")
    assert "(2 still running, priced at the rates their estimates gave), reaching your cap of $0.3000" in (
        ended.error
    )
    amount = float(ended.error.split("had cost about $")[1].split(" ")[0])
    assert amount >= 0.3
    assert ended.actual.cost_usd == pytest.approx(amount, abs=1e-4)
    shard_ids = sorted(r.job_id for r in servicer.submit_requests if r.kind == "index_shard")
    assert len(shard_ids) == 2
    await until(lambda: sorted(servicer.cancel_calls) == shard_ids)
    shards_cost = 0.0
    for shard_id in shard_ids:
        shard = await until(lambda shard_id=shard_id: _ended(stub, shard_id))  # stored after the call
        assert shard.state == common_pb2.JOB_STATE_CANCELLED and shard.error == ended.error
        assert shard.actual.source == "run time as the scheduler saw it (cancelled at the spend cap)"
        shards_cost += shard.actual.cost_usd
    # The shards alone had not reached the cap: the training job's settled time counted.
    assert 0 < shards_cost < 0.3
    assert "shard_merge" not in kinds(servicer)


async def _ended(stub, job_id: str) -> scheduler_pb2.Job | None:
    job = await get(stub, job_id)
    terminal = (common_pb2.JOB_STATE_COMPLETED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED)
    return job if job.state in terminal else None


def auto_spec(h, n_train: int) -> bytes:
    spec = json.loads(h.spec_json(hyperparams={"epochs": 1, "batch_size": 1}))
    spec["training_data"] = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(n_train)]
    spec["influence_method"], spec["influence"] = "trackstar", {"shards": "auto"}
    return json.dumps(spec).encode()


@pytest.mark.parametrize(("parallel", "expected"), [(1, 1), (2, 2), (0, 1)])
async def test_auto_counts_the_jobs_the_provider_says_it_runs_at_once(
    scheduler, provider, h, parallel, expected
):
    """10,000 examples make 2 shards' worth; "auto" runs as many as the provider's Estimate says
    it runs at once (a RunPod endpoint's workers), not a default per provider (0: unsaid, the
    cost model's default, 1 for compute-local)."""
    stub, servicer = scheduler.stub, provider.servicer
    servicer.parallel_jobs = parallel
    servicer.plan = h.plan(hold_at=1)
    job = await stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=auto_spec(h, 10_000))
    )
    assert job.shards == expected
    asked = json.loads(servicer.estimate_requests[0].spec_json)
    assert asked["influence"]["shards"] == "auto"
    stored = await stub.GetJobSpec(scheduler_pb2.GetJobSpecRequest(user_id="alice", job_id=job.id))
    assert json.loads(stored.spec_json)["influence"]["shards"] == expected
    await stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="alice", job_id=job.id))


async def test_no_estimate_of_shards_where_the_submit_would_run_one(scheduler, provider, h):
    """On RunPod with a store its workers cannot reach (a directory here), "auto" is estimated
    as the one job submit runs, and an explicit N > 1 (which submit refuses) gets no estimate
    but the refusal's words."""
    stub, servicer = scheduler.stub, provider.servicer
    servicer.parallel_jobs = 4
    await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod"))
    await stub.EstimateJob(scheduler_pb2.EstimateJobRequest(user_id="alice", spec_json=auto_spec(h, 10_000)))
    by_backend = {r.backend: json.loads(r.spec_json) for r in servicer.estimate_requests}
    assert by_backend["runpod"]["influence"]["shards"] == 1
    assert by_backend["hosted"]["influence"]["shards"] == "auto"  # compute-local reads the store
    servicer.estimate_requests.clear()
    response = await stub.EstimateJob(
        scheduler_pb2.EstimateJobRequest(user_id="alice", spec_json=sharded_spec(h, shards=2))
    )
    assert [e.backend for e in response.estimates] == ["hosted"]
    assert [r.backend for r in servicer.estimate_requests] == ["hosted"]
    assert any(
        note.startswith("runpod: influence.shards: a sharded experiment on runpod") for note in response.notes
    )
    job = await stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=auto_spec(h, 10_000))
    )
    assert job.shards == 1
