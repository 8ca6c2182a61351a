"""A run's files sent to presigned PUT URLs, for workers far from the artifact store (RunPod,
Modal). The scheduler mints one URL per name that ``planned_artifact_names`` says the run may
write (the store's credentials never leave the scheduler); the worker streams each file of the
result's manifest to its URL and returns only the manifest, which the scheduler checks against
the store (sha256) before the job is completed.

Plain HTTP (the standard library's ``http.client``): no cloud SDK, one block of the file in
memory at a time.
"""

from __future__ import annotations

import http.client
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from gpu_core.influence_methods import DEFAULT_TRACKSTAR_DIM as DEFAULT_TRACKSTAR_DIM  # re-exported
from gpu_core.influence_methods import InfluenceMethodEntry, influence_method
from gpu_core.schemas import ArtifactEntry, ExperimentResult, ExperimentSpec

# The scheduler plans names with gpu_core's base install (no numpy, no torch), so the names that
# gpu_core.artifacts and gpu_core.influence.index define are repeated here; a test checks they
# agree.
SCORES_NAME = "scores.npy"
INDEX_DIR_NAME, INDEX_MANIFEST, INDEX_IDS_FILE = "gradient_index", "manifest.json", "ids.json"
INDEX_SHARD_BYTES = 64 << 20
ADAPTER_FILES = ("adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors")
CHECKPOINT_INDEX = "checkpoints/checkpoints.json"
UPLOAD_ATTEMPTS = 4
_RETRY_BASE_S = 1.0
_TIMEOUT_S = 300.0
_BLOCK_BYTES = 1024 * 1024


class ArtifactUploadError(RuntimeError):
    """A file could not be uploaded; the message names it and says why (never the URL: it is a
    credential for that object until it expires)."""


def needs_stored_checkpoints(method: InfluenceMethodEntry) -> bool:
    """Whether ``method`` scores with the saved checkpoints (TracIn's every epoch, TrackStar's
    Adam second moments), not just the final adapter."""
    return method.checkpoints == "every" or method.adam_normalised


def needed_parent_artifacts(result: ExperimentResult) -> list[str]:
    """The names in the parent's ``artifacts`` manifest that a follow-up query of it reads
    (gpu_core.query): the adapter, and the checkpoints and gradient index where its method uses
    them (never ``scores.npy``). Whatever is missing is recomputed. Here, not in gpu_core.query,
    because the scheduler mints the download URLs with the base install (no torch)."""
    method = influence_method(result.influence.method)
    prefixes = ["adapter/"]
    if needs_stored_checkpoints(method):
        prefixes.append("checkpoints/")
    if method.gradient_index != "never":
        prefixes.append(f"{INDEX_DIR_NAME}/")
    return [entry.name for entry in result.artifacts if entry.name.startswith(tuple(prefixes))]


def planned_artifact_names(spec: ExperimentSpec) -> list[str]:
    """Every name ``run_experiment(spec, artifacts_dir)`` may write (pipeline.save_artifacts,
    the gradient index, the scores): the adapter, one checkpoint (and its second moments) per
    epoch and their index, the projected gradient index when the method builds one, the score
    matrix. A run
    may write fewer; a file not listed here cannot be uploaded, and tests check the two agree."""
    epochs = range(1, spec.hyperparams.epochs + 1)
    checkpoints = [
        f"checkpoints/epoch-{epoch}{kind}.safetensors" for epoch in epochs for kind in ("", ".second-moment")
    ]
    return [*ADAPTER_FILES, CHECKPOINT_INDEX, *checkpoints, *_index_names(spec), SCORES_NAME]


def _index_names(spec: ExperimentSpec) -> list[str]:
    """The projected gradient index (influence/index.py): TrackStar, or TracIn with a projection;
    one set of shards per checkpoint (one per epoch)."""
    dim = influence_method(spec.influence_method).index_dim(spec.influence.projection_dim)
    if dim is None:
        return []
    rows = max(1, INDEX_SHARD_BYTES // (2 * dim))
    shards = -(-len(spec.training_data) // rows)
    names = [f"{INDEX_DIR_NAME}/{INDEX_MANIFEST}", f"{INDEX_DIR_NAME}/{INDEX_IDS_FILE}"]
    for checkpoint in range(spec.hyperparams.epochs):
        for shard in range(shards):
            stem = f"{INDEX_DIR_NAME}/ckpt-{checkpoint}-shard-{shard:05d}"
            names += [f"{stem}.npy", f"{stem}.norms.npy"]
    return names


def upload_artifacts(
    directory: Path, manifest: Sequence[ArtifactEntry], urls: Mapping[str, str]
) -> None:
    """PUT every manifest file under ``directory`` to ``urls[name]``, streamed. Retries
    connection failures and 5xx answers with backoff; raises ArtifactUploadError otherwise."""
    missing = [entry.name for entry in manifest if entry.name not in urls]
    if missing:
        raise ArtifactUploadError(
            f"the run wrote {', '.join(missing)} but the job has no upload URL for "
            f"{'it' if len(missing) == 1 else 'them'} (planned_artifact_names is out of date)"
        )
    for entry in manifest:
        _upload_one(directory / entry.name, entry, urls[entry.name])


def _upload_one(path: Path, entry: ArtifactEntry, url: str) -> None:
    problem = ""
    for attempt in range(UPLOAD_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_BASE_S * 2 ** (attempt - 1))
        try:
            status, body = _put(path, entry.bytes, url)
        except OSError as exc:
            problem = f"the artifact store could not be reached ({type(exc).__name__}: {exc})"
            continue
        if 200 <= status < 300:
            return
        problem = f"the artifact store answered HTTP {status}" + (f": {body}" if body else "")
        if status < 500 and status != 429:
            if status == 403:
                problem += " (the upload URL may have expired)"
            break
    raise ArtifactUploadError(f"uploading {entry.name} ({entry.bytes} bytes) failed: {problem}")


def _put(path: Path, size: int, url: str) -> tuple[int, str]:
    parts = urlsplit(url)
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.netloc, timeout=_TIMEOUT_S, blocksize=_BLOCK_BYTES)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        with open(path, "rb") as handle:
            # A file body with Content-Length is sent block by block, never read whole.
            connection.request("PUT", target, body=handle, headers={"Content-Length": str(size)})
        response = connection.getresponse()
        return response.status, _error_text(response.read(4000).decode("utf-8", "replace"))
    finally:
        connection.close()


def _error_text(body: str) -> str:
    """S3's error document (``<Error><Code>..</Code><Message>..</Message>``) as "Code: Message"."""
    found = {tag: re.search(f"<{tag}>(.*?)</{tag}>", body, re.S) for tag in ("Code", "Message")}
    text = ": ".join(match.group(1).strip() for match in found.values() if match)
    return (text or body.strip())[:300]
