"""What a worker can do with its upload URLs, refused by the store itself: send a body of another
size than its URL was granted for, or drop the create-only header (s3rver, which checks
signatures: SignatureDoesNotMatch), write over a verified file or over a deleted job's names
(moto, which implements S3's conditional writes: 412), and what the sweep removes afterwards.

Sizes are bounded where the deployment has a public address (SCHEDULER_WEBHOOK_BASE_URL): the
worker asks the upload route (RPC GrantUpload, behind POST /api/uploads/{job}/{secret}) for each
file's URL once it knows the file's size and sha256, and the URL signs that Content-Length (and
the sha256 as x-amz-checksum-sha256, which S3, R2 and MinIO check; neither s3rver nor moto does,
so here only its presence among the signed headers is asserted). The claim's URL, minted at
dispatch, signs a fixed Content-Length (the claim is padded to it). Without a public address the
URLs are minted at dispatch and bind no size: S3 cannot bound a presigned PUT whose size is
unknown when it is signed (only a Content-Length of that exact size can be signed), and a POST
policy, which can carry a content-length-range, cannot be conditional (S3's conditional writes
are PutObject and CompleteMultipartUpload only), so it could not refuse the two writes above.
Sizes are then checked only when the scheduler verifies the files (test_uploads.py), and the sweep
bounds how long an unlisted upload stays."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest

from artifact_store import ArtifactStore, job_key, open_store
from devstack.sigv4_s3 import SigV4TestServer, sigv4_s3_server
from gpu_core.uploads import CLAIM_BYTES, CLAIM_NAME, CREATE_ONLY, UPLOAD_GRANT_NAME, claim_job
from influence.v1 import scheduler_pb2
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


BASE = "https://dash.example.org"


async def _running_byok_job(start, provider, h, store_settings, **settings) -> tuple:
    """A scheduler with a public address, and a BYOK job held running; returns the scheduler,
    the job, its upload plan (name -> URL) and its upload secret."""
    provider.servicer.plan = h.plan(hold_at=1)
    running = await start(store_settings=store_settings, scheduler_webhook_base_url=BASE, **settings)
    await running.stub.SetComputeBackend(
        scheduler_pb2.SetComputeBackendRequest(user_id="ursula", backend="runpod")
    )
    job = await running.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="ursula", spec_json=h.spec_json())
    )
    await h.until_submitted(provider.servicer, job.id)
    (submitted,) = [r for r in provider.servicer.submit_requests if r.job_id == job.id]
    plan = {upload.name: upload.url for upload in submitted.artifact_uploads}
    prefix = f"{BASE}/api/uploads/{job.id}/"
    assert plan[UPLOAD_GRANT_NAME].startswith(prefix)
    return running, job, plan, plan[UPLOAD_GRANT_NAME].removeprefix(prefix)


async def _grant(stub, job_id: str, secret: str, name: str, data: bytes) -> tuple[str, dict[str, str]]:
    answer = await stub.GrantUpload(
        scheduler_pb2.GrantUploadRequest(
            job_id=job_id, secret=secret, name=name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
        )
    )
    return answer.url, dict(answer.headers)


async def _refusal(stub, job_id: str, secret: str, name: str, size: int) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GrantUpload(
            scheduler_pb2.GrantUploadRequest(
                job_id=job_id, secret=secret, name=name, bytes=size, sha256="0" * 64
            )
        )
    return refused.value.code(), refused.value.details() or ""


async def test_a_url_asked_for_at_upload_time_is_refused_by_the_store_for_any_other_size(
    start, provider, h, sigv4_server: SigV4TestServer
) -> None:
    settings = sigv4_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    running, job, plan, secret = await _running_byok_job(start, provider, h, settings)
    # The plan holds no URL for the run's files: only the claim (and its GET) and the route.
    assert set(plan) == {CLAIM_NAME, CLAIM_NAME + ":read", UPLOAD_GRANT_NAME}
    matrix = os.urandom(4096)
    url, headers = await _grant(running.stub, job.id, secret, "scores.npy", matrix)
    assert "X-Amz-SignedHeaders=content-length%3Bhost%3Bif-none-match%3Bx-amz-checksum-sha256" in url
    assert headers["Content-Length"] == "4096" and headers["If-None-Match"] == "*"
    assert headers["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(matrix).digest()).decode()
    async with httpx.AsyncClient() as http:
        larger = await http.put(
            url, content=matrix + b"more", headers={k: v for k, v in headers.items() if k != "Content-Length"}
        )
        assert larger.status_code == 403 and "SignatureDoesNotMatch" in larger.text
        smaller = await http.put(
            url, content=matrix[:100], headers={k: v for k, v in headers.items() if k != "Content-Length"}
        )
        assert smaller.status_code == 403 and "SignatureDoesNotMatch" in smaller.text
        undeclared = {k: v for k, v in headers.items() if k != "If-None-Match"}
        assert (await http.put(url, content=matrix, headers=undeclared)).status_code == 403
        assert (await http.put(url, content=matrix, headers=headers)).status_code == 200
    store = running.app.artifact_store
    assert await body_of(store, job_key(job.id, "scores.npy")) == matrix
    # The claim's URL, minted at dispatch, takes exactly CLAIM_BYTES: the padded claim, no more.
    async with httpx.AsyncClient() as http:
        oversized = await http.put(plan[CLAIM_NAME], content=b"x" * (CLAIM_BYTES + 1), headers=CREATE_ONLY)
        assert oversized.status_code == 403 and "SignatureDoesNotMatch" in oversized.text
    assert claim_job(plan[CLAIM_NAME], {"job_id": job.id, "provider_job_id": "rp-1"})
    assert (await store.stat(job_key(job.id, CLAIM_NAME))).bytes == CLAIM_BYTES
    provider.servicer.plan.release.set()


async def test_the_upload_route_refuses_what_the_job_may_not_write_and_the_store_what_it_wrote(
    start, provider, h, s3_server
) -> None:
    """On moto (conditional writes): the route's refusals, a granted URL that cannot replace a
    verified file, and one that dies with its job."""
    settings = s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    running, job, _, secret = await _running_byok_job(
        start,
        provider,
        h,
        settings,
        scheduler_upload_max_file_bytes=600,
        scheduler_upload_max_job_bytes=1000,
    )
    stub = running.stub
    code, details = await _refusal(stub, job.id, "not-" + secret, "scores.npy", 10)
    assert code == grpc.StatusCode.PERMISSION_DENIED and secret not in details and "not-" not in details
    code, _ = await _refusal(stub, "8f0e1e36-4bb7-4c2b-a1f4-0c7b7f0d1e2a", secret, "scores.npy", 10)
    assert code == grpc.StatusCode.NOT_FOUND
    for name in ("notes.txt", "../scores.npy", CLAIM_NAME, "jobs/other/scores.npy"):
        code, details = await _refusal(stub, job.id, secret, name, 10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a file this job may write" in details, name
    code, details = await _refusal(stub, job.id, secret, "scores.npy", 601)
    assert code == grpc.StatusCode.OUT_OF_RANGE and "SCHEDULER_UPLOAD_MAX_FILE_BYTES" in details
    # Per job: every name counted at the largest size granted for it.
    matrix = b"m" * 600
    url, headers = await _grant(stub, job.id, secret, "scores.npy", matrix)
    code, details = await _refusal(stub, job.id, secret, "training_summary.json", 401)
    assert code == grpc.StatusCode.OUT_OF_RANGE and "SCHEDULER_UPLOAD_MAX_JOB_BYTES" in details
    await _grant(stub, job.id, secret, "scores.npy", b"m" * 100)  # asked again smaller: still 600
    summary_url, summary_headers = await _grant(stub, job.id, secret, "training_summary.json", b"s" * 400)
    async with httpx.AsyncClient() as http:
        assert (await http.put(url, content=matrix, headers=headers)).status_code == 200
        store = running.app.artifact_store
        manifest = [{"name": "scores.npy", "bytes": 600, "sha256": hashlib.sha256(matrix).hexdigest()}]
        await verify_uploads(store, job.id, manifest)
        # A verified file cannot be replaced through its URL.
        assert (await http.put(url, content=b"o" * 600, headers=headers)).status_code == 412
        assert await body_of(store, job_key(job.id, "scores.npy")) == matrix
        # Deleted: the route knows no such job, and a URL granted before is refused by the store.
        await stub.DeleteJob(scheduler_pb2.DeleteJobRequest(user_id="ursula", job_id=job.id))
        code, _ = await _refusal(stub, job.id, secret, "training_summary.json", 10)
        assert code == grpc.StatusCode.NOT_FOUND
        late = await http.put(summary_url, content=b"s" * 400, headers=summary_headers)
        assert late.status_code == 412
    assert {info.bytes for info in await store.list(f"jobs/{job.id}/")} == {0}  # placeholders only
    provider.servicer.plan.release.set()


async def test_the_upload_route_refuses_a_job_that_has_ended(start, provider, h, s3_server) -> None:
    settings = s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    running, job, _, secret = await _running_byok_job(start, provider, h, settings)
    await running.stub.CancelJob(scheduler_pb2.CancelJobRequest(user_id="ursula", job_id=job.id))
    code, details = await _refusal(running.stub, job.id, secret, "scores.npy", 10)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "ended" in details
    provider.servicer.plan.release.set()


async def test_without_a_public_address_urls_are_minted_at_dispatch_with_the_claim_bounded(
    s3_store: ArtifactStore,
) -> None:
    plan = {u.name: u.url for u in await presigned_uploads(s3_store, "job-p", SPEC, expires_s=600)}
    assert UPLOAD_GRANT_NAME not in plan and "scores.npy" in plan
    assert "X-Amz-SignedHeaders=host%3Bif-none-match&" in plan["scores.npy"]
    assert "X-Amz-SignedHeaders=content-length%3Bhost%3Bif-none-match&" in plan[CLAIM_NAME]


async def test_a_scheduler_with_runpod_and_no_public_address_warns_that_uploads_are_unbounded(
    start, s3_server, caplog: pytest.LogCaptureFixture
) -> None:
    settings = s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}")
    await start(store_settings=settings)
    warned = [r.getMessage() for r in caplog.records if "not bounded in size" in r.getMessage()]
    assert warned and "SCHEDULER_WEBHOOK_BASE_URL" in warned[0]
    caplog.clear()
    await start(store_settings=settings, scheduler_webhook_base_url=BASE)
    assert not [r for r in caplog.records if "not bounded in size" in r.getMessage()]
