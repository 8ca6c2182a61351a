"""Both backends against real storage: a directory, and an S3-protocol server on loopback."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from artifact_store import (
    ArtifactNotFound,
    ArtifactStore,
    ChecksumMismatch,
    InvalidArtifactName,
    PresignNotSupported,
    StoreError,
    check_artifact_name,
    job_key,
    load_store_settings,
    open_store,
)
from devstack.s3_server import S3TestServer, s3_test_server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3TestServer]:
    with s3_test_server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return open_store(load_store_settings(url=str(tmp_path / "artifacts")))
    server: S3TestServer = request.getfixturevalue("s3_server")
    return open_store(server.store_settings(prefix=f"t-{os.urandom(4).hex()}"))


async def _chunks(data: bytes, size: int = 1 << 20) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _read(store: ArtifactStore, key: str) -> bytes:
    return b"".join([chunk async for chunk in await store.get(key)])


async def test_put_get_stat_list_delete(store: ArtifactStore) -> None:
    data = os.urandom(9 * (1 << 20) + 123)  # more than two upload parts
    key = job_key("job-1", "adapter/adapter_model.safetensors")
    put = await store.put(key, _chunks(data))
    assert (put.bytes, put.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert await _read(store, key) == data
    assert (await store.stat(key)).bytes == len(data)
    await store.put(job_key("job-1", "scores.npy"), _chunks(b"abc"))
    await store.put(job_key("job-10", "scores.npy"), _chunks(b"other job"))
    listed = [info.key for info in await store.list("jobs/job-1/")]
    assert listed == ["jobs/job-1/adapter/adapter_model.safetensors", "jobs/job-1/scores.npy"]
    await store.delete(job_key("job-1", "scores.npy"))
    await store.delete(job_key("job-1", "scores.npy"))  # gone already: not an error
    assert await store.delete_prefix("jobs/job-1/") == 1
    assert await store.list("jobs/job-1/") == []
    assert await _read(store, job_key("job-10", "scores.npy")) == b"other job"
    with pytest.raises(ArtifactNotFound):
        await store.stat(key)
    with pytest.raises(ArtifactNotFound):
        await store.get(key)


async def test_failed_put_leaves_nothing(store: ArtifactStore) -> None:
    async def breaks_midway() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield os.urandom(3 << 20)
        raise OSError("the source went away")

    with pytest.raises((OSError, StoreError)):
        await store.put(job_key("job-2", "scores.npy"), breaks_midway())
    assert await store.list("jobs/job-2/") == []


async def test_checksum_mismatch_is_never_committed(store: ArtifactStore) -> None:
    data = os.urandom(5 << 20)
    key = job_key("job-3", "scores.npy")
    with pytest.raises(ChecksumMismatch):
        await store.put(key, _chunks(data), expected_sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(ChecksumMismatch):
        await store.put(key, _chunks(data), expected_bytes=len(data) + 1)
    assert await store.list("jobs/job-3/") == []
    put = await store.put(key, _chunks(data), expected_sha256=hashlib.sha256(data).hexdigest())
    assert put.bytes == len(data)


async def test_presigned_put_and_get_work_over_plain_http(s3_server: S3TestServer) -> None:
    store = open_store(s3_server.store_settings(prefix="presign"))
    key = job_key("job-4", "adapter/adapter_config.json")
    data = b'{"r": 8}'
    put_url = await store.presigned_url("PUT", key)
    async with httpx.AsyncClient() as client:
        assert (await client.put(put_url, content=data)).status_code == 200
        assert await _read(store, key) == data
        get_url = await store.presigned_url("GET", key, expires_s=60)
        answer = await client.get(get_url)
        assert answer.status_code == 200 and answer.content == data
    # Signed for 60 s (moto does not check signatures, so expiry itself is S3's to enforce).
    assert "X-Amz-Expires=60" in get_url and "X-Amz-Signature=" in get_url
    assert "test-secret-key" not in put_url and "test-secret-key" not in get_url


async def test_local_store_has_no_presigned_urls(tmp_path: Path) -> None:
    store = open_store(load_store_settings(url=str(tmp_path)))
    with pytest.raises(PresignNotSupported):
        await store.presigned_url("GET", job_key("job-5", "scores.npy"))


async def test_missing_bucket_fails_with_a_plain_message(s3_server: S3TestServer) -> None:
    store = open_store(
        load_store_settings(
            url="s3://no-such-bucket/x",
            endpoint_url=s3_server.endpoint_url,
            access_key_id="a",
            secret_access_key="wrong-secret-value",
        )
    )
    with pytest.raises(StoreError) as failure:
        await store.put(job_key("job-6", "scores.npy"), _chunks(b"x"))
    assert "artifact store" in str(failure.value) and "wrong-secret-value" not in str(failure.value)


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "..", "a\\b", "x#1", "a/./b", "sp ace"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArtifactName):
        check_artifact_name(name)
    assert check_artifact_name("checkpoints/epoch-1.safetensors")


def test_settings_name_the_bad_variable_and_hide_keys() -> None:
    with pytest.raises(ValueError, match="ARTIFACT_STORE_URL"):
        load_store_settings(url="gs://bucket")
    with pytest.raises(ValueError, match="ARTIFACT_STORE_ENDPOINT_URL"):
        load_store_settings(endpoint_url="minio:9000")
    settings = load_store_settings(url="s3://b/p", secret_access_key="hunter2-secret")
    assert "hunter2-secret" not in repr(settings) and settings.is_s3
