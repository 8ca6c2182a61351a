"""Artifacts through the real scheduler: streamed from the provider into a real store, checked
against the manifest, listed and read back by their owner only, deleted, expired; and a result
that cannot be collected fails the job in bounded time."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from artifact_store import ArtifactStore, StoreError, open_store
from artifact_store.store import PutResult
from influence.v1 import common_pb2, scheduler_pb2

pytestmark = pytest.mark.timeout(60)

FILES = {"scores.npy": os.urandom(300_000), "adapter/adapter_config.json": b'{"r": 8}'}


async def _finish(scheduler, h, user: str = "alice") -> scheduler_pb2.Job:
    request = scheduler_pb2.SubmitJobRequest(user_id=user, spec_json=h.spec_json())
    job = await scheduler.stub.SubmitJob(request)
    await h.watch_all(scheduler.stub, user, job.id)
    return await scheduler.stub.GetJob(scheduler_pb2.GetJobRequest(user_id=user, job_id=job.id))


async def _read(stub, user: str, job_id: str, name: str) -> bytes:
    request = scheduler_pb2.JobArtifactRequest(user_id=user, job_id=job_id, name=name)
    return b"".join([chunk.data async for chunk in stub.ReadJobArtifact(request)])


async def test_artifacts_are_streamed_verified_listed_and_read_back(scheduler, provider, h):
    provider.servicer.plan = h.plan(artifacts=dict(FILES))
    done = await _finish(scheduler, h)
    assert done.state == common_pb2.JOB_STATE_COMPLETED
    listed = await scheduler.stub.ListJobArtifacts(
        scheduler_pb2.ListJobArtifactsRequest(user_id="alice", job_id=done.id)
    )
    assert {a.name: a.bytes for a in listed.artifacts} == {name: len(data) for name, data in FILES.items()}
    for name, data in FILES.items():
        assert await _read(scheduler.stub, "alice", done.id, name) == data
    opened = await scheduler.stub.OpenJobArtifact(
        scheduler_pb2.JobArtifactRequest(user_id="alice", job_id=done.id, name="scores.npy")
    )
    assert opened.artifact.sha256 and opened.download_url == ""  # the local store serves the bytes
    stored = await scheduler.app.artifact_store.list(f"jobs/{done.id}/")
    assert sorted(info.key for info in stored) == sorted(f"jobs/{done.id}/{name}" for name in FILES)


async def test_another_user_and_unknown_names_are_not_found(scheduler, provider, h):
    provider.servicer.plan = h.plan(artifacts=dict(FILES))
    done = await _finish(scheduler, h)
    calls = [
        scheduler.stub.ListJobArtifacts(
            scheduler_pb2.ListJobArtifactsRequest(user_id="mallory", job_id=done.id)
        ),
        scheduler.stub.OpenJobArtifact(
            scheduler_pb2.JobArtifactRequest(user_id="mallory", job_id=done.id, name="scores.npy")
        ),
        _read(scheduler.stub, "mallory", done.id, "scores.npy"),
        _read(scheduler.stub, "alice", done.id, "../../etc/passwd"),
        scheduler.stub.DeleteJob(scheduler_pb2.DeleteJobRequest(user_id="mallory", job_id=done.id)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert await _read(scheduler.stub, "alice", done.id, "scores.npy") == FILES["scores.npy"]


async def test_a_transfer_broken_midway_is_retried(scheduler, provider, h):
    provider.servicer.plan = h.plan(artifacts=dict(FILES), fetch_breaks=[2, 1])
    done = await _finish(scheduler, h)
    assert done.state == common_pb2.JOB_STATE_COMPLETED, done.error
    assert provider.servicer.fetch_calls.count("scores.npy") == 3
    assert await _read(scheduler.stub, "alice", done.id, "scores.npy") == FILES["scores.npy"]


async def test_a_transfer_that_keeps_failing_fails_the_job_and_lists_nothing(scheduler, provider, h):
    provider.servicer.plan = h.plan(artifacts=dict(FILES), fetch_breaks=[0, 3, 0, 3, 1, 2])
    done = await _finish(scheduler, h)
    assert done.state == common_pb2.JOB_STATE_FAILED
    assert "could not be stored after 3 attempts" in done.error and "mid-transfer" in done.error
    assert await scheduler.app.artifact_store.list(f"jobs/{done.id}/") == []
    listed = await scheduler.stub.ListJobArtifacts(
        scheduler_pb2.ListJobArtifactsRequest(user_id="alice", job_id=done.id)
    )
    assert list(listed.artifacts) == []


async def test_bytes_that_do_not_match_the_manifest_are_never_stored(scheduler, provider, h):
    provider.servicer.plan = h.plan(artifacts=dict(FILES), corrupt=True)
    done = await _finish(scheduler, h)
    assert done.state == common_pb2.JOB_STATE_FAILED and "expected" in done.error and "sha256" in done.error
    assert await scheduler.app.artifact_store.list(f"jobs/{done.id}/") == []


class _StoreFailingMidUpload(ArtifactStore):
    """A real local store whose uploads break after the first chunk (a store outage)."""

    def __init__(self, inner: ArtifactStore) -> None:
        self.__dict__.update(inner.__dict__)
        self.failed_puts = 0

    async def put(self, key, chunks, expected_sha256=None, expected_bytes=None) -> PutResult:
        async def first_then_break():
            async for chunk in chunks:
                yield chunk
                self.failed_puts += 1
                raise StoreError("the artifact store failed to store it: connection reset by the store")

        return await super().put(key, first_then_break(), expected_sha256, expected_bytes)


async def test_a_store_failing_mid_upload_fails_the_job_with_a_message(start, provider, h, tmp_path):
    running = await start()
    failing = _StoreFailingMidUpload(open_store(running.app.artifact_store_settings))
    running.app.artifact_store = failing
    running.app.require()[0].artifacts.store = failing
    provider.servicer.plan = h.plan(artifacts=dict(FILES))
    done = await _finish(running, h)
    assert done.state == common_pb2.JOB_STATE_FAILED
    assert "could not be stored after 3 attempts" in done.error
    assert "connection reset by the store" in done.error
    assert failing.failed_puts == 3
    assert await failing.list(f"jobs/{done.id}/") == []


async def test_delete_removes_the_job_and_its_artifacts(scheduler, provider, h):
    provider.servicer.plan = h.plan(artifacts=dict(FILES))
    done = await _finish(scheduler, h)
    answer = await scheduler.stub.DeleteJob(scheduler_pb2.DeleteJobRequest(user_id="alice", job_id=done.id))
    assert answer.deleted_artifacts == 2
    assert await scheduler.app.artifact_store.list(f"jobs/{done.id}/") == []
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await scheduler.stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=done.id))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delete_cancels_a_running_job_first(scheduler, provider, h):
    provider.servicer.plan = h.plan(hold_at=2)
    request = scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json())
    job = await scheduler.stub.SubmitJob(request)
    await asyncio.sleep(0.3)
    await scheduler.stub.DeleteJob(scheduler_pb2.DeleteJobRequest(user_id="alice", job_id=job.id))
    assert provider.servicer.cancel_calls == [job.id]
    listed = await scheduler.stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice"))
    assert [j.id for j in listed.jobs] == []


async def test_retention_removes_old_artifacts_and_keeps_the_job(start, provider, h):
    running = await start(artifact_retention_days=7)
    provider.servicer.plan = h.plan(artifacts=dict(FILES))
    done = await _finish(running, h)
    jobs = running.app.require()[0]
    assert await jobs.sweep_expired_artifacts(datetime.now(UTC) + timedelta(days=6)) == 0
    assert await jobs.sweep_expired_artifacts(datetime.now(UTC) + timedelta(days=8)) == 1
    assert await running.app.artifact_store.list(f"jobs/{done.id}/") == []
    kept = await running.stub.GetJob(scheduler_pb2.GetJobRequest(user_id="alice", job_id=done.id))
    assert kept.state == common_pb2.JOB_STATE_COMPLETED
    listed = await running.stub.ListJobArtifacts(
        scheduler_pb2.ListJobArtifactsRequest(user_id="alice", job_id=done.id)
    )
    assert list(listed.artifacts) == []


async def test_a_result_that_never_arrives_fails_the_job_in_bounded_time(start, provider, h):
    running = await start(scheduler_result_deadline_s=1.0)
    provider.servicer.fail_next["GetResult"] = [(grpc.StatusCode.UNAVAILABLE, "worker gone")] * 1000
    started = asyncio.get_running_loop().time()
    done = await _finish(running, h)
    assert done.state == common_pb2.JOB_STATE_FAILED
    # The provider answered (the channel is up), so its own message is the reason.
    assert done.error == "the result could not be collected from the local provider: worker gone"
    assert asyncio.get_running_loop().time() - started < 10
    assert provider.servicer.result_calls == 0


async def test_a_result_over_the_message_limit_fails_at_once(scheduler, provider, h):
    provider.servicer.fail_next["GetResult"] = [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (224517201 vs. 67108864)")
    ]
    done = await _finish(scheduler, h)
    assert done.state == common_pb2.JOB_STATE_FAILED and "larger than max" in done.error


async def test_with_an_s3_store_downloads_are_presigned_urls_that_work(start, provider, h):
    import httpx

    from devstack.s3_server import s3_test_server

    with s3_test_server() as server:
        running = await start(store_settings=server.store_settings(prefix="sched"))
        provider.servicer.plan = h.plan(artifacts=dict(FILES))
        done = await _finish(running, h)
        assert done.state == common_pb2.JOB_STATE_COMPLETED, done.error
        opened = await running.stub.OpenJobArtifact(
            scheduler_pb2.JobArtifactRequest(user_id="alice", job_id=done.id, name="scores.npy")
        )
        assert opened.download_url.startswith(server.endpoint_url)
        async with httpx.AsyncClient() as client:
            answer = await client.get(opened.download_url)
        assert answer.status_code == 200 and answer.content == FILES["scores.npy"]
        assert await _read(running.stub, "alice", done.id, "scores.npy") == FILES["scores.npy"]
        await running.stub.DeleteJob(scheduler_pb2.DeleteJobRequest(user_id="alice", job_id=done.id))
        assert await running.app.artifact_store.list(f"jobs/{done.id}/") == []
