"""A job's files through compute-runpod and the fake RunPod (the real worker under the runpod SDK's
loop, the real pipeline on the tiny model): uploaded by the worker to presigned PUT URLs of the S3
test server (moto), or, with no store reachable from RunPod, sent back inline under a ceiling."""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from runpod_testkit import Stack, spec_bytes

from artifact_store import ArtifactStore, job_key
from devstack.s3_server import S3TestServer
from gpu_core.schemas import ExperimentResult, parse_spec
from gpu_core.uploads import planned_artifact_names
from influence.v1 import common_pb2, compute_pb2

HOSTED = common_pb2.Account(user_id="operator-tier-user", hosted=True)


@pytest.fixture
def service_overrides(request: pytest.FixtureRequest) -> dict[str, object]:
    return getattr(request, "param", {})


async def upload_urls(s3_store: ArtifactStore, job_id: str) -> list[compute_pb2.ArtifactUpload]:
    """What the scheduler sends: one presigned PUT per name the run may write."""
    names = planned_artifact_names(parse_spec(spec_bytes()))
    return [
        compute_pb2.ArtifactUpload(name=name, url=await s3_store.presigned_url("PUT", job_key(job_id, name)))
        for name in names
    ]


async def run(stack: Stack, job_id: str, uploads: list[compute_pb2.ArtifactUpload] = ()):
    submitted = await stack.stub.Submit(
        compute_pb2.SubmitRequest(
            job_id=job_id,
            account=HOSTED,
            spec_json=spec_bytes(),
            artifact_uploads=uploads,
        )
    )
    final, _, _ = await stack.wait_terminal(submitted.provider_job_id, HOSTED)
    return submitted.provider_job_id, final


async def test_worker_uploads_files_to_presigned_urls_and_returns_only_the_manifest(
    stack: Stack, s3_store: ArtifactStore
) -> None:
    provider_job_id, final = await run(stack, "job-s3", await upload_urls(s3_store, "job-s3"))
    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.error
    result = ExperimentResult.model_validate_json(
        (
            await stack.stub.GetResult(
                compute_pb2.GetResultRequest(provider_job_id=provider_job_id, account=HOSTED)
            )
        ).result_json
    )
    names = {entry.name for entry in result.artifacts}
    assert {"scores.npy", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= names
    for entry in result.artifacts:
        digest, size = hashlib.sha256(), 0
        async for chunk in await s3_store.get(job_key("job-s3", entry.name)):
            digest.update(chunk)
            size += len(chunk)
        assert (size, digest.hexdigest()) == (entry.bytes, entry.sha256), entry.name

    # RunPod saw URLs in the input and carried no file back: only progress and the small result.
    job = stack.fake.job(provider_job_id)
    assert job.input["artifact_transport"]["mode"] == "presigned"
    assert not [c for c in job.output if isinstance(c, dict) and c.get("type") == "artifact_part"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _chunk in stack.stub.FetchArtifact(
            compute_pb2.FetchArtifactRequest(
                provider_job_id=provider_job_id,
                account=HOSTED,
                name="scores.npy",
            )
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_refused_upload_fails_the_job_naming_the_file(
    stack: Stack, s3_store: ArtifactStore, s3_server: S3TestServer
) -> None:
    uploads = await upload_urls(s3_store, "job-bad-url")
    for upload in uploads:
        # The bucket is gone (or misnamed) by the time the worker uploads: S3 refuses the PUT.
        assert f"/{s3_server.bucket}/" in upload.url
        upload.url = upload.url.replace(f"/{s3_server.bucket}/", "/no-such-bucket/")
    _, final = await run(stack, "job-bad-url", uploads)
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert "could not be uploaded: uploading adapter/README.md" in final.error, final.error
    assert "HTTP 404: NoSuchBucket" in final.error and "X-Amz-Signature" not in final.error
    assert await s3_store.list("jobs/job-bad-url/") == []


async def test_without_a_reachable_store_files_come_back_inline_whole(stack: Stack) -> None:
    provider_job_id, final = await run(stack, "job-inline")
    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.error
    result = json.loads(
        (
            await stack.stub.GetResult(
                compute_pb2.GetResultRequest(provider_job_id=provider_job_id, account=HOSTED)
            )
        ).result_json
    )
    assert stack.fake.job(provider_job_id).input["artifact_transport"] == {
        "mode": "inline",
        "max_bytes": 5_000_000,
    }
    for entry in result["artifacts"]:
        data = b""
        async for chunk in stack.stub.FetchArtifact(
            compute_pb2.FetchArtifactRequest(
                provider_job_id=provider_job_id,
                account=HOSTED,
                name=entry["name"],
            )
        ):
            assert len(chunk.data) <= 384 * 1024
            data += chunk.data
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]


@pytest.mark.parametrize("service_overrides", [{"runpod_inline_artifacts_max_bytes": 100}], indirect=True)
async def test_a_matrix_over_the_inline_ceiling_is_refused_before_submitting(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Submit(
            compute_pb2.SubmitRequest(
                job_id="job-too-big",
                account=HOSTED,
                spec_json=spec_bytes(),
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details()
    assert "ARTIFACT_STORE_URL" in details and "Nothing was submitted" in details
    assert stack.fake.calls("job.run") == []


@pytest.mark.parametrize("service_overrides", [{"runpod_inline_artifacts_max_bytes": 2000}], indirect=True)
async def test_files_over_the_inline_ceiling_fail_the_job_in_plain_words(stack: Stack) -> None:
    # The matrix (2 x 4 floats) fits; the adapter and checkpoints written at the end do not.
    _, final = await run(stack, "job-adapter-too-big")
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert "over the 2.0 kB that can come back through RunPod" in final.error, final.error
    assert "ARTIFACT_STORE_URL" in final.error and "traceback" not in final.error.lower()
