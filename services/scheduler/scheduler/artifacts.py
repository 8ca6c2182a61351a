"""Moving a job's artifacts from its provider into the artifact store, and checking them.

The result's manifest ([{name, bytes, sha256, media_type}]) is the contract: each file is streamed
chunk by chunk from the provider (ComputeProvider.FetchArtifact) into the store, hashed on the way,
and committed only when its size and sha256 match the manifest. A transfer that fails is retried
a bounded number of times; when it still fails, everything already stored for the job is removed
and the job fails with a plain message, so a failed job never lists partial files.

Workers far from us also leave two records in the store (gpu_core.uploads): their claim on the
job (``read_worker_claim``) and the result JSON (``fetch_stored_result``), which outlive the
provider's own retention.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram

from artifact_store import (
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactName,
    StoreError,
    check_artifact_name,
    job_key,
    job_prefix,
)
from gpu_core.uploads import CLAIM_NAME, RESULT_NAME
from influence.v1 import common_pb2
from scheduler.providers import ProviderClient, ProviderError

log = logging.getLogger(__name__)

ARTIFACT_BYTES = Counter("scheduler_artifact_bytes_total", "Artifact bytes moved into the store")
ARTIFACT_SECONDS = Histogram(
    "scheduler_artifact_transfer_seconds",
    "Time to move one job's artifacts into the store",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1800),
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RETRY_DELAY_S = 0.5


class ArtifactTransferError(Exception):
    """The artifacts could not be moved; the message is for the researcher."""


class StoreUnavailable(ArtifactTransferError):
    """The store failed without a definite answer until a deadline; nothing was deleted, so the
    check can be tried again later."""


@dataclass(frozen=True)
class WorkerClaim:
    """The claim a RunPod or Modal worker created before any GPU work (gpu_core.uploads
    ``claim_job``): which provider job is running our job."""

    job_id: str
    provider: str
    provider_job_id: str
    claimed_at: float


async def read_worker_claim(store: ArtifactStore, job_id: str) -> WorkerClaim | None:
    """The worker's claim on ``job_id``, None when no delivery has started it (yet). This is how
    an ambiguous submit is reconciled: RunPod cannot look a job up by our id, but the worker that
    took it wrote its RunPod job id here. Raises StoreError when the store fails."""
    body = await _read_record(store, job_id, CLAIM_NAME)
    if body is None:
        return None
    try:
        data = json.loads(body)
        return WorkerClaim(
            job_id=str(data["job_id"]),
            provider=str(data.get("provider", "")),
            provider_job_id=str(data["provider_job_id"]),
            claimed_at=float(data.get("claimed_at", 0.0)),
        )
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"the worker's claim on job {job_id} in the artifact store is malformed") from None


async def fetch_stored_result(store: ArtifactStore, job_id: str) -> bytes | None:
    """The result JSON (UTF-8, the bytes ComputeProvider.GetResult answers) that the worker wrote
    to the store beside the job's files, or None when there is none (the run has not ended, it
    failed, or the store was unreachable from the worker). For a job whose provider has forgotten
    it (RunPod keeps a result 30 minutes): the follower calls this before failing the job.
    Raises StoreError when the store fails without a definite answer (try again later)."""
    return await _read_record(store, job_id, RESULT_NAME)


async def _read_record(store: ArtifactStore, job_id: str, name: str) -> bytes | None:
    try:
        chunks = [chunk async for chunk in await store.get(job_key(job_id, name))]
    except ArtifactNotFound:
        return None
    return b"".join(chunks)


@dataclass(frozen=True)
class Transfer:
    artifacts: list[dict[str, Any]]
    seconds: float


def parse_manifest(raw: Any) -> list[dict[str, Any]]:
    """The result's artifacts list, checked entry by entry."""
    if not isinstance(raw, list):
        raise ArtifactTransferError("the result's artifacts list is not a list")
    entries, seen = [], set()
    for item in raw:
        if not isinstance(item, dict):
            raise ArtifactTransferError("an entry of the result's artifacts list is not an object")
        name, size, sha256 = item.get("name"), item.get("bytes"), item.get("sha256")
        try:
            check_artifact_name(name if isinstance(name, str) else "")
        except InvalidArtifactName as exc:
            raise ArtifactTransferError(f"the result lists an invalid artifact: {exc}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ArtifactTransferError(f"artifact {name!r} has no valid size")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ArtifactTransferError(f"artifact {name!r} has no valid sha256")
        if name in seen:
            raise ArtifactTransferError(f"artifact {name!r} is listed twice")
        seen.add(name)
        media_type = item.get("media_type")
        if not isinstance(media_type, str) or not media_type:
            media_type = "application/octet-stream"
        entries.append({"name": name, "bytes": size, "sha256": sha256, "media_type": media_type})
    return entries


class ArtifactMover:
    def __init__(
        self,
        store: ArtifactStore,
        attempts: int,
        timeout_s: float,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.store = store
        self._attempts = attempts
        self._timeout_s = timeout_s
        self._sleep = sleep

    async def collect(
        self,
        job_id: str,
        provider_job_id: str,
        client: ProviderClient,
        account: common_pb2.Account,
        manifest: list[dict[str, Any]],
    ) -> Transfer:
        """Stream every listed file into the store and verify it; raises ArtifactTransferError
        (having removed whatever was stored) when one cannot be moved."""
        started = time.monotonic()
        try:
            for entry in manifest:
                await self._move_one(job_id, provider_job_id, client, account, entry)
        except ArtifactTransferError:
            await self.remove_all(job_id)
            raise
        seconds = time.monotonic() - started
        ARTIFACT_SECONDS.observe(seconds)
        log.info(
            "artifacts stored",
            extra={
                "job_id": job_id,
                "count": len(manifest),
                "bytes": sum(e["bytes"] for e in manifest),
                "seconds": round(seconds, 3),
            },
        )
        return Transfer(artifacts=manifest, seconds=seconds)

    async def _move_one(
        self,
        job_id: str,
        provider_job_id: str,
        client: ProviderClient,
        account: common_pb2.Account,
        entry: dict[str, Any],
    ) -> None:
        name = entry["name"]
        for attempt in range(1, self._attempts + 1):
            chunks = client.fetch_artifact(job_id, provider_job_id, account, name, self._timeout_s)
            try:
                stored = await self.store.put(
                    job_key(job_id, name),
                    chunks,
                    expected_sha256=entry["sha256"],
                    expected_bytes=entry["bytes"],
                )
                ARTIFACT_BYTES.inc(stored.bytes)
                return
            except ProviderError as exc:
                problem, retry = f"the {client.name} provider could not send it: {exc.message}", exc.retryable
            except StoreError as exc:
                problem, retry = str(exc), True
            finally:
                await chunks.aclose()
            log.warning(
                "artifact transfer failed",
                extra={"job_id": job_id, "artifact": name, "attempt": attempt, "error": problem},
            )
            if not retry or attempt == self._attempts:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise ArtifactTransferError(f"artifact {name!r} could not be stored{tries}: {problem}")
            await self._sleep(_RETRY_DELAY_S * attempt)

    async def remove_all(self, job_id: str) -> int:
        """Delete every stored artifact of the job (best effort: a store that is down is logged)."""
        try:
            return await self.store.delete_prefix(job_prefix(job_id))
        except StoreError as exc:
            log.error("could not remove a job's artifacts", extra={"job_id": job_id, "error": str(exc)})
            return 0
