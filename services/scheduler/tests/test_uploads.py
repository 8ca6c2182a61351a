"""Direct uploads against the S3 test server: URLs for the planned names only, and the check of
what a worker uploaded before a job may complete."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest

from artifact_store import ArtifactStore, StoreError, job_key, load_store_settings, open_store
from gpu_core.uploads import (
    CLAIM_NAME,
    CLAIM_READ_NAME,
    CREATE_ONLY,
    WORKER_RECORD_NAMES,
    claim_job,
    store_result,
)
from scheduler.artifacts import (
    ArtifactTransferError,
    StoreUnavailable,
    fetch_stored_result,
    read_worker_claim,
)
from scheduler.uploads import presigned_parent_downloads, presigned_uploads, uploads_directly, verify_uploads

SPEC = {
    "training_data": [{"prompt": "a", "completion": "b"}],
    "eval_data": [{"prompt": "a", "expected": "b"}],
    "hyperparams": {"epochs": 2},
}


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def entry(name: str, data: bytes) -> dict:
    return {
        "name": name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "media_type": "application/octet-stream",
    }


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
        assert (await http.put(scores.url, content=b"matrix", headers=CREATE_ONLY)).status_code == 200
    assert (await s3_store.stat(job_key("job-a", "scores.npy"))).bytes == 6


async def test_a_merge_gets_urls_for_its_merged_folder_and_a_query_for_its_records_only(
    s3_store: ArtifactStore,
) -> None:
    merge = [u.name for u in await presigned_uploads(s3_store, "job-m", SPEC, expires_s=600, kind="merge")]
    assert {"merged/config.json", "merged/model.safetensors", "merged/model-00128.safetensors"} <= set(merge)
    assert "scores.npy" not in merge and set(WORKER_RECORD_NAMES) <= set(merge)
    query = [u.name for u in await presigned_uploads(s3_store, "job-q", SPEC, expires_s=600, kind="query")]
    assert query == [*WORKER_RECORD_NAMES, CLAIM_READ_NAME]


async def test_a_sharded_experiments_parts_get_urls_for_their_own_files(s3_store: ArtifactStore) -> None:
    """The training job writes the adapter and checkpoints, an index shard its slice's index and
    columns (named by its request), the shard merge the scores, summary and index manifest."""
    spec = {**SPEC, "influence_method": "trackstar", "influence": {"shards": 2}}

    async def names(kind: str, request: dict | None = None) -> set[str]:
        uploads = await presigned_uploads(s3_store, f"job-{kind}", spec, 600, kind, request=request)
        return {u.name for u in uploads} - {*WORKER_RECORD_NAMES, CLAIM_READ_NAME}

    training = await names("training")
    assert "adapter/adapter_model.safetensors" in training and "checkpoints/epoch-2.safetensors" in training
    assert not any(name.startswith(("scores", "gradient_index")) for name in training)
    shard = await names("index_shard", {"shard": 1, "shards": 2, "start": 1, "stop": 2})
    assert "shards/shard-00001/scores.f8.npy" in shard
    assert "gradient_index/shard-00001/ckpt-1-shard-00000.npy" in shard
    assert all(name.startswith(("shards/shard-00001/", "gradient_index/shard-00001/")) for name in shard)
    assert await names("shard_merge") == {
        "scores.npy",
        "training_summary.json",
        "gradient_index/manifest.json",
        "gradient_index/ids.json",
    }


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


async def test_the_plan_carries_the_worker_records_and_verification_keeps_them(
    s3_store: ArtifactStore,
) -> None:
    uploads = {u.name: u.url for u in await presigned_uploads(s3_store, "job-w", SPEC, expires_s=600)}
    assert set(WORKER_RECORD_NAMES) <= set(uploads)
    claim = {"job_id": "job-w", "provider": "runpod", "provider_job_id": "rp-1", "claimed_at": 1.0}
    # The conditional create: the first claim wins, a second delivery's gets 412 from the store.
    assert claim_job(uploads[CLAIM_NAME], claim)
    assert not claim_job(uploads[CLAIM_NAME], {**claim, "provider_job_id": "rp-2"})
    # Read through the plan's GET of the claim: the provider job that holds it, delivered again
    # (its first worker failed), re-claims it; another provider job of the same job still cannot.
    assert claim_job(uploads[CLAIM_NAME], {**claim, "claimed_at": 2.0}, uploads[CLAIM_READ_NAME])
    assert not claim_job(uploads[CLAIM_NAME], {**claim, "provider_job_id": "rp-2"}, uploads[CLAIM_READ_NAME])
    store_result(uploads, {"artifacts": [], "note": "paid for"})
    await s3_store.put(job_key("job-w", "scores.npy"), chunks(b"matrix"))
    await verify_uploads(s3_store, "job-w", [entry("scores.npy", b"matrix")])
    found = await read_worker_claim(s3_store, "job-w")
    assert found is not None and found.provider_job_id == "rp-1"
    assert await fetch_stored_result(s3_store, "job-w") == b'{"artifacts":[],"note":"paid for"}'
    assert await read_worker_claim(s3_store, "job-none") is None


class FlakyStore:
    """The store as verify_uploads sees it, failing without a definite answer ``failures`` times
    (what a 503 or a timeout becomes once obstore's own retries give up)."""

    def __init__(self, inner: ArtifactStore, failures: int) -> None:
        self._inner = inner
        self.failures = failures
        self.deleted: list[str] = []

    def _maybe_fail(self, key: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreError(f"the artifact store failed to find {key!r}: HTTP 503 Slow Down")

    async def stat(self, key: str):
        self._maybe_fail(key)
        return await self._inner.stat(key)

    async def get(self, key: str):
        return await self._inner.get(key)

    async def list(self, prefix: str):
        return await self._inner.list(prefix)

    async def delete(self, key: str) -> None:
        self.deleted.append(key)
        await self._inner.delete(key)

    async def delete_prefix(self, prefix: str) -> int:
        self.deleted.append(prefix)
        return await self._inner.delete_prefix(prefix)


async def test_a_store_error_is_retried_and_never_deletes_files(s3_store: ArtifactStore) -> None:
    await s3_store.put(job_key("job-f", "scores.npy"), chunks(b"matrix"))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    flaky = FlakyStore(s3_store, failures=3)
    await verify_uploads(flaky, "job-f", [entry("scores.npy", b"matrix")], sleep=sleep)
    assert slept == [0.5, 1.0, 2.0] and flaky.deleted == []

    # Past the deadline: StoreUnavailable, and still nothing deleted.
    flaky = FlakyStore(s3_store, failures=1000)
    with pytest.raises(StoreUnavailable, match="left in place"):
        await verify_uploads(
            flaky, "job-f", [entry("scores.npy", b"matrix")], deadline_s=0.3, sleep=asyncio.sleep
        )
    assert flaky.deleted == []
    assert [i.key.rsplit("/", 1)[-1] for i in await s3_store.list("jobs/job-f/")] == ["scores.npy"]


def parent_result(method: str, manifest: list[dict]) -> dict:
    """The parts of an experiment's result the download planning reads."""
    from benchmarks.planted import planted_duplicate_spec, stand_in_result

    result = stand_in_result(planted_duplicate_spec(method, 4, 1, 1), method)
    return {**result, "artifacts": manifest}


async def test_a_query_gets_get_urls_for_the_files_it_reads_and_the_worker_checks_them(
    s3_store: ArtifactStore, tmp_path
) -> None:
    from gpu_core.uploads import ArtifactDownloadError, ParentArtifact, download_artifacts

    files = {
        "adapter/adapter_config.json": b'{"r": 8}',
        "adapter/adapter_model.safetensors": b"weights",
        "gradient_index/manifest.json": b"{}",
        "checkpoints/epoch-1.safetensors": b"state",
        "scores.npy": b"matrix",
    }
    for name, data in files.items():
        await s3_store.put(job_key("parent", name), chunks(data))
    stored = [entry(name, data) for name, data in files.items()]
    # The verified manifest no longer lists the checkpoint (as after a partial sweep): no URL.
    listed = [e for e in stored if not e["name"].startswith("checkpoints/")]
    result = parent_result("trackstar", stored)
    downloads = await presigned_parent_downloads(s3_store, "parent", listed, result, expires_s=600)
    assert [d.name for d in downloads] == [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "gradient_index/manifest.json",
    ]
    assert all("/jobs/parent/" in d.url and "X-Amz-Expires=600" in d.url for d in downloads)
    # DataInf has no index: the adapter only.
    datainf = await presigned_parent_downloads(
        s3_store, "parent", stored, parent_result("datainf", stored), expires_s=600
    )
    assert [d.name for d in datainf] == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    # A merge reads the adapter only, whatever the method stored beside it.
    merge = await presigned_parent_downloads(s3_store, "parent", listed, result, expires_s=600, kind="merge")
    assert [d.name for d in merge] == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]

    # The worker's side: streamed to disk under the manifest names, size and sha256 checked.
    entries = [ParentArtifact(d.name, d.url, d.sha256, d.bytes) for d in downloads]
    await s3_store.delete(job_key("parent", "gradient_index/manifest.json"))  # gone: recomputed
    got = download_artifacts(entries, tmp_path / "parent")
    assert got == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    assert (tmp_path / "parent" / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert not (tmp_path / "parent" / "gradient_index" / "manifest.json").exists()
    await s3_store.put(job_key("parent", "adapter/adapter_model.safetensors"), chunks(b"other!!"))
    with pytest.raises(ArtifactDownloadError, match="adapter/adapter_model.safetensors arrived with 7 bytes"):
        download_artifacts(entries[1:2], tmp_path / "again")
    assert list((tmp_path / "again").rglob("*.safetensors*")) == []


async def test_a_store_that_cannot_sign_names_its_files_on_this_host(tmp_path) -> None:
    """The local store signs nothing: a job reads the files where they lie (compute-local, on the
    same host), copied and checked as a download is."""
    from gpu_core.uploads import ParentArtifact, download_artifacts

    local = open_store(load_store_settings(url=str(tmp_path / "store")))
    await local.put(job_key("p", "adapter/adapter_config.json"), chunks(b"{}"))
    stored = [entry("adapter/adapter_config.json", b"{}")]
    entries = await presigned_parent_downloads(local, "p", stored, parent_result("tracin", stored), 60)
    assert [e.url for e in entries] == [(tmp_path / "store" / "jobs/p/adapter/adapter_config.json").as_uri()]
    parsed = [ParentArtifact(e.name, e.url, e.sha256, e.bytes) for e in entries]
    assert download_artifacts(parsed, tmp_path / "copy") == ["adapter/adapter_config.json"]
    assert (tmp_path / "copy" / "adapter" / "adapter_config.json").read_bytes() == b"{}"
