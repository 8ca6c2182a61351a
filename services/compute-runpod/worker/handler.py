"""RunPod Serverless worker: runs one experiment per job with gpu_core and streams it.

Every progress event is yielded as one stream chunk. The result comes last: whole as
``{"type": "result", "result": {...}}`` when its JSON fits in one safe chunk, else as numbered
``{"type": "result_part", "index", "total", "sha256", "data"}`` slices of that JSON text, because
RunPod caps a stream chunk at 1 MB. (A generator's ``return`` value is ignored by RunPod, so
nothing is returned.) Failures are yielded as ``{"error": "<plain message>"}``, which RunPod turns
into a FAILED job with that error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import runpod
from gpu_core.jobs import JobInputError, parse_payload, run_job
from gpu_core.schemas import SpecError

# Well under RunPod's 1 MB per stream chunk, leaving room for the envelope.
DEFAULT_RESULT_CHUNK_BYTES = 512 * 1024


def result_chunk_bytes() -> int:
    return int(os.environ.get("INFLUENCE_RESULT_CHUNK_BYTES", DEFAULT_RESULT_CHUNK_BYTES))


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
        rest = rest[len(piece):]
    checksum = hashlib.sha256(text.encode()).hexdigest()
    for index, data in enumerate(slices):
        yield {"type": "result_part", "index": index, "total": len(slices),
               "sha256": checksum, "data": data}


def handler(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    try:
        # An experiment's spec, or a later job of one by its kind (gpu_core.jobs, e.g. a
        # counterfactual check). Size limits were enforced by the dashboard's gateway.
        parsed = parse_payload(job.get("input") or {})
    except SpecError as exc:
        yield {"error": f"Invalid experiment spec: {'; '.join(exc.problems)}"}
        return
    except JobInputError as exc:
        yield {"error": f"Invalid job input: {exc}"}
        return
    try:
        for event in run_job(parsed):
            if event.get("type") == "result":
                yield from result_chunks(event["result"], result_chunk_bytes())
            else:
                yield event
    except Exception as exc:  # noqa: BLE001 - reported to the researcher as the job's error
        yield {"error": f"The experiment failed: {type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
