"""The projected gradient index: one row per training example and checkpoint, on disk.

Layout of ``<directory>`` (``<artifacts_dir>/gradient_index/`` in a pipeline run):

- ``manifest.json``: format and version, the method the rows were prepared for
  (``tracin``: plain projected gradients; ``trackstar``: Adam-second-moment-corrected, projected,
  unit-normalised), ``n_examples``, ``dim``, the projection (kind, seed, input size, the LoRA
  matrices by name and shape), the model/adapter fingerprint, and per checkpoint its epoch,
  score weight (TracIn: the checkpoint's learning rate; TrackStar: 1) and shard files.
- ``ids.json``: the training example ids, row order.
- ``ckpt-<c>-shard-<s>.npy``: ``float16 [rows, dim]``, each row scaled to unit norm (fp16 keeps
  ~3 significant digits of every row whatever its magnitude, and cannot overflow), with
  ``ckpt-<c>-shard-<s>.norms.npy`` (``float32 [rows]``) holding the row norms. Standard ``.npy``
  files, so ``numpy.load(path, mmap_mode="r")`` maps a shard without reading it.

Building streams the training set batch by batch: each batch's rows are appended to the open
shard file with plain writes (no memory map while writing, so written pages are page cache,
not the builder's resident memory); memory is one batch of gradients whatever ``n_train``.
Reading maps one shard at a time and unmaps it before the next.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

INDEX_DIR_NAME = "gradient_index"
INDEX_FORMAT = "gpu_core.gradient_index"
INDEX_VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "ids.json"
# Rows per shard: 64 MiB of float16 per shard file (8,192 rows at dim 4,096).
SHARD_BYTES = 64 << 20


def shard_rows_for(dim: int) -> int:
    return max(1, SHARD_BYTES // (2 * dim))


def fingerprint(model: Any, layer_names: Sequence[str], state: dict[str, torch.Tensor]) -> str:
    """sha256 over the base model's name and config, the LoRA matrix names and shapes and the
    adapter weights: an index is only valid for the model and adapter it was built from."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(str(getattr(config, "name_or_path", "")).encode())
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name in layer_names:
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Shard:
    file: str
    start: int
    rows: int

    @property
    def norms_file(self) -> str:
        return self.file.removesuffix(".npy") + ".norms.npy"


@dataclass(frozen=True)
class IndexCheckpoint:
    epoch: int
    weight: float
    shards: list[Shard]


class GradientIndexWriter:
    """Writes one checkpoint's rows at a time, in training order, through :meth:`append`."""

    def __init__(
        self,
        directory: Path,
        *,
        method: str,
        ids: Sequence[str],
        dim: int,
        projection: dict[str, Any],
        model_fingerprint: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob("ckpt-*.npy"):
            stale.unlink()
        self.n = len(ids)
        self.dim = dim
        self.shard_rows = shard_rows_for(dim)
        self.manifest: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "method": method,
            "n_examples": self.n,
            "dim": dim,
            "dtype": "float16",
            "row_scaling": "unit rows; norms in .norms.npy",
            "projection": projection,
            "fingerprint": model_fingerprint,
            "ids_file": IDS_FILE,
            "checkpoints": [],
            **(extra or {}),
        }
        with (self.directory / IDS_FILE).open("w") as handle:
            json.dump(ids if isinstance(ids, list) else list(ids), handle)  # written chunk by chunk
        self._checkpoint: dict[str, Any] | None = None
        self._written = 0
        self._rows: BinaryIO | None = None
        self._norms: BinaryIO | None = None

    def begin_checkpoint(self, epoch: int, weight: float) -> None:
        if self._checkpoint is not None:
            raise RuntimeError("the previous checkpoint is not finished")
        index = len(self.manifest["checkpoints"])
        shards = [
            {
                "file": f"ckpt-{index}-shard-{s:05d}.npy",
                "start": start,
                "rows": min(self.shard_rows, self.n - start),
            }
            for s, start in enumerate(range(0, self.n, self.shard_rows))
        ]
        self._checkpoint = {"epoch": epoch, "weight": weight, "shards": shards}
        self._written = 0

    def append(self, rows: torch.Tensor) -> None:
        """``rows [batch, dim]`` (any float dtype, any device), the next training examples."""
        if self._checkpoint is None:
            raise RuntimeError("begin_checkpoint first")
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"index rows have shape {tuple(rows.shape)}; expected (batch, {self.dim})")
        rows = rows.detach().to("cpu", torch.float32)
        norms = torch.linalg.vector_norm(rows, dim=1)
        unit = rows / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        unit_np, norms_np = unit.to(torch.float16).numpy(), norms.numpy()
        offset = 0
        while offset < len(unit_np):
            shard = self._checkpoint["shards"][self._written // self.shard_rows]
            if self._written == shard["start"]:
                self._open_shard(shard)
            if self._rows is None or self._norms is None:
                raise RuntimeError(f"no shard is open at row {self._written}")
            take = min(len(unit_np) - offset, shard["start"] + shard["rows"] - self._written)
            self._rows.write(unit_np[offset : offset + take].tobytes())
            self._norms.write(norms_np[offset : offset + take].astype("<f4").tobytes())
            offset += take
            self._written += take
            if self._written == shard["start"] + shard["rows"]:
                self._close_shard()

    def end_checkpoint(self) -> None:
        if self._checkpoint is None or self._written != self.n:
            raise RuntimeError(f"checkpoint has {self._written} of {self.n} rows")
        self.manifest["checkpoints"].append(self._checkpoint)
        self._checkpoint = None

    def finish(self, **fields: Any) -> GradientIndex:
        """Writes the manifest (with ``fields`` added, e.g. build times) and opens the index."""
        if self._checkpoint is not None:
            raise RuntimeError("the last checkpoint is not finished")
        self.manifest.update(fields)
        (self.directory / MANIFEST).write_text(json.dumps(self.manifest, indent=1))
        return GradientIndex.open(self.directory)

    def close(self) -> None:
        """Closes any open shard (after an error or a cancel)."""
        self._close_shard()

    def _open_shard(self, shard: dict[str, Any]) -> None:
        self._rows = open_npy(self.directory / shard["file"], "<f2", (shard["rows"], self.dim))
        self._norms = open_npy(self.directory / Shard(**shard).norms_file, "<f4", (shard["rows"],))

    def _close_shard(self) -> None:
        for handle in (self._rows, self._norms):
            if handle is not None:
                handle.close()
        self._rows = self._norms = None


def open_npy(path: Path, descr: str, shape: tuple[int, ...]) -> BinaryIO:
    """A ``.npy`` file of ``shape`` opened for writing its data, the header already written."""
    handle = path.open("wb")
    np.lib.format.write_array_header_1_0(handle, {"descr": descr, "fortran_order": False, "shape": shape})
    return handle


class GradientIndex:
    """A finished index on disk; rows come back block by block."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.checkpoints = [
            IndexCheckpoint(c["epoch"], c["weight"], [Shard(**s) for s in c["shards"]])
            for c in manifest["checkpoints"]
        ]

    @classmethod
    def open(cls, directory: Path) -> GradientIndex:
        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("format") != INDEX_FORMAT or manifest.get("version") != INDEX_VERSION:
            raise ValueError(f"{directory} is not a version-{INDEX_VERSION} gpu_core gradient index")
        return cls(directory, manifest)

    @property
    def n_examples(self) -> int:
        return int(self.manifest["n_examples"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def ids(self) -> list[str]:
        return json.loads((self.directory / self.manifest["ids_file"]).read_text())

    def files(self) -> list[Path]:
        names = [MANIFEST, self.manifest["ids_file"]]
        for checkpoint in self.checkpoints:
            for shard in checkpoint.shards:
                names += [shard.file, shard.norms_file]
        return [self.directory / name for name in names]

    def blocks(self, checkpoint: int, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start row, float32 [rows, dim])``, rows at their stored norms, ``block_rows`` at a
        time (fewer at a shard's end). One shard is mapped at a time."""
        for shard in self.checkpoints[checkpoint].shards:
            rows = np.load(self.directory / shard.file, mmap_mode="r")
            norms = np.load(self.directory / shard.norms_file)
            for offset in range(0, shard.rows, block_rows):
                block = torch.from_numpy(np.array(rows[offset : offset + block_rows], dtype=np.float32))
                block *= torch.from_numpy(norms[offset : offset + block_rows]).unsqueeze(1)
                yield shard.start + offset, block
            del rows
