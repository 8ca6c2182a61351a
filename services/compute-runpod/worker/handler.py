"""RunPod Serverless worker: runs one job per request with gpu_core (an experiment, or a later job
of one such as a counterfactual check; gpu_core.jobs) and streams it.

Every progress event is yielded as one stream chunk. The result comes last: whole as
``{"type": "result", "result": {...}}`` when its JSON fits in one safe chunk, else as numbered
``{"type": "result_part", "index", "total", "sha256", "data"}`` slices of that JSON text, because
RunPod caps a stream chunk at 1 MB. (A generator's ``return`` value is never delivered, so
nothing is returned.) ``return_aggregate_stream`` is on, so every yield goes up again in the
job's final output, which RunPod caps at 10 MB for ``/run``: a result that would not fit is
refused here with a plain error rather than lost in a failed upload.

Expected failures (an invalid spec, a result too large) are yielded as ``{"error": "<plain
message>"}``, which the SDK posts as the job's error; anything else raises, and the SDK reports
``"handler: <message> \\ntraceback: ..."``.

The handler is an async generator so the SDK's event loop stays free while gpu_core works in its
own thread: the SDK's stop signal (a cancel, or the execution timeout) then cancels the handler
at once, and the handler asks gpu_core to stop, which it does within one batch.

The run's files (scores.npy, the adapter, checkpoints) travel as the job input's
``artifact_transport`` says (see ``deliver_artifacts``): ``{"mode": "presigned", "urls": {name:
url}}`` uploads each file with a streamed PUT before the result is yielded, so the result carries
only the manifest (where ``urls`` holds the dashboard's upload route instead of one URL per file,
each file's URL is asked for with its size when it is uploaded, and bounds it: gpu_core.uploads);
``{"mode": "inline", "max_bytes": N}`` (the dashboard's store is not reachable from RunPod) yields
each file as base64 ``artifact_part`` chunks, refused in plain words above N.

Exactly once on our job id: with presigned URLs the transport also carries the PUT URLs of the
worker's records (gpu_core.uploads ``CLAIM_NAME``, ``RESULT_NAME``) and our ``job_id``. Before
any GPU work the handler creates the claim object conditionally; a second delivery of the same
job (a resent ``/run``) finds it and ends at once with a plain "Duplicate delivery" error, while
the same RunPod job delivered again (its first worker failed) finds its own claim and runs. When
the run ends its result JSON is also written to the store, where the scheduler collects it after
RunPod has forgotten the job (30 minutes after it ends).

A follow-up query (kind ``query``) carries ``parent_artifacts``: presigned GETs of the
experiment's adapter and gradient index, downloaded (size and sha256 checked) into a temporary
folder that ``run_job`` reads as ``parent_artifacts_dir``; a file that is gone is recomputed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import runpod

from gpu_core.datasets import (
    DatasetError,
    DatasetFile,
    parse_dataset_files,
    read_payload_datasets,
    reading_event,
)
from gpu_core.hf_token import HF_TOKEN_FIELD, HfTokenForLoad
from gpu_core.jobs import JobInput, JobInputError, parse_payload, run_job
from gpu_core.pipeline import ExperimentCancelled
from gpu_core.schemas import ArtifactEntry, SpecError
from gpu_core.uploads import (
    CLAIM_NAME,
    CLAIM_READ_NAME,
    ArtifactDownloadError,
    ArtifactUploadError,
    ParentArtifact,
    can_store_result,
    claim_job,
    download_artifacts,
    download_event,
    duplicate_delivery_message,
    parse_parent_artifacts,
    store_result,
    upload_artifacts,
)

log = logging.getLogger(__name__)
# Well under RunPod's 1 MB per stream chunk, leaving room for the envelope.
DEFAULT_RESULT_CHUNK_BYTES = 512 * 1024
# RunPod's /run output limit is 10 MB; keep a margin for the job-done envelope.
DEFAULT_OUTPUT_LIMIT_BYTES = 9_500_000
# Raw bytes per inline artifact part: base64 makes 512 KiB of it, under RunPod's 1 MB chunk.
ARTIFACT_PART_BYTES = 384 * 1024


def result_chunk_bytes() -> int:
    return int(os.environ.get("INFLUENCE_RESULT_CHUNK_BYTES", DEFAULT_RESULT_CHUNK_BYTES))


def output_limit_bytes() -> int:
    return int(os.environ.get("INFLUENCE_OUTPUT_LIMIT_BYTES", DEFAULT_OUTPUT_LIMIT_BYTES))


def result_chunks(result: dict[str, Any], chunk_bytes: int) -> Iterator[dict[str, Any]]:
    """The result as one chunk, or as parts whose JSON-escaped ``data`` each fit ``chunk_bytes``."""
    text = json.dumps(result, separators=(",", ":"))
    if len(json.dumps(text)) <= chunk_bytes:
        yield {"type": "result", "result": result}
        return
    slices: list[str] = []
    rest = text
    while rest:
        piece = rest[:chunk_bytes]
        # Quotes and backslashes grow when the slice is embedded in a JSON string: shrink to fit.
        while len(json.dumps(piece)) > chunk_bytes:
            piece = piece[: max(1, len(piece) * chunk_bytes // len(json.dumps(piece)) - 8)]
        slices.append(piece)
        rest = rest[len(piece) :]
    checksum = hashlib.sha256(text.encode()).hexdigest()
    for index, data in enumerate(slices):
        yield {"type": "result_part", "index": index, "total": len(slices), "sha256": checksum, "data": data}


def too_large_message(result_bytes: int, output_bytes: int, limit: int) -> str:
    return (
        f"The result is {result_bytes / 1e6:.1f} MB; with the progress events the job's output "
        f"would be {output_bytes / 1e6:.1f} MB, over RunPod's limit for a job's output "
        f"({limit / 1e6:.1f} MB here). Nothing was stored: configure an artifact store on the "
        "dashboard's server so large results travel as files, or score fewer examples."
    )


class ArtifactDeliveryError(Exception):
    """The run's files cannot reach the dashboard; the message is for the researcher."""


def size_text(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"


def inline_too_large_message(total_bytes: int, limit: int) -> str:
    return (
        f"The job's files (score matrix, adapter, checkpoints) are {size_text(total_bytes)}, over "
        f"the {size_text(limit)} that can come back through RunPod's job API. The dashboard's "
        "artifact store is not reachable from RunPod: its operator must set ARTIFACT_STORE_URL to "
        "an S3-compatible bucket (INSTRUCTIONS.md), or score fewer examples."
    )


def artifact_parts(directory: Path, entry: ArtifactEntry) -> Iterator[dict[str, Any]]:
    """One file as numbered base64 ``artifact_part`` chunks, read a part at a time."""
    total = max(1, -(-entry.bytes // ARTIFACT_PART_BYTES))
    with open(directory / entry.name, "rb") as handle:
        for index in range(total):
            data = handle.read(ARTIFACT_PART_BYTES)
            yield {
                "type": "artifact_part",
                "name": entry.name,
                "index": index,
                "total": total,
                "sha256": entry.sha256,
                "data": base64.b64encode(data).decode("ascii"),
            }


async def deliver_artifacts(result: dict[str, Any], directory: Path, transport: Any) -> list[dict[str, Any]]:
    """Send the run's files the way ``transport`` says; returns the chunks to yield before the
    result (inline parts), or [] when the files went to presigned URLs (or there are none)."""
    manifest = [ArtifactEntry.model_validate(entry) for entry in result.get("artifacts") or []]
    if not manifest:
        return []
    mode = transport.get("mode") if isinstance(transport, dict) else None
    if mode == "presigned" and isinstance(transport.get("urls"), dict):
        try:
            await asyncio.to_thread(upload_artifacts, directory, manifest, transport["urls"])
        except ArtifactUploadError as exc:
            raise ArtifactDeliveryError(f"The job's files could not be uploaded: {exc}") from None
        return []
    if mode == "inline" and isinstance(transport.get("max_bytes"), int):
        total = sum(entry.bytes for entry in manifest)
        if total > transport["max_bytes"]:
            raise ArtifactDeliveryError(inline_too_large_message(total, transport["max_bytes"]))
        return [part for entry in manifest for part in artifact_parts(directory, entry)]
    raise ArtifactDeliveryError(
        "The job input says nothing usable about where the job's files go (artifact_transport); "
        "the dashboard and this worker image do not match"
    )


def record_url(transport: Any, name: str) -> str | None:
    """The presigned URL of one of the worker's records (PUT; a GET for ``CLAIM_READ_NAME``),
    when the transport carries one."""
    urls = transport.get("urls") if isinstance(transport, dict) else None
    url = urls.get(name) if isinstance(urls, dict) else None
    return url if isinstance(url, str) and url else None


async def claim(job: dict[str, Any], transport: Any) -> str | None:
    """Claim the job in the artifact store before any GPU work; the error to end with when this
    delivery must not run (a duplicate, or a store that cannot be reached), else None."""
    url = record_url(transport, CLAIM_NAME)
    if url is None:
        return None  # no store reachable from here: RunPod's own delivery is all there is
    job_id = str(transport.get("job_id") or "")
    body = {
        "job_id": job_id,
        "provider": "runpod",
        "provider_job_id": str(job.get("id") or ""),
        "worker_id": os.environ.get("RUNPOD_POD_ID", ""),
        "claimed_at": time.time(),
    }
    try:
        claimed = await asyncio.to_thread(claim_job, url, body, record_url(transport, CLAIM_READ_NAME))
    except ArtifactUploadError as exc:
        return f"The job was not run: the artifact store, where its files go, failed ({exc})"
    return None if claimed else duplicate_delivery_message(job_id)


async def keep_result(result: dict[str, Any], transport: Any) -> None:
    """Write the result JSON to the store beside the files (best effort: the result still
    travels through RunPod's output, so a store that is down only loses the second copy)."""
    urls = transport.get("urls") if isinstance(transport, dict) else None
    if not isinstance(urls, dict) or not can_store_result(urls):
        return
    try:
        await asyncio.to_thread(store_result, urls, result)
    except ArtifactUploadError as exc:
        log.warning("the result was not written to the artifact store: %s", exc)


class ExperimentThread:
    """gpu_core's generator in its own thread, its events handed to the event loop."""

    def __init__(
        self,
        job: JobInput,
        artifacts_dir: Path | None = None,
        parent_artifacts: list[ParentArtifact] | None = None,
        parent_dir: Path | None = None,
        hf_token: str = "",
        datasets: tuple[dict[str, Any], list[DatasetFile], Path] | None = None,
    ) -> None:
        self.stop = threading.Event()
        self._job = job
        # (the payload, its stored datasets, a folder): read in the thread, before the run.
        self._datasets = datasets
        self._artifacts_dir = artifacts_dir
        self._parent_artifacts = parent_artifacts or []
        self._parent_dir = parent_dir
        self._hf_token = hf_token
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name="experiment", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, item)

    def _run(self) -> None:
        try:
            if self._parent_artifacts and self._parent_dir is not None:
                self._put(("event", download_event(self._parent_artifacts)))
                download_artifacts(self._parent_artifacts, self._parent_dir)
            if self._datasets is not None:
                payload, files, directory = self._datasets
                reading = reading_event(payload.get("spec", payload))
                if reading is not None:
                    self._put(("event", reading))
                self._job = parse_payload(read_payload_datasets(payload, files, directory))
            with HfTokenForLoad(self._hf_token) as hf_token:
                for event in run_job(
                    self._job,
                    self._artifacts_dir,
                    should_stop=self.stop.is_set,
                    parent_artifacts_dir=self._parent_dir,
                ):
                    hf_token.seen(event)
                    self._put(("event", event))
            self._put(("end", None))
        except ExperimentCancelled:
            self._put(("end", None))
        except ArtifactDownloadError as exc:
            self._put(("event", {"error": f"The experiment's files could not be downloaded: {exc}"}))
            self._put(("end", None))
        except DatasetError as exc:
            self._put(("event", {"error": f"The stored dataset could not be read: {exc}"}))
            self._put(("end", None))
        except Exception as exc:  # re-raised in the handler, where the SDK reports it
            self._put(("error", exc))

    async def next(self) -> dict[str, Any] | None:
        kind, payload = await self._events.get()
        if kind == "error":
            raise payload
        return payload if kind == "event" else None

    async def close(self) -> None:
        """Stop the work (within one batch) and wait until the GPU is free for the next job."""
        self.stop.set()
        await asyncio.to_thread(self._thread.join)


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    job_input = dict(job.get("input") or {})
    transport = job_input.pop("artifact_transport", None)
    # The researcher's own Hugging Face token: never yielded, logged or passed on.
    hf_token = job_input.pop(HF_TOKEN_FIELD, "")
    try:
        # An experiment's spec, or a later job of one by its kind (gpu_core.jobs, e.g. a
        # counterfactual check, or a follow-up query with presigned GETs of the experiment's
        # files). Size limits were enforced by the dashboard's gateway.
        parent_artifacts = parse_parent_artifacts(job_input.pop("parent_artifacts", None))
        dataset_files = parse_dataset_files(job_input.pop("datasets", None))
        parsed = parse_payload(job_input)
    except SpecError as exc:
        yield {"error": f"Invalid experiment spec: {'; '.join(exc.problems)}"}
        return
    except (JobInputError, ArtifactDownloadError, DatasetError) as exc:
        yield {"error": f"Invalid job input: {exc}"}
        return
    if (refusal := await claim(job, transport)) is not None:
        yield {"error": refusal}
        return
    with (
        tempfile.TemporaryDirectory(prefix="influence-artifacts-") as artifacts_dir,
        tempfile.TemporaryDirectory(prefix="influence-parent-") as parent_dir,
        tempfile.TemporaryDirectory(prefix="influence-datasets-") as datasets_dir,
    ):
        experiment = ExperimentThread(
            parsed,
            Path(artifacts_dir) if transport is not None else None,
            parent_artifacts,
            # A later job reads the experiment's files from here; whatever is missing it recomputes.
            Path(parent_dir) if parsed.kind.needs_parent else None,
            hf_token,
            (job_input, dataset_files, Path(datasets_dir)) if dataset_files else None,
        )
        output_bytes = 2  # the aggregate's "[]"
        try:
            while (event := await experiment.next()) is not None:
                if event.get("type") != "result":
                    output_bytes += len(json.dumps(event)) + 2
                    yield event
                    continue
                try:
                    chunks = await deliver_artifacts(event["result"], Path(artifacts_dir), transport)
                except ArtifactDeliveryError as exc:
                    yield {"error": str(exc)}
                    return
                await keep_result(event["result"], transport)
                chunks += result_chunks(event["result"], result_chunk_bytes())
                result_bytes = sum(len(json.dumps(c)) + 2 for c in chunks)
                if output_bytes + result_bytes > output_limit_bytes():
                    yield {
                        "error": too_large_message(
                            result_bytes, output_bytes + result_bytes, output_limit_bytes()
                        )
                    }
                    return
                for chunk in chunks:
                    yield chunk
        finally:
            # Reached on the SDK's stop signal too (the task is cancelled at the await above).
            await experiment.close()


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
