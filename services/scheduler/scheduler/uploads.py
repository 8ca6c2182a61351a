"""Direct uploads: workers far from us (RunPod, Modal) put a job's files straight into the artifact
store through presigned PUT URLs that the scheduler mints, and the scheduler checks them there.

The store's credentials stay in the scheduler. Before the job is COMPLETED every file of the
result's manifest is read back from the store in chunks and its size and sha256 compared;
anything else found under the job's prefix (an upload whose job then failed, a file the manifest
does not list) is removed, so the store lists exactly what was verified and the worker's two
records (``_worker/claim.json``, ``_worker/result.json``, see gpu_core.uploads;
scheduler.artifacts reads them). A store that fails without a definite answer is retried until a
deadline and never makes a job's files look missing.

Uploads bounded in size by the store. Where the deployment has a public address
(``scheduler_webhook_base_url``, the gateway as workers reach it), the plan sent with a job holds
no URL for its files: it holds the job's upload route (gpu_core.uploads ``UPLOAD_GRANT_NAME``,
``{base}/api/uploads/{job id}/{secret}``, a fresh per-job secret whose sha256 alone is stored,
with the submit, never logged). When the worker has a file to upload it knows its size and sha256
and asks there (gateway uploads_api, RPC GrantUpload, ``grant_upload``); the scheduler checks the
secret (constant time), that the job is still active, that the name is one the job may write
(``upload_names``: ``gpu_core.uploads.planned_artifact_names`` and the result record), and that
the size is within ``scheduler_upload_max_file_bytes`` and, with every URL granted before (each
name counted at the largest size granted for it), ``scheduler_upload_max_job_bytes``. The URL
it answers signs ``Content-Length`` of that size, ``If-None-Match: *`` and, with
``scheduler_upload_checksum``, ``x-amz-checksum-sha256``: the store refuses a body of another
size (the signature does not match) or, where it checks checksums (S3, R2, MinIO), other bytes.
It lives ``scheduler_upload_grant_ttl_s``. Files go up in one PUT each (never multipart: S3's
5 GiB for one PUT caps ``scheduler_upload_max_file_bytes``). The claim's URL is minted at dispatch
for exactly ``gpu_core.uploads.CLAIM_BYTES`` (the worker pads its claim to that size), so it is
bounded too.

Without a public address (a deployment whose workers cannot reach the gateway) every URL is
minted at dispatch, one per name the run may write, for ``scheduler_upload_url_ttl_s``: create-only
but not bounded in size, which S3 cannot do for a PUT whose size is unknown when it is signed (a
POST policy's content-length-range can, but POST uploads cannot be conditional). Sizes are then
checked only when the files are verified, and the sweep bounds how long an oversized upload can
stay. That is safe only where the operator runs the worker image (the hosted Modal app, the
hosted RunPod endpoint); a BYOK researcher controls their endpoint's image, so a deployment that
offers RunPod keys should set the public address (INSTRUCTIONS.md, docs/services.md); the
scheduler warns at start when it does not.

Every upload URL is create-only: it signs ``If-None-Match: *`` (gpu_core.uploads.CREATE_ONLY), so
the store refuses a request without that header (the signature does not match) and, with it,
refuses to write over an object that exists (412). A verified file cannot be replaced, and a
deleted job's URLs die with it: ``occupy_upload_names`` puts an empty placeholder at every name
its URLs may write (and the upload route answers 404 once the row is gone), and
``sweep_orphans`` removes the placeholders once the URLs have expired, with anything else under
``jobs/`` that no job lists (a late upload after a failure, a job whose row is gone).

The URLs minted at dispatch (the claim's among them) live ``scheduler_upload_url_ttl_s`` (default
25 h), longer than RunPod keeps a job in all (RUNPOD_JOB_TTL_S, 24 h: queue wait and run
together), and compute-runpod caps each job's ttl to the life its URLs have left: a job that
waited in RunPod's queue still uploads, and one that could not is dropped by RunPod unrun rather
than run to a 403.

Where the store cannot mint URLs (the local filesystem, the embedded default) nothing is minted
and the files come back through the provider (``ComputeProvider.FetchArtifact``), as for
compute-local; each provider bounds what it can carry that way.

Downloads go the other way for a later job that reads its experiment's files (a follow-up query,
a merge):
one presigned GET URL per file ``gpu_core.uploads.needed_parent_artifacts`` names, for those the
experiment's verified manifest still lists (the retention sweep empties it), each with the
manifest's size and sha256 so the worker can check what it got. Every provider gets them when the
store can sign: compute-local reads its own folder of the experiment first and uses them only
when that folder has gone. A file with no URL is recomputed by the worker.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from artifact_store import ArtifactNotFound, ArtifactStore, ObjectInfo, StoreError, job_key, job_prefix
from gpu_core.jobs import EXPERIMENT, QUERY, READS_PARENT_ARTIFACTS, WRITES_ARTIFACTS, parse_result
from gpu_core.schemas import NO_SIZE_LIMITS, parse_spec
from gpu_core.uploads import (
    CLAIM_BYTES,
    CLAIM_NAME,
    CLAIM_READ_NAME,
    CREATE_ONLY,
    UPLOAD_GRANT_NAME,
    WORKER_RECORD_NAMES,
    needed_parent_artifacts,
    planned_job_artifact_names,
)
from influence.v1 import compute_pb2
from scheduler.artifacts import ArtifactTransferError, StoreUnavailable
from scheduler.store import Store, UploadBudgetExceeded
from service_runtime.jobs import ACTIVE_STATES

log = logging.getLogger(__name__)

# How long verify_uploads keeps retrying a store that fails without a definite answer.
VERIFY_DEADLINE_S = 300.0
_VERIFY_FIRST_DELAY_S = 0.5
_VERIFY_MAX_DELAY_S = 15.0

# Providers whose workers run outside this deployment's network and can upload directly.
DIRECT_UPLOAD_PROVIDERS = frozenset({"runpod", "modal"})


def uploads_directly(provider: str, store: ArtifactStore) -> bool:
    """Whether the job's worker puts its files in the store itself: a remote provider, and a
    store that can mint create-only URLs (its keys set; with a workload identity alone the
    files come back through the provider)."""
    return provider in DIRECT_UPLOAD_PROVIDERS and store.signs_headers


async def presigned_uploads(
    store: ArtifactStore,
    job_id: str,
    spec: dict[str, Any] | None,
    expires_s: int,
    kind: str = EXPERIMENT,
    grant_url: str = "",
    request: dict[str, Any] | None = None,
) -> list[compute_pb2.ArtifactUpload]:
    """The job's upload plan: a create-only PUT of the worker's claim, of exactly
    ``CLAIM_BYTES``, and a GET of it (``CLAIM_READ_NAME``: a re-delivered provider job finds its
    own claim); then, with ``grant_url`` (the job's upload route, the secret in its path), that
    route, where the worker asks for each file's URL of its size (``grant_upload``); without it,
    one create-only PUT URL per other name the job's run may write (``upload_names``: an
    experiment's, a later job's of ``kind``, e.g. a merge's ``merged/`` folder or an index
    shard's slice named by its ``request``, and the result record), not bounded in size.
    ``spec`` None: a job that writes only the worker's records (a query, a counterfactual check)."""
    claim_only = {**CREATE_ONLY, "Content-Length": str(CLAIM_BYTES)}
    names = [CLAIM_NAME] if grant_url else upload_names(spec, kind, request)
    plan = [
        compute_pb2.ArtifactUpload(
            name=name,
            url=await store.presigned_url(
                "PUT",
                job_key(job_id, name),
                expires_s,
                signed_headers=claim_only if name == CLAIM_NAME else CREATE_ONLY,
            ),
        )
        for name in names
    ]
    plan.append(
        compute_pb2.ArtifactUpload(
            name=CLAIM_READ_NAME, url=await store.presigned_url("GET", job_key(job_id, CLAIM_NAME), expires_s)
        )
    )
    if grant_url:
        plan.append(compute_pb2.ArtifactUpload(name=UPLOAD_GRANT_NAME, url=grant_url))
    return plan


def upload_names(
    spec: dict[str, Any] | None, kind: str = EXPERIMENT, request: dict[str, Any] | None = None
) -> list[str]:
    """Every name a job may upload to: minted at dispatch (``presigned_uploads``), or asked for
    one at a time (``grant_upload``: never the claim, whose URL is always minted at dispatch);
    ``request``: an index shard's, which names its slice."""
    if spec is None:
        return list(WORKER_RECORD_NAMES)
    planned = planned_job_artifact_names(kind, parse_spec(spec, NO_SIZE_LIMITS), request)
    return [*planned, *WORKER_RECORD_NAMES]


async def occupy_upload_names(
    store: ArtifactStore,
    job_id: str,
    spec: dict[str, Any] | None,
    kind: str = EXPERIMENT,
    request: dict[str, Any] | None = None,
) -> int:
    """Put an empty object at every name the job's URLs may write, so that each URL, being
    create-only, is refused by the store (412) until it expires: a deleted job's URLs die with
    it. ``sweep_orphans`` removes these once the URLs have expired. Returns how many."""
    names = upload_names(spec, kind, request)
    for name in names:
        await store.put(job_key(job_id, name), _empty())
    return len(names)


class UploadRefused(Exception):
    """The upload route's refusal: a gRPC status code's name and a message that never holds the
    secret."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int
    max_job_bytes: int
    url_ttl_s: int
    sign_checksum: bool


_SHA256 = re.compile(r"[0-9a-f]{64}")
# Compared with when a job holds no upload secret, so every refusal takes the same time.
_NO_SECRET = bytes(32)


async def grant_upload(
    db: Store,
    store: ArtifactStore,
    limits: UploadLimits,
    job_id: str,
    secret: str,
    name: str,
    size: int,
    sha256: str,
) -> tuple[str, dict[str, str]]:
    """A presigned PUT URL for one file of the job, of exactly ``size`` bytes, and the headers
    its request must carry (each signed); raises UploadRefused: NOT_FOUND for no such job (or a
    deleted one), PERMISSION_DENIED for a wrong secret, FAILED_PRECONDITION for a job that has
    ended, INVALID_ARGUMENT for a name it may not write or a malformed request, OUT_OF_RANGE for
    a size over the limits."""
    job = await db.upload_grant_job(job_id)
    if job is None:
        raise UploadRefused("NOT_FOUND", "no such job (a deleted job's uploads are refused)")
    offered = hashlib.sha256(secret.encode()).digest()
    matches = [hmac.compare_digest(offered, stored) for stored in job.secret_sha256s or (_NO_SECRET,)]
    if not job.secret_sha256s or not any(matches):
        raise UploadRefused("PERMISSION_DENIED", "the upload secret is not this job's")
    if job.status not in ACTIVE_STATES:
        raise UploadRefused(
            "FAILED_PRECONDITION", f"the job has ended ({job.status}); it takes no more uploads"
        )
    # As the dispatcher plans it: a job that writes no files (a query, a check) writes the records.
    writes_files = job.kind in WRITES_ARTIFACTS
    if name == CLAIM_NAME or name not in upload_names(
        job.spec if writes_files else None, job.kind, job.request
    ):
        raise UploadRefused(
            "INVALID_ARGUMENT", f"{name[:200]!r} is not a file this job may write (gpu_core.uploads)"
        )
    if not _SHA256.fullmatch(sha256):
        raise UploadRefused("INVALID_ARGUMENT", "sha256 must be 64 lower-case hex digits")
    if size < 0:
        raise UploadRefused("INVALID_ARGUMENT", "bytes must be 0 or more")
    if size > limits.max_file_bytes:
        raise UploadRefused(
            "OUT_OF_RANGE",
            f"{name} is {size} bytes, over the {limits.max_file_bytes} bytes one file may have "
            "(SCHEDULER_UPLOAD_MAX_FILE_BYTES)",
        )
    try:
        still_active = await db.record_upload_grant(job_id, name, size, limits.max_job_bytes)
    except UploadBudgetExceeded as exc:
        raise UploadRefused(
            "OUT_OF_RANGE",
            f"with {name} ({size} bytes) the job's uploads would add up to {exc.total} bytes, over "
            f"the {limits.max_job_bytes} bytes one job may upload (SCHEDULER_UPLOAD_MAX_JOB_BYTES)",
        ) from None
    if not still_active:
        raise UploadRefused("FAILED_PRECONDITION", "the job has ended; it takes no more uploads")
    headers = {**CREATE_ONLY, "Content-Length": str(size)}
    if limits.sign_checksum:
        headers["x-amz-checksum-sha256"] = base64.b64encode(bytes.fromhex(sha256)).decode("ascii")
    url = await store.presigned_url("PUT", job_key(job_id, name), limits.url_ttl_s, signed_headers=headers)
    log.info("upload URL granted", extra={"job_id": job_id, "artifact": name, "bytes": size})
    return url, headers


async def _empty() -> AsyncIterator[bytes]:
    yield b""


def reads_parent_artifacts(kind: str) -> bool:
    return kind in READS_PARENT_ARTIFACTS


async def presigned_parent_downloads(
    store: ArtifactStore,
    parent_job_id: str,
    stored_manifest: list[dict[str, Any]],
    parent_result: Any,
    expires_s: int,
    kind: str = QUERY,
    local_paths: bool = False,
) -> list[compute_pb2.ParentArtifact]:
    """One GET URL (``download_url``) per experiment file the later job needs and the store
    still holds (compute-local reads its own folder of the experiment first, when it has one).
    A store that cannot sign gives file:// paths only with ``local_paths`` (compute-local, on
    this host); for a remote worker none (it recomputes what it lacks)."""
    if not parent_result or not (store.supports_presign or local_paths):
        return []
    stored = {entry["name"]: entry for entry in stored_manifest}
    needed = [name for name in needed_parent_artifacts(parse_result(parent_result), kind) if name in stored]
    return await part_downloads(store, [(parent_job_id, stored[name]) for name in needed], expires_s)


async def part_downloads(
    store: ArtifactStore, files: list[tuple[str, dict[str, Any]]], expires_s: int
) -> list[compute_pb2.ParentArtifact]:
    """One GET URL per (job id, verified manifest entry): the files of other jobs a job reads
    (its experiment's, or a sharded experiment's training job's and shards')."""
    return [
        compute_pb2.ParentArtifact(
            name=entry["name"],
            url=await download_url(store, job_key(job_id, entry["name"]), expires_s),
            sha256=entry["sha256"],
            bytes=entry["bytes"],
        )
        for job_id, entry in files
    ]


async def download_url(store: ArtifactStore, key: str, expires_s: int) -> str:
    """A GET of ``key``: presigned where the store signs, else a file:// path in the local store
    (which only compute-local, on this host, can read)."""
    if store.supports_presign:
        return await store.presigned_url("GET", key, expires_s)
    return store.local_path(key).as_uri()


async def verify_uploads(
    store: ArtifactStore,
    job_id: str,
    manifest: list[dict[str, Any]],
    deadline_s: float = VERIFY_DEADLINE_S,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """Check every manifest file in the store (size, then sha256 over a chunked read) and remove
    what the manifest does not list (the worker's records under ``_worker/`` stay). Only a
    definite answer counts against the worker: a file the store says is not there (404), or
    one that differs, raises ArtifactTransferError having removed everything under the job's
    prefix. Any other store failure (a 5xx, a timeout) is retried with backoff until
    ``deadline_s`` and then raises StoreUnavailable, with every file left in place."""
    started = time.monotonic()
    delay = _VERIFY_FIRST_DELAY_S
    while True:
        try:
            await _verify_all(store, job_id, manifest)
            return
        except ArtifactTransferError:
            await remove_uploads(store, job_id)
            raise
        except StoreError as exc:
            waited = time.monotonic() - started
            if waited + delay > deadline_s:
                raise StoreUnavailable(
                    f"the artifact store could not be checked for {round(waited)} s ({exc}); the "
                    "job's files were left in place"
                ) from None
            log.warning(
                "artifact store failed while verifying uploads; retrying",
                extra={"job_id": job_id, "error": str(exc), "retry_in_s": delay},
            )
            await sleep(delay)
            delay = min(delay * 2, _VERIFY_MAX_DELAY_S)


async def _verify_all(store: ArtifactStore, job_id: str, manifest: list[dict[str, Any]]) -> None:
    for entry in manifest:
        await _verify_one(store, job_id, entry)
    listed = {job_key(job_id, entry["name"]) for entry in manifest}
    records = {job_key(job_id, name) for name in WORKER_RECORD_NAMES}
    for info in await store.list(job_prefix(job_id)):
        if info.key not in listed and info.key not in records:
            log.warning("removing an unlisted upload", extra={"job_id": job_id, "key": info.key})
            await store.delete(info.key)


async def _verify_one(store: ArtifactStore, job_id: str, entry: dict[str, Any]) -> None:
    name, key = entry["name"], job_key(job_id, entry["name"])
    try:
        info = await store.stat(key)
    except ArtifactNotFound:
        raise ArtifactTransferError(
            f"artifact {name!r} is listed in the worker's result but was never uploaded to the store"
        ) from None
    if info.bytes != entry["bytes"]:
        raise ArtifactTransferError(
            f"artifact {name!r} in the store has {info.bytes} bytes, the worker reported {entry['bytes']}"
        )
    digest = hashlib.sha256()
    async for chunk in await store.get(key):
        digest.update(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise ArtifactTransferError(
            f"artifact {name!r} in the store does not match the worker's sha256 (corrupted upload)"
        )


async def remove_uploads(store: ArtifactStore, job_id: str) -> None:
    """Remove whatever the worker uploaded for a job that will not complete (best effort)."""
    try:
        await store.delete_prefix(job_prefix(job_id))
    except StoreError as exc:
        log.error("could not remove a job's uploads", extra={"job_id": job_id, "error": str(exc)})


# The store's jobs' prefix, and how many job ids the sweep looks up at once.
_JOBS_PREFIX = "jobs/"
_SWEEP_BATCH = 500


async def sweep_orphans(
    store: ArtifactStore,
    owners: Callable[[list[str]], Awaitable[dict[str, tuple[bool, set[str]]]]],
    upload_url_ttl_s: float,
    now: datetime | None = None,
) -> int:
    """Remove the objects under ``jobs/`` that belong to no listed artifact; returns how many.
    ``owners`` answers, for a list of job ids, which are jobs, whether each has ended, and the
    names its verified manifest lists (Store.artifact_owners). A job still running keeps all
    its objects; an ended one keeps its manifest's files and the worker's records; a job that
    is gone (deleted) keeps nothing, but only once its objects are older than the upload URLs
    live, so a deleted job's placeholders (``occupy_upload_names``) outlast its URLs."""
    now = now or datetime.now(UTC)
    by_job: dict[str, list[ObjectInfo]] = {}
    for info in await store.list(_JOBS_PREFIX):
        job_id = info.key.removeprefix(_JOBS_PREFIX).split("/", 1)[0]
        by_job.setdefault(job_id, []).append(info)
    job_ids = sorted(by_job)
    removed = 0
    for start in range(0, len(job_ids), _SWEEP_BATCH):
        batch = job_ids[start : start + _SWEEP_BATCH]
        known = await owners(batch)
        for job_id in batch:
            for info in by_job[job_id]:
                if _orphaned(info, job_id, known.get(job_id), upload_url_ttl_s, now):
                    await store.delete(info.key)
                    removed += 1
    if removed:
        log.info("orphaned uploads removed", extra={"objects": removed})
    return removed


def _orphaned(
    info: ObjectInfo, job_id: str, owner: tuple[bool, set[str]] | None, ttl_s: float, now: datetime
) -> bool:
    if owner is None:
        return info.last_modified < now - timedelta(seconds=ttl_s)
    ended, listed = owner
    name = info.key.removeprefix(_JOBS_PREFIX + job_id + "/")
    return ended and name not in listed and name not in WORKER_RECORD_NAMES
