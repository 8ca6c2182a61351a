"""A run's files sent to presigned PUT URLs, for workers far from the artifact store (RunPod,
Modal), and an experiment's files fetched from presigned GET URLs by a later job of it (a
follow-up query, ``download_artifacts``).

The store's credentials never leave the scheduler; the worker streams each file of the result's
manifest to a presigned PUT URL and returns only the manifest, which the scheduler checks against
the store (sha256) before the job is completed. Where the URL comes from:

- Bounded (the plan carries ``UPLOAD_GRANT_NAME``, the dashboard's upload route for this job,
  with the job's secret in its path): the worker asks for each file's URL when it uploads it,
  giving its name, size and sha256 (``request_upload``). The scheduler checks the name is one the
  job may write (``planned_artifact_names``) and the size within the job's limits, and signs
  that exact ``Content-Length`` (and the sha256, where the operator's store checks it) into the
  URL: the store refuses a body of any other size.
- Planned (no such entry: a deployment with no public address, whose workers are the operator's
  own): one URL per name ``planned_artifact_names`` says the run may write, minted at dispatch,
  create-only but not bounded in size (the scheduler checks sizes when it verifies the files).

Two more objects under the job's prefix are the worker's own records (``WORKER_RECORD_NAMES``,
never in a manifest):

- ``_worker/claim.json``, always minted at dispatch for exactly ``CLAIM_BYTES`` (the claim JSON is
  padded with spaces to that size, so its URL bounds what it can write too), created before any GPU
  work with ``If-None-Match: *`` (S3's conditional create): the first delivery of a job creates it;
  any later delivery of the same job id (a second ``/run`` after an ambiguous answer, a Modal
  respawn) gets HTTP 412 and exits without GPU work (``claim_job``, ``DUPLICATE_DELIVERY``). Its
  body names the provider job that holds it, so the scheduler can find that job when it never
  learnt its id, and so that the same provider job delivered again (RunPod re-queues a job whose
  worker failed, ``/retry`` runs it again under the same id) re-claims it: the plan also carries a
  presigned GET of the claim (``CLAIM_READ_NAME``), which such a delivery reads after its 412.
- ``_worker/result.json``, the result JSON written beside the files when the run ends
  (``store_result``, its URL from the plan or asked for as a file's), so the scheduler can collect
  a result after the provider forgot it (RunPod keeps one 30 minutes).

Plain HTTP (the standard library's ``http.client``): no cloud SDK, one block of the file in
memory at a time.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from gpu_core.influence_methods import DEFAULT_TRACKSTAR_DIM as DEFAULT_TRACKSTAR_DIM  # re-exported
from gpu_core.influence_methods import InfluenceMethodEntry, influence_method
from gpu_core.merge_schemas import planned_merge_names
from gpu_core.schemas import ArtifactEntry, ExperimentResult, ExperimentSpec
from gpu_core.shard_schemas import (
    SHARD_DIR_PREFIX,
    SHARD_INDEX_DIR,
    SHARD_NET_INFLUENCE,
    SHARD_PARTS_DIR,
    SHARD_SCORES,
    SHARD_SELF_INFLUENCE,
    SHARD_TRAIN_LOSS,
    ShardRequest,
    shard_name,
)

# The scheduler plans names with gpu_core's base install (no numpy, no torch), so the names that
# gpu_core.artifacts and gpu_core.influence.index define are repeated here; a test checks they
# agree.
SCORES_NAME = "scores.npy"
SUMMARY_NAME = "training_summary.json"  # gpu_core.training_summary
INDEX_DIR_NAME, INDEX_MANIFEST, INDEX_IDS_FILE = "gradient_index", "manifest.json", "ids.json"
INDEX_SHARD_BYTES = 64 << 20
ADAPTER_FILES = ("adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors")
CHECKPOINT_INDEX = "checkpoints/checkpoints.json"
CLAIM_NAME = "_worker/claim.json"
RESULT_NAME = "_worker/result.json"
WORKER_RECORD_NAMES = (CLAIM_NAME, RESULT_NAME)
# The plan's entry for a presigned GET of the claim (not an object of its own, never uploaded).
CLAIM_READ_NAME = "_worker/claim.json:read"
# Sent with every upload: S3's conditional create. The scheduler signs it into each upload URL
# (scheduler.uploads.CREATE_ONLY), so the store refuses a request without it, and with it refuses
# to write over an object that exists (HTTP 412): no upload replaces a verified file.
CREATE_ONLY = {"If-None-Match": "*"}
# Every claim body is this many bytes (JSON padded with spaces): its URL signs that Content-Length.
CLAIM_BYTES = 1024
# The plan's entry for the dashboard's upload route (not an object, never uploaded): POST
# {"name", "bytes", "sha256"} there and the answer is {"url", "headers"} for that one file.
UPLOAD_GRANT_NAME = "_worker/uploads:grant"
# How a duplicate delivery's error begins (workers write it; providers and tests recognise it).
DUPLICATE_DELIVERY = "Duplicate delivery"
UPLOAD_ATTEMPTS = 4
# The upload route is retried for longer than the store: while the dashboard's scheduler restarts
# (a deploy, a failover) the route answers 503, and the run's files are lost if it never answers.
# Half an hour of a waiting GPU costs less than the paid run it would lose.
GRANT_PATIENCE_S = 1800.0
_GRANT_MAX_DELAY_S = 30.0
_RETRY_BASE_S = 1.0
_TIMEOUT_S = 300.0
_BLOCK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ParentArtifact:
    """One file of the parent experiment a later job downloads (the payload's ``parent_artifacts``)."""

    name: str
    url: str
    sha256: str
    bytes: int


class ArtifactUploadError(RuntimeError):
    """A file could not be uploaded; the message names it and says why (never the URL: it is a
    credential for that object until it expires)."""


def needs_stored_checkpoints(method: InfluenceMethodEntry) -> bool:
    """Whether ``method`` scores with the saved checkpoints (TracIn's every epoch, TrackStar's
    Adam second moments), not just the final adapter."""
    return method.checkpoints == "every" or method.adam_normalised


def needed_parent_artifacts(result: ExperimentResult, kind: str = "query") -> list[str]:
    """The names in the parent's ``artifacts`` manifest that a later job of ``kind`` reads: a
    follow-up query (gpu_core.query) the adapter, and the checkpoints and gradient index where
    its method uses them (never ``scores.npy``; whatever is missing is recomputed); a merge
    (gpu_core.merge) the adapter only. Here, not in gpu_core.query, because the scheduler mints
    the download URLs with the base install (no torch)."""
    method = influence_method(result.influence.method)
    prefixes = ["adapter/"]
    if kind != "merge" and needs_stored_checkpoints(method):
        prefixes.append("checkpoints/")
    if kind != "merge" and method.gradient_index != "never":
        prefixes.append(f"{INDEX_DIR_NAME}/")
    return [entry.name for entry in result.artifacts if entry.name.startswith(tuple(prefixes))]


def planned_artifact_names(spec: ExperimentSpec) -> list[str]:
    """Every name ``run_experiment(spec, artifacts_dir)`` may write (pipeline.save_artifacts,
    the gradient index, the scores): the adapter, one checkpoint (and its second moments) per
    epoch and their index, the projected gradient index when the method builds one, the score
    matrix, the training-set summary. A run may write fewer; a file not listed here cannot be
    uploaded, and tests check the two agree."""
    epochs = range(1, spec.hyperparams.epochs + 1)
    checkpoints = [
        f"checkpoints/epoch-{epoch}{kind}.safetensors" for epoch in epochs for kind in ("", ".second-moment")
    ]
    return [*ADAPTER_FILES, CHECKPOINT_INDEX, *checkpoints, *_index_names(spec), SCORES_NAME, SUMMARY_NAME]


def planned_job_artifact_names(
    kind: str, spec: ExperimentSpec, request: Mapping[str, Any] | None = None
) -> list[str]:
    """Every name a job of ``kind`` may write: an experiment's (:func:`planned_artifact_names`),
    a merge's ``merged/`` folder (gpu_core.merge_schemas), a sharded experiment's parts' (an
    index shard's for its ``request``), none for the other later kinds."""
    if kind in ("", "experiment"):
        return planned_artifact_names(spec)
    if kind == "merge":
        return planned_merge_names()
    if kind == "training":
        return planned_training_artifact_names(spec)
    if kind == "index_shard":
        return planned_shard_artifact_names(spec, ShardRequest.model_validate(request or {}))
    if kind == "shard_merge":
        return planned_merge_artifact_names()
    return []


def _index_names(
    spec: ExperimentSpec, directory: str = INDEX_DIR_NAME, n_rows: int | None = None
) -> list[str]:
    """The projected gradient index (influence/index.py) in ``directory`` over ``n_rows``
    examples (the training set by default): TrackStar, or TracIn with a projection; one set of
    shards per checkpoint (one per epoch)."""
    dim = influence_method(spec.influence_method).index_dim(spec.influence.projection_dim)
    if dim is None:
        return []
    rows = max(1, INDEX_SHARD_BYTES // (2 * dim))
    shards = -(-(spec.n_train if n_rows is None else n_rows) // rows)
    names = [f"{directory}/{INDEX_MANIFEST}", f"{directory}/{INDEX_IDS_FILE}"]
    for checkpoint in range(spec.hyperparams.epochs):
        for shard in range(shards):
            stem = f"{directory}/ckpt-{checkpoint}-shard-{shard:05d}"
            names += [f"{stem}.npy", f"{stem}.norms.npy"]
    return names


# A sharded experiment's jobs (gpu_core.sharding): what each may write, and what each downloads
# of its parent's (the training job's) or siblings' files.


def planned_training_artifact_names(spec: ExperimentSpec) -> list[str]:
    """The training job's files: the adapter and the checkpoints."""
    return [name for name in planned_artifact_names(spec) if name.startswith(("adapter/", "checkpoints/"))]


def planned_shard_artifact_names(spec: ExperimentSpec, request: ShardRequest) -> list[str]:
    """An index shard's files: its slice's index and its score and summary columns."""
    name = shard_name(request.shard)
    parts = SHARD_PARTS_DIR.format(shard=name)
    index = _index_names(spec, SHARD_INDEX_DIR.format(shard=name), request.stop - request.start)
    columns = [SHARD_SCORES, SHARD_SELF_INFLUENCE, SHARD_TRAIN_LOSS]
    if influence_method(spec.influence_method).net_from_final_gradients:
        columns.append(SHARD_NET_INFLUENCE)
    return [*index, *(f"{parts}/{part}" for part in columns)]


def planned_merge_artifact_names() -> list[str]:
    """The merge's files: the scores, the summary and the index manifest over every shard."""
    return [
        SCORES_NAME,
        SUMMARY_NAME,
        f"{INDEX_DIR_NAME}/{INDEX_MANIFEST}",
        f"{INDEX_DIR_NAME}/{INDEX_IDS_FILE}",
    ]


def needed_shard_inputs(kind: str, names: Iterable[str]) -> list[str]:
    """Of ``names`` (stored files), those a job of ``kind`` downloads: an index shard the
    training job's adapter and checkpoints; a merge the shards' columns and index manifests
    (never their rows)."""
    if kind == "index_shard":
        return [name for name in names if name.startswith(("adapter/", "checkpoints/"))]
    manifests = re.compile(rf"{INDEX_DIR_NAME}/{SHARD_DIR_PREFIX}\d+/{INDEX_MANIFEST}")
    return [name for name in names if name.startswith("shards/") or manifests.fullmatch(name)]


def upload_artifacts(directory: Path, manifest: Sequence[ArtifactEntry], urls: Mapping[str, str]) -> None:
    """PUT every manifest file under ``directory``, streamed: to ``urls[name]``, or, where ``urls``
    holds the upload route (``UPLOAD_GRANT_NAME``), to a URL asked for that file now. Retries
    connection failures and 5xx answers with backoff; raises ArtifactUploadError otherwise."""
    bounded = UPLOAD_GRANT_NAME in urls
    missing = [entry.name for entry in manifest if entry.name not in urls]
    if missing and not bounded:
        raise ArtifactUploadError(
            f"the run wrote {', '.join(missing)} but the job has no upload URL for "
            f"{'it' if len(missing) == 1 else 'them'} (planned_artifact_names is out of date)"
        )
    for entry in manifest:
        if bounded:
            url, headers = request_upload(urls[UPLOAD_GRANT_NAME], entry.name, entry.bytes, entry.sha256)
        else:
            url, headers = urls[entry.name], dict(CREATE_ONLY)
        _upload_one(directory / entry.name, entry, url, headers)


def request_upload(grant_url: str, name: str, size: int, sha256: str) -> tuple[str, dict[str, str]]:
    """The presigned PUT URL for one file of ``size`` bytes, and the headers to send with it, from
    the dashboard's upload route at ``grant_url``. Retries connection failures, 5xx and 429 with
    backoff for up to ``GRANT_PATIENCE_S``; raises ArtifactUploadError with the route's reason
    otherwise (a name the job may not write, a size over its limits, a job that has ended)."""
    body = json.dumps({"name": name, "bytes": size, "sha256": sha256}).encode()
    problem = ""
    started, delay = time.monotonic(), _RETRY_BASE_S
    while True:
        if problem:
            if time.monotonic() - started + delay > GRANT_PATIENCE_S:
                break
            time.sleep(delay)
            delay = min(delay * 2, _GRANT_MAX_DELAY_S)
        try:
            status, text = _post_json(grant_url, body)
        except OSError as exc:
            problem = f"the dashboard's upload route could not be reached ({type(exc).__name__}: {exc})"
            continue
        answer = _json_object(text)
        if status == 200:
            url, headers = answer.get("url"), answer.get("headers")
            if isinstance(url, str) and isinstance(headers, dict):
                return url, {str(key): str(value) for key, value in headers.items()}
            problem = "the dashboard's upload route answered without a URL"
            break
        detail = answer.get("detail")
        problem = f"the dashboard refused the upload (HTTP {status})" + (
            f": {detail}" if isinstance(detail, str) and detail else ""
        )
        if status < 500 and status != 429:
            break
    raise ArtifactUploadError(f"uploading {name} ({size} bytes) failed: {problem}")


def _json_object(text: str) -> dict[str, Any]:
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _upload_one(path: Path, entry: ArtifactEntry, url: str, headers: Mapping[str, str]) -> None:
    problem = ""
    outcome_unknown = False
    for attempt in range(UPLOAD_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_BASE_S * 2 ** (attempt - 1))
        try:
            status, body = _put(path, entry.bytes, url, headers)
        except OSError as exc:
            outcome_unknown = True
            problem = f"the artifact store could not be reached ({type(exc).__name__}: {exc})"
            continue
        if 200 <= status < 300 or (status == 412 and outcome_unknown):
            return  # a 412 after a lost answer: that attempt created it (the scheduler checks it)
        problem = f"the artifact store answered HTTP {status}" + (f": {body}" if body else "")
        if status < 500 and status != 429:
            if status == 403:
                problem += " (the upload URL may have expired)"
            if status == 412:
                problem += " (the object exists already: upload URLs only create, never replace)"
            break
    raise ArtifactUploadError(f"uploading {entry.name} ({entry.bytes} bytes) failed: {problem}")


def _put(path: Path, size: int, url: str, headers: Mapping[str, str]) -> tuple[int, str]:
    parts = urlsplit(url)
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.netloc, timeout=_TIMEOUT_S, blocksize=_BLOCK_BYTES)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        with open(path, "rb") as handle:
            # A file body with Content-Length is sent block by block, never read whole.
            connection.request("PUT", target, body=handle, headers={**headers, "Content-Length": str(size)})
        response = connection.getresponse()
        return response.status, _error_text(response.read(4000).decode("utf-8", "replace"))
    finally:
        connection.close()


def _post_json(url: str, body: bytes) -> tuple[int, str]:
    return _send_bytes("POST", url, body, {"Content-Type": "application/json"}, 64 * 1024)


def claim_body(claim: Mapping[str, Any]) -> bytes:
    """The claim's JSON padded with spaces to exactly ``CLAIM_BYTES`` (the size its URL signs);
    raises ArtifactUploadError when it does not fit."""
    body = json.dumps(dict(claim), separators=(",", ":")).encode()
    if len(body) > CLAIM_BYTES:
        raise ArtifactUploadError(
            f"the job's claim is {len(body)} bytes, over the {CLAIM_BYTES} its URL allows"
        )
    return body.ljust(CLAIM_BYTES, b" ")


def claim_job(url: str, claim: Mapping[str, Any], read_url: str | None = None) -> bool:
    """Create the job's claim object at ``url`` only if it does not exist (``If-None-Match: *``).
    True: this delivery holds the claim and may run. False: another delivery created it first
    (HTTP 412). Retries connection failures, 5xx and 409 (S3's answer to two conditional writes
    racing); raises ArtifactUploadError when the store cannot be reached or refuses otherwise.
    A 412 after an attempt whose answer was lost counts as ours: that attempt created it. So does
    a 412 on a claim that names this delivery's own ``provider_job_id`` (read at ``read_url``):
    the provider delivered the same job again after its first worker failed."""
    body = claim_body(claim)
    outcome_unknown = False
    problem = ""
    for attempt in range(UPLOAD_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_BASE_S * 2 ** (attempt - 1))
        try:
            status, text = _put_bytes(url, body, {**CREATE_ONLY, "Content-Type": "application/json"})
        except OSError as exc:
            outcome_unknown = True
            problem = f"the artifact store could not be reached ({type(exc).__name__}: {exc})"
            continue
        if 200 <= status < 300:
            return True
        if status == 412:
            return outcome_unknown or _claimed_by(read_url, str(claim.get("provider_job_id") or ""))
        problem = f"the artifact store answered HTTP {status}" + (f": {text}" if text else "")
        if status < 500 and status not in (409, 429):
            break
    raise ArtifactUploadError(f"claiming the job failed: {problem}")


def _claimed_by(read_url: str | None, provider_job_id: str) -> bool:
    """Whether the existing claim (read at ``read_url``) names ``provider_job_id``; raises
    ArtifactUploadError when it cannot be read."""
    if read_url is None or not provider_job_id:
        return False
    problem = ""
    for attempt in range(UPLOAD_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_BASE_S * 2 ** (attempt - 1))
        try:
            status, text = _get_text(read_url)
        except OSError as exc:
            problem = f"the artifact store could not be reached ({type(exc).__name__}: {exc})"
            continue
        if status == 200:
            try:
                return str(json.loads(text).get("provider_job_id") or "") == provider_job_id
            except (ValueError, AttributeError):
                return False  # not a claim this code wrote: someone else's, so not ours
        problem = f"the artifact store answered HTTP {status}"
        if status < 500 and status != 429:
            break
    raise ArtifactUploadError(f"reading the job's claim failed: {problem}")


def _get_text(url: str) -> tuple[int, str]:
    parts = urlsplit(url)
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.netloc, timeout=_TIMEOUT_S)
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = connection.getresponse()
        return response.status, response.read(64 * 1024).decode("utf-8", "replace")
    finally:
        connection.close()


def duplicate_delivery_message(job_id: str) -> str:
    """The error a duplicate delivery ends with (it ran nothing)."""
    return (
        f"{DUPLICATE_DELIVERY} of job {job_id}: an earlier delivery of the same job already claimed "
        "it in the artifact store, so this one did no GPU work. The earlier delivery's result is "
        f"written to the store as jobs/{job_id}/{RESULT_NAME} when it finishes."
    )


def can_store_result(urls: Mapping[str, str]) -> bool:
    """Whether the plan lets the worker write its result JSON to the store."""
    return RESULT_NAME in urls or UPLOAD_GRANT_NAME in urls


def store_result(urls: Mapping[str, str], result: Mapping[str, Any]) -> None:
    """PUT the result JSON to the plan's URL for ``RESULT_NAME``, or to one asked for now from
    the upload route (retried like a file; create-only, so a 412 after an attempt whose answer was
    lost counts as stored); raises ArtifactUploadError."""
    body = json.dumps(dict(result), separators=(",", ":")).encode()
    if UPLOAD_GRANT_NAME in urls:
        sha256 = hashlib.sha256(body).hexdigest()
        url, headers = request_upload(urls[UPLOAD_GRANT_NAME], RESULT_NAME, len(body), sha256)
    else:
        url, headers = urls[RESULT_NAME], dict(CREATE_ONLY)
    problem = ""
    outcome_unknown = False
    for attempt in range(UPLOAD_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_BASE_S * 2 ** (attempt - 1))
        try:
            status, text = _put_bytes(url, body, {**headers, "Content-Type": "application/json"})
        except OSError as exc:
            outcome_unknown = True
            problem = f"the artifact store could not be reached ({type(exc).__name__}: {exc})"
            continue
        if 200 <= status < 300 or (status == 412 and outcome_unknown):
            return
        problem = f"the artifact store answered HTTP {status}" + (f": {text}" if text else "")
        if status < 500 and status != 429:
            break
    raise ArtifactUploadError(f"storing the result ({len(body)} bytes) failed: {problem}")


def presigned_expiry(url: str) -> float | None:
    """When a SigV4 presigned URL stops working (Unix time, from its ``X-Amz-Date`` and
    ``X-Amz-Expires``); None for a URL that does not say."""
    query = parse_qs(urlsplit(url).query)
    try:
        signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        return signed.timestamp() + int(query["X-Amz-Expires"][0])
    except (KeyError, IndexError, ValueError):
        return None


def _put_bytes(url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, str]:
    status, text = _send_bytes("PUT", url, body, headers, 4000)
    return status, _error_text(text)


def _send_bytes(
    method: str, url: str, body: bytes, headers: Mapping[str, str], read_bytes: int
) -> tuple[int, str]:
    """One request with a small body in memory: the status and up to ``read_bytes`` of the answer."""
    parts = urlsplit(url)
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.netloc, timeout=_TIMEOUT_S)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(method, target, body=body, headers={**headers, "Content-Length": str(len(body))})
        response = connection.getresponse()
        return response.status, response.read(read_bytes).decode("utf-8", "replace")
    finally:
        connection.close()


def _error_text(body: str) -> str:
    """S3's error document (``<Error><Code>..</Code><Message>..</Message>``) as "Code: Message"."""
    found = {tag: re.search(f"<{tag}>(.*?)</{tag}>", body, re.S) for tag in ("Code", "Message")}
    text = ": ".join(match.group(1).strip() for match in found.values() if match)
    return (text or body.strip())[:300]


class ArtifactDownloadError(RuntimeError):
    """A parent artifact could not be downloaded; the message names it and says why (never the URL)."""


def parse_parent_artifacts(raw: object) -> list[ParentArtifact]:
    """The payload's ``parent_artifacts`` list; raises ArtifactDownloadError naming a bad entry."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ArtifactDownloadError("parent_artifacts: not a list")
    found = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ArtifactDownloadError(f"parent_artifacts.{index}: not an object")
        try:
            entry = ParentArtifact(
                str(item["name"]), str(item["url"]), str(item["sha256"]), int(item["bytes"])
            )
        except (KeyError, TypeError, ValueError):
            raise ArtifactDownloadError(
                f"parent_artifacts.{index}: needs name, url, sha256 and bytes"
            ) from None
        if not _safe_name(entry.name):
            raise ArtifactDownloadError(f"parent_artifacts.{index}: {entry.name!r} is not an artifact name")
        found.append(entry)
    return found


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(part not in ("", ".", "..") for part in parts)


def download_event(entries: Sequence[ParentArtifact]) -> dict[str, Any]:
    """The progress event a worker sends before it downloads ``entries``."""
    megabytes = sum(entry.bytes for entry in entries) / 1e6
    return {
        "type": "progress",
        "stage": "loading_model",
        "progress": 0.0,
        "message": f"downloading the experiment's {len(entries)} files ({megabytes:.1f} MB)",
    }


def download_artifacts(entries: Iterable[ParentArtifact], directory: Path) -> list[str]:
    """GET every entry into ``directory/<name>``, streamed to disk a block at a time, its size and
    sha256 checked before the file takes its name (a bad download never looks like a good one).
    A file that is gone from the store (404) or unreadable is skipped: the job recomputes what it
    needed it for. Returns the names downloaded; raises ArtifactDownloadError only when a file
    arrives different from its manifest entry (the store holds something else)."""
    downloaded = []
    for entry in entries:
        if _download_one(entry, directory / entry.name):
            downloaded.append(entry.name)
    return downloaded


def _download_one(entry: ParentArtifact, path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    for attempt in range(UPLOAD_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_BASE_S * 2 ** (attempt - 1))
        try:
            status, digest, size = get_to_file(partial, entry.url)
        except OSError:
            continue
        if status in (404, 403) or (400 <= status < 500 and status != 429):
            break  # gone or expired: retrying cannot help
        if not 200 <= status < 300:
            continue
        if size != entry.bytes or digest != entry.sha256:
            partial.unlink(missing_ok=True)
            raise ArtifactDownloadError(
                f"parent artifact {entry.name} arrived with {size} bytes and sha256 {digest[:12]}..., "
                f"its manifest says {entry.bytes} bytes and {entry.sha256[:12]}..."
            )
        os.replace(partial, path)
        return True
    partial.unlink(missing_ok=True)
    return False


def get_to_file(path: Path, url: str) -> tuple[int, str, int]:
    """(HTTP status, sha256, bytes) of a GET whose body was written to ``path``; a file:// URL is
    a path on this host (the local artifact store, read by compute-local), copied."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return _copy_to_file(path, Path(unquote(parts.path)))
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.netloc, timeout=_TIMEOUT_S)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    digest, size = hashlib.sha256(), 0
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        if not 200 <= response.status < 300:
            response.read(4000)
            return response.status, "", 0
        with open(path, "wb") as handle:
            while block := response.read(_BLOCK_BYTES):
                digest.update(block)
                size += len(block)
                handle.write(block)
        return response.status, digest.hexdigest(), size
    finally:
        connection.close()


def _copy_to_file(path: Path, source: Path) -> tuple[int, str, int]:
    if not source.is_file():
        return 404, "", 0
    digest, size = hashlib.sha256(), 0
    with source.open("rb") as reader, path.open("wb") as writer:
        while block := reader.read(_BLOCK_BYTES):
            digest.update(block)
            size += len(block)
            writer.write(block)
    return 200, digest.hexdigest(), size
