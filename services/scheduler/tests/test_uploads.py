"""Direct uploads against the S3 test server: URLs for the planned names only, and the check of
what a worker uploaded before a job may complete."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest
from artifact_store import ArtifactStore, job_key, load_store_settings, open_store
from scheduler.artifacts import ArtifactTransferError
from scheduler.uploads import presigned_uploads, uploads_directly, verify_uploads

SPEC = {
    "training_data": [{"prompt": "a", "completion": "b"}],
    "eval_data": [{"prompt": "a", "expected": "b"}],
    "hyperparams": {"epochs": 2},
}


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def entry(name: str, data: bytes) -> dict:
    return {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "media_type": "application/octet-stream"}


def test_only_remote_providers_with_a_signing_store_upload_directly(
    s3_store: ArtifactStore, tmp_path
) -> None:
    local = open_store(load_store_settings(url=str(tmp_path)))
    assert uploads_directly("runpod", s3_store) and uploads_directly("modal", s3_store)
    assert not uploads_directly("local", s3_store)
    assert not uploads_directly("runpod", local)


async def test_urls_are_minted_for_the_planned_names_of_that_job_only(s3_store: ArtifactStore) -> None:
    uploads = await presigned_uploads(s3_store, "job-a", SPEC, expires_s=600)
    names = [u.name for u in uploads]
    assert "scores.npy" in names and "checkpoints/epoch-2.safetensors" in names
    assert all("/jobs/job-a/" in u.url and "X-Amz-Expires=600" in u.url for u in uploads)
    (scores,) = [u for u in uploads if u.name == "scores.npy"]
    async with httpx.AsyncClient() as http:
        assert (await http.put(scores.url, content=b"matrix")).status_code == 200
    assert (await s3_store.stat(job_key("job-a", "scores.npy"))).bytes == 6


async def test_verified_uploads_stay_and_unlisted_ones_are_removed(s3_store: ArtifactStore) -> None:
    await s3_store.put(job_key("job-b", "scores.npy"), chunks(b"matrix"))
    await s3_store.put(job_key("job-b", "checkpoints/epoch-1.safetensors"), chunks(b"left over"))
    await verify_uploads(s3_store, "job-b", [entry("scores.npy", b"matrix")])
    assert [i.key.rsplit("/", 1)[-1] for i in await s3_store.list("jobs/job-b/")] == ["scores.npy"]


@pytest.mark.parametrize(
    ("uploaded", "reported", "problem"),
    [
        (b"matrix", b"matrix!", "has 6 bytes, the worker reported 7"),
        (b"matrix", b"matrlx", "does not match the worker's sha256"),
        (None, b"matrix", "was never uploaded"),
    ],
)
async def test_a_missing_or_differing_upload_fails_and_leaves_nothing(
    s3_store: ArtifactStore, uploaded: bytes | None, reported: bytes, problem: str
) -> None:
    await s3_store.put(job_key("job-c", "adapter/adapter_config.json"), chunks(b"{}"))
    if uploaded is not None:
        await s3_store.put(job_key("job-c", "scores.npy"), chunks(uploaded))
    manifest = [entry("adapter/adapter_config.json", b"{}"), entry("scores.npy", reported)]
    with pytest.raises(ArtifactTransferError, match=problem):
        await verify_uploads(s3_store, "job-c", manifest)
    assert await s3_store.list("jobs/job-c/") == []
