"""A sharded experiment's plan and the results of its jobs (gpu_core.sharding runs them). No torch:
the scheduler, the cost model and the gateway plan and validate with it.

An experiment with ``influence.shards`` N > 1 is a graph of jobs: one training job
(:class:`TrainingJobResult`), N index-shard jobs (:class:`ShardRequest` in,
:class:`IndexShardResult` out), each over a contiguous slice of the training set, then a merge
that yields the experiment's ordinary ``ExperimentResult``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpu_core.schemas import MAX_SHARDS, ArtifactEntry, DataSummary, EvalResults, TrainingSummary

# "auto": one shard per this many training examples at least (below it a shard's fixed cost,
# loading the model and the adapter, outweighs its share of the index pass).
AUTO_MIN_SHARD_EXAMPLES = 5_000
SHARD_DIR_PREFIX = "shard-"
# Where a shard job puts its files, under its artifacts directory; ``{shard}`` is
# :func:`shard_name`. The index rows sit where the merged index manifest points (the union of
# every job's artifacts is one experiment's tree, no file renamed or copied).
SHARD_INDEX_DIR = "gradient_index/{shard}"
SHARD_PARTS_DIR = "shards/{shard}"
SHARD_SCORES = "scores.f8.npy"  # float64 [n_eval, rows], this slice's columns
SHARD_SELF_INFLUENCE = "self_influence.npy"  # float64 [rows]
SHARD_TRAIN_LOSS = "train_loss.npy"  # float64 [rows]
# The summary's net influence from the final adapter (TracIn, TrackStar; gpu_core.training_summary).
SHARD_NET_INFLUENCE = "net_influence.npy"  # float64 [rows]


def shard_name(shard: int) -> str:
    return f"{SHARD_DIR_PREFIX}{shard:05d}"


def shard_count(requested: int | str, n_train: int, batch_size: int, max_parallel: int) -> int:
    """How many shards to run: ``requested``, or for "auto" one per
    :data:`AUTO_MIN_SHARD_EXAMPLES` examples up to ``max_parallel`` (the backend's concurrent
    jobs); never more than there are batches of the training set."""
    batches = max(1, -(-n_train // batch_size))
    if requested == "auto":
        wanted = max(1, min(max_parallel, n_train // AUTO_MIN_SHARD_EXAMPLES, MAX_SHARDS))
    else:
        wanted = int(requested)
    return max(1, min(wanted, batches))


def shard_slices(n_train: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous ``[start, stop)`` slices covering ``range(n_train)``, each starting
    on a multiple of ``batch_size``: every shard then forms exactly the batches an unsharded
    index pass forms, so its rows are the same numbers (not only the same up to rounding)."""
    batches = max(1, -(-n_train // batch_size))
    shards = max(1, min(shards, batches))
    bounds = [round(i * batches / shards) * batch_size for i in range(shards + 1)]
    return [(start, min(stop, n_train)) for start, stop in zip(bounds, bounds[1:], strict=False)]


class TrainingJobResult(BaseModel):
    """The training job: the experiment's evaluations and training, and its artifacts
    (``adapter/``, ``checkpoints/`` with each epoch's learning rate and Adam second moments)."""

    eval_results: EvalResults
    training: TrainingSummary
    timings: dict[str, float]
    environment: dict[str, Any]
    data: DataSummary | None = None
    artifacts: list[ArtifactEntry] = Field(default_factory=list)


class ShardRequest(BaseModel):
    """One index-shard job: training examples ``[start, stop)``, shard ``shard`` of ``shards``."""

    model_config = ConfigDict(extra="forbid")

    shard: int = Field(ge=0, lt=MAX_SHARDS)
    shards: int = Field(ge=1, le=MAX_SHARDS)
    start: int = Field(ge=0)
    stop: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ShardRequest:
        if self.shard >= self.shards:
            raise ValueError(f"shard: {self.shard} is not below shards ({self.shards})")
        if self.stop <= self.start:
            raise ValueError(f"stop: {self.stop} is not after start ({self.start})")
        return self


class IndexShardResult(BaseModel):
    """An index-shard job's outcome; its files are under :data:`SHARD_INDEX_DIR` and
    :data:`SHARD_PARTS_DIR` of its artifacts."""

    shard: int
    shards: int
    start: int
    stop: int
    method: str
    fingerprint: str  # the index's model/adapter fingerprint; every shard's must agree
    timings: dict[str, float]
    environment: dict[str, Any]
    artifacts: list[ArtifactEntry] = Field(default_factory=list)


class ShardMergeRequest(BaseModel):
    """The merge job: the results of every index shard (their files are the merge's parent
    artifacts, downloaded into one directory under their names)."""

    model_config = ConfigDict(extra="forbid")

    shards: list[IndexShardResult] = Field(min_length=1, max_length=MAX_SHARDS)


class ShardMergeError(ValueError):
    """The shards do not make one index (a gap, an overlap, another adapter or projection)."""


def check_coverage(results: Sequence[IndexShardResult], n_train: int, method: str) -> None:
    """The shards, by start, cover ``range(n_train)`` once, for ``method``, from one adapter;
    raises :class:`ShardMergeError` naming the first shard that does not fit."""
    if not results:
        raise ShardMergeError("no shards to merge")
    expected = 0
    for result in sorted(results, key=lambda result: result.start):
        if result.start != expected:
            kind = "a gap" if result.start > expected else "an overlap"
            raise ShardMergeError(f"shard {result.shard}: starts at {result.start}, {kind} after {expected}")
        if result.method != method:
            raise ShardMergeError(f"shard {result.shard}: built for {result.method}, not {method}")
        expected = result.stop
    if expected != n_train:
        raise ShardMergeError(f"the shards cover {expected} of the {n_train} training examples")
    if len({result.fingerprint for result in results}) != 1:
        raise ShardMergeError("the shards were built from different adapters (their fingerprints differ)")
