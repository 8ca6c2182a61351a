"""The worker's stream chunks turned back into events and one verified result.

The worker yields progress dicts, then the result as its last chunk(s): ``{"type": "result",
"result": {...}}`` when small, else numbered ``{"type": "result_part", "index", "total",
"sha256", "data"}`` slices of the result's JSON text (RunPod caps a stream chunk at 1 MB).
A result is only ever handed on whole: a missing part or a checksum mismatch is an error.
Without an artifact store reachable from RunPod the run's files come before the result as
base64 ``{"type": "artifact_part", "name", "index", "total", "sha256", "data"}`` chunks.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any

from compute_runpod.errors import Code, ProviderError

RESULT_TYPES = ("result", "result_part")
GENERATOR_ERROR_PREFIX = "handler: "
GENERATOR_TRACEBACK_MARK = " \ntraceback:"
NO_OUTPUT = (
    "The job finished but RunPod returned no output: RunPod drops a job's output above its "
    "payload limit (10 MB), so the result was lost; run fewer examples, or configure an "
    "artifact store on the dashboard's server so results travel as files"
)


def is_result_chunk(chunk: Any) -> bool:
    return isinstance(chunk, dict) and chunk.get("type") in RESULT_TYPES


def assemble_result(chunks: list[Any]) -> bytes | None:
    """The result JSON (UTF-8) from the chunks seen so far; None while no result chunk has
    arrived or parts are still missing. Raises when what arrived cannot be a whole result."""
    whole = [c for c in chunks if isinstance(c, dict) and c.get("type") == "result"]
    if whole:
        return json.dumps(whole[-1].get("result"), separators=(",", ":")).encode()
    parts = [c for c in chunks if isinstance(c, dict) and c.get("type") == "result_part"]
    if not parts:
        return None
    total = parts[0].get("total")
    checksum = parts[0].get("sha256")
    if not isinstance(total, int) or total < 1 or not isinstance(checksum, str):
        raise ProviderError(Code.INTERNAL, "The worker sent a malformed result part")
    by_index: dict[int, str] = {}
    for part in parts:
        index, data = part.get("index"), part.get("data")
        if part.get("total") != total or part.get("sha256") != checksum:
            raise ProviderError(Code.INTERNAL, "The worker sent result parts of two different results")
        if not isinstance(index, int) or not 0 <= index < total or not isinstance(data, str):
            raise ProviderError(Code.INTERNAL, "The worker sent a malformed result part")
        by_index[index] = data
    if len(by_index) < total:
        return None
    text = "".join(by_index[i] for i in range(total)).encode()
    if hashlib.sha256(text).hexdigest() != checksum:
        raise ProviderError(
            Code.INTERNAL,
            "The result arrived corrupted (checksum mismatch after reassembling "
            f"{total} parts); it was not stored",
        )
    return text


def final_result(chunks: list[Any]) -> bytes:
    """The result of a COMPLETED job: every chunk it yielded must be here."""
    result = assemble_result(chunks)
    if result is None:
        has_parts = any(is_result_chunk(c) for c in chunks)
        raise ProviderError(
            Code.INTERNAL,
            "The job finished but parts of its result are missing; it was not stored"
            if has_parts
            else NO_OUTPUT,
        )
    return result


def error_text(error: Any) -> str:
    """RunPod's ``error`` field in plain words, never the traceback. A yielded ``{"error":
    "msg"}`` arrives as ``msg``; a generator handler that raised as ``"handler: <message>
    \ntraceback: ..."`` (the SDK's run_job_generator); a plain handler that raised as a JSON
    string with ``error_type`` and ``error_message``."""
    if isinstance(error, str) and error.startswith(GENERATOR_ERROR_PREFIX):
        message = error[len(GENERATOR_ERROR_PREFIX) :].split(GENERATOR_TRACEBACK_MARK, 1)[0].strip()
        return f"The experiment failed on the RunPod worker: {message or 'no message'}"
    if isinstance(error, str):
        try:
            parsed = json.loads(error)
        except ValueError:
            return error
        error = parsed
    if isinstance(error, dict):
        detail = error.get("error_message") or error.get("message") or error.get("error")
        kind = error.get("error_type")
        if detail:
            return f"{kind}: {detail}" if kind else str(detail)
    return str(error) if error else "The worker failed without saying why"


# ---- files that came back inline (no artifact store reachable from RunPod) ---------------------

ARTIFACT_PART = "artifact_part"


def is_artifact_chunk(chunk: Any) -> bool:
    return isinstance(chunk, dict) and chunk.get("type") == ARTIFACT_PART


def artifact_data(chunks: list[Any], name: str) -> Iterator[bytes]:
    """The bytes of the worker's file ``name`` from its ``artifact_part`` chunks (base64, numbered),
    part by part. Raises before the first part when parts are missing or malformed; the
    receiver checks the sha256 against the manifest."""
    parts = [c for c in chunks if is_artifact_chunk(c) and c.get("name") == name]
    if not parts:
        raise ProviderError(
            Code.NOT_FOUND,
            f"RunPod's output for this job has no file {name!r} (it was uploaded to the artifact "
            "store directly, or the output has expired)",
        )
    total = parts[0].get("total")
    by_index: dict[int, str] = {}
    for part in parts:
        index, data = part.get("index"), part.get("data")
        if part.get("total") != total or not isinstance(index, int) or not isinstance(data, str):
            raise ProviderError(Code.INTERNAL, f"The worker sent a malformed part of {name!r}")
        by_index[index] = data
    if not isinstance(total, int) or sorted(by_index) != list(range(total)):
        raise ProviderError(
            Code.INTERNAL, f"Parts of the file {name!r} are missing from RunPod's output; it was not stored"
        )
    return (base64.b64decode(by_index[index]) for index in range(total))
