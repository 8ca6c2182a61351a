"""The files of a run and their manifest. Every file under the artifacts directory is an artifact
named by its POSIX path relative to it (``scores.npy``, ``adapter/adapter_model.safetensors``,
``checkpoints/epoch-1.safetensors``, ...); ``collect_artifacts`` lists them with size and sha256
for the result's ``artifacts`` list, which the scheduler checks every transfer against."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from gpu_core.schemas import ArtifactEntry

SCORES_NAME = "scores.npy"
_READ_BYTES = 1024 * 1024
_MEDIA_TYPES = {
    ".npy": "application/x-npy",
    ".json": "application/json",
    ".safetensors": "application/octet-stream",
    ".csv": "text/csv",
    ".txt": "text/plain",
}


def media_type(name: str) -> str:
    return _MEDIA_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_scores(directory: Path, matrix: np.ndarray) -> Path:
    """``scores.npy``: float32, [n_eval, n_train], C order (``np.load`` reads it back)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SCORES_NAME
    np.save(path, np.ascontiguousarray(matrix, dtype=np.float32), allow_pickle=False)
    return path


def collect_artifacts(directory: Path) -> list[ArtifactEntry]:
    """Every regular file under ``directory``, sorted by name, with its size and sha256."""
    if not directory.is_dir():
        return []
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
        name = path.relative_to(directory).as_posix()
        entries.append(
            ArtifactEntry(
                name=name, bytes=path.stat().st_size, sha256=file_sha256(path), media_type=media_type(name)
            )
        )
    return entries
