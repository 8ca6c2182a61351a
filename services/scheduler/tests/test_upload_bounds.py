"""What a worker can do with its upload URLs, refused by the store itself: drop the create-only
header (s3rver, which checks signatures: SignatureDoesNotMatch), write over a verified file or
over a deleted job's names (moto, which implements S3's conditional writes: 412), and what the
sweep removes afterwards.

Not bounded by the store: an upload's size. S3 cannot bound a presigned PUT whose size is unknown
when it is signed (only a Content-Length of that exact size can be signed), and a POST policy,
which can carry a content-length-range, cannot be conditional (S3's conditional writes are
PutObject and CompleteMultipartUpload only), so it could not refuse the two writes above. Sizes
are checked when the scheduler verifies the files (test_uploads.py), and the sweep bounds how
long an unlisted upload stays."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from artifact_store import ArtifactStore, job_key, open_store
from devstack.sigv4_s3 import SigV4TestServer, sigv4_s3_server
from gpu_core.uploads import CLAIM_NAME, CREATE_ONLY
from scheduler.uploads import occupy_upload_names, presigned_uploads, sweep_orphans, verify_uploads

SPEC = {
    "training_data": [{"prompt": "a", "completion": "b"}],
    "eval_data": [{"prompt": "a", "expected": "b"}],
    "hyperparams": {"epochs": 1},
}


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def body_of(store: ArtifactStore, key: str) -> bytes:
    return b"".join([chunk async for chunk in await store.get(key)])


async def url_for(store: ArtifactStore, job_id: str, name: str) -> str:
    (upload,) = [u for u in await presigned_uploads(store, job_id, SPEC, expires_s=600) if u.name == name]
    return upload.url


@pytest.fixture(scope="module")
def sigv4_server() -> Iterator[SigV4TestServer]:
    with sigv4_s3_server() as server:
        if server is None:
            pytest.skip("s3rver is not installed (make setup installs it with npm)")
        yield server


async def test_an_upload_without_the_create_only_header_fails_the_signature(
    sigv4_server: SigV4TestServer,
) -> None:
    store = open_store(sigv4_server.store_settings(prefix=f"t-{os.urandom(4).hex()}"))
    url = await url_for(store, "job-sig", "scores.npy")
    assert "X-Amz-SignedHeaders=host%3Bif-none-match" in url
    async with httpx.AsyncClient() as http:
        dropped = await http.put(url, content=b"matrix")
        assert dropped.status_code == 403 and "SignatureDoesNotMatch" in dropped.text
        assert (await http.put(url, content=b"matrix", headers=CREATE_ONLY)).status_code == 200
    assert await body_of(store, job_key("job-sig", "scores.npy")) == b"matrix"


async def test_a_verified_file_cannot_be_replaced_through_its_url(s3_store: ArtifactStore) -> None:
    url = await url_for(s3_store, "job-v", "scores.npy")
    async with httpx.AsyncClient() as http:
        assert (await http.put(url, content=b"matrix", headers=CREATE_ONLY)).status_code == 200
        manifest = [{"name": "scores.npy", "bytes": 6, "sha256": hashlib.sha256(b"matrix").hexdigest()}]
        await verify_uploads(s3_store, "job-v", manifest)
        second = await http.put(url, content=b"other bytes", headers=CREATE_ONLY)
    assert second.status_code == 412
    assert await body_of(s3_store, job_key("job-v", "scores.npy")) == b"matrix"


async def test_a_deleted_jobs_urls_are_refused_and_the_sweep_keeps_the_placeholders_until_they_expire(
    s3_store: ArtifactStore,
) -> None:
    url = await url_for(s3_store, "job-d", "scores.npy")
    claim_url = await url_for(s3_store, "job-d", CLAIM_NAME)
    await s3_store.delete_prefix("jobs/job-d/")  # what deletion removes first
    occupied = await occupy_upload_names(s3_store, "job-d", SPEC)
    async with httpx.AsyncClient() as http:
        assert (await http.put(url, content=b"late", headers=CREATE_ONLY)).status_code == 412
        assert (await http.put(claim_url, content=b"{}", headers=CREATE_ONLY)).status_code == 412
    assert len(await s3_store.list("jobs/job-d/")) == occupied
    assert (await s3_store.stat(job_key("job-d", "scores.npy"))).bytes == 0

    async def no_jobs(job_ids: list[str]) -> dict[str, tuple[bool, set[str]]]:
        return {}

    assert await sweep_orphans(s3_store, no_jobs, upload_url_ttl_s=3600) == 0
    later = datetime.now(UTC) + timedelta(hours=2)
    assert await sweep_orphans(s3_store, no_jobs, upload_url_ttl_s=3600, now=later) == occupied
    assert await s3_store.list("jobs/job-d/") == []


async def test_the_sweep_keeps_running_jobs_and_what_ended_ones_list(s3_store: ArtifactStore) -> None:
    for key in (
        "jobs/run/scores.npy",
        "jobs/done/scores.npy",
        "jobs/done/late.npy",
        "jobs/done/_worker/result.json",
    ):
        await s3_store.put(key, chunks(b"x"))

    async def owners(job_ids: list[str]) -> dict[str, tuple[bool, set[str]]]:
        return {"run": (False, set()), "done": (True, {"scores.npy"})}

    assert await sweep_orphans(s3_store, owners, upload_url_ttl_s=3600) == 1
    assert [info.key.removeprefix("jobs/") for info in await s3_store.list("jobs/")] == [
        "done/_worker/result.json",
        "done/scores.npy",
        "run/scores.npy",
    ]


async def test_deleting_a_byok_job_kills_the_upload_urls_its_worker_holds(
    start, provider, h, s3_server
) -> None:
    from influence.v1 import scheduler_pb2

    provider.servicer.plan = h.plan(hold_at=1)  # the job stays running: its worker holds the URLs
    running = await start(store_settings=s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}"))
    await running.stub.SetComputeBackend(
        scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod")
    )
    job = await running.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json())
    )
    await h.until_submitted(provider.servicer, job.id)
    (submitted,) = [r for r in provider.servicer.submit_requests if r.job_id == job.id]
    urls = {upload.name: upload.url for upload in submitted.artifact_uploads}
    assert "scores.npy" in urls and CLAIM_NAME in urls
    await running.stub.DeleteJob(scheduler_pb2.DeleteJobRequest(user_id="alice", job_id=job.id))
    async with httpx.AsyncClient() as http:
        for name in ("scores.npy", CLAIM_NAME):
            assert (await http.put(urls[name], content=b"late", headers=CREATE_ONLY)).status_code == 412
    store = running.app.artifact_store
    assert {info.bytes for info in await store.list(f"jobs/{job.id}/")} == {0}  # placeholders only
    provider.servicer.plan.release.set()
