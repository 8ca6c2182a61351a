"""An experiment's gradient index built by N jobs at once, and merged into the one result an
unsharded run gives (the plan and the results' shapes: ``gpu_core.shard_schemas``).

1. **Training job** (``pipeline.run_training_job``): load, evaluate, fine-tune, evaluate; saves
   ``adapter/`` and ``checkpoints/`` (each epoch's LoRA state and learning rate, the final
   Adam second moments TrackStar divides by).
2. **Index-shard job** (:func:`run_index_shard`), one per slice ``[start, stop)`` of the training
   set: loads the base model with the training job's adapter and checkpoints (from its
   artifacts, ``parent_artifacts_dir``), builds the projected index of its slice into
   ``gradient_index/shard-NNNNN/`` with the experiment's projection seed (the CountSketch
   depends only on the seed and the layer shapes, so every shard projects alike), scores the
   eval set against it (the eval rows are recomputed per shard: ``n_eval`` gradients per
   checkpoint, small beside a slice of the training set) and runs the training-set summary's pass
   over its slice, writing ``shards/shard-NNNNN/{scores.f8.npy, self_influence.npy,
   train_loss.npy}``. Slices start on batch boundaries, so every shard forms the batches an
   unsharded pass forms.
3. **Merge** (:func:`merge_shards`), no model: reads each shard's score columns (float64), writes
   ``scores.npy`` (float32) column block by column block, builds the top-k, the heatmap and the
   training-set summary from the same float64 matrix an unsharded run holds, and writes
   ``gradient_index/manifest.json`` + ``ids.json`` naming every shard's files where they lie
   (``shard-NNNNN/ckpt-C-shard-S.npy``): the union of the jobs' artifacts is then one index that
   ``GradientIndex.open`` (and a follow-up query) reads as an unsharded one. The merge reads no
   index rows: the bytes it moves are the score columns and the shards' manifests.

:func:`run_sharded` drives the three steps in one process (tests, ``make bench-shards``); the
scheduler runs them as jobs of their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpu_core.artifacts import SCORES_NAME, collect_artifacts
from gpu_core.influence.index import IDS_FILE, INDEX_DIR_NAME, MANIFEST, GradientIndex
from gpu_core.influence.result import build_influence_result
from gpu_core.schemas import ExperimentResult, ExperimentSpec, ProgressEvent
from gpu_core.shard_schemas import (
    SHARD_INDEX_DIR,
    SHARD_NET_INFLUENCE,
    SHARD_PARTS_DIR,
    SHARD_SCORES,
    SHARD_SELF_INFLUENCE,
    SHARD_TRAIN_LOSS,
    IndexShardResult,
    ShardMergeError,
    ShardRequest,
    TrainingJobResult,
    check_coverage,
    shard_name,
    shard_slices,
)

StopCheck = Callable[[], bool]
Events = Generator[dict[str, Any], None, None]
# Columns of the merged scores written at once (n_eval x this float64 in memory per block).
MERGE_BLOCK_COLUMNS = 8192


def run_index_shard(
    spec: ExperimentSpec,
    request: ShardRequest,
    parent_artifacts_dir: Path,
    artifacts_dir: Path,
    should_stop: StopCheck | None = None,
) -> Events:
    """One index shard's events (stages loading_model, then influence with ``progress`` this
    shard's own fraction), then ``{"type": "result", "result": IndexShardResult}``."""
    from gpu_core.pipeline import run_in_worker

    return run_in_worker(
        lambda handoff, cancel: _IndexShard(
            spec, request, parent_artifacts_dir, artifacts_dir, handoff, cancel, should_stop
        ).run()
    )


class _IndexShard:
    def __init__(
        self,
        spec: ExperimentSpec,
        request: ShardRequest,
        parent_artifacts_dir: Path,
        artifacts_dir: Path,
        handoff: Any,
        cancel: Any,
        should_stop: StopCheck | None,
    ) -> None:
        from gpu_core.pipeline import ProgressThrottle

        self.spec, self.request = spec, request
        self.parent_dir, self.artifacts_dir = Path(parent_artifacts_dir), Path(artifacts_dir)
        self.handoff, self.cancel, self.should_stop = handoff, cancel, should_stop
        self.throttle = ProgressThrottle()
        self.progress = 0.0

    def check_cancelled(self) -> None:
        from gpu_core.pipeline import ExperimentCancelled

        if self.cancel.is_set() or (self.should_stop is not None and self.should_stop()):
            self.cancel.set()
            raise ExperimentCancelled

    def report(self, stage: str, fraction: float, message: str) -> None:
        self.check_cancelled()
        self.progress = max(self.progress, min(max(fraction, 0.0), 1.0))
        if self.throttle.admits(stage, self.progress):
            event = ProgressEvent(
                stage=stage,  # type: ignore[arg-type]
                progress=self.progress,
                stage_progress=self.progress,
                message=message,
            )
            self.handoff.put(("event", event.model_dump()))

    def run(self) -> IndexShardResult:
        from transformers import set_seed

        from gpu_core.environment import describe_environment
        from gpu_core.influence.gradients import lora_layers
        from gpu_core.influence.projected import projected_scores
        from gpu_core.influence_methods import influence_method
        from gpu_core.pipeline import experiment_encoder
        from gpu_core.query import ADAPTER_DIR, CHECKPOINTS_DIR, load_checkpoints
        from gpu_core.runtime import load_adapter, load_model
        from gpu_core.training_summary import eval_gradient_sum, final_adapter_signals

        spec, request, hp = self.spec, self.request, self.spec.hyperparams
        if request.stop > len(spec.training_data):
            raise ValueError(
                f"shard {request.shard}: stop {request.stop} is past the "
                f"{len(spec.training_data)} training examples"
            )
        entry = influence_method(spec.influence_method)
        dim = entry.index_dim(spec.influence.projection_dim)
        if dim is None:
            raise ValueError(f"influence.shards: {spec.influence_method} builds no gradient index to shard")
        name = shard_name(request.shard)
        timings: dict[str, float] = {}
        run_started = started = time.monotonic()
        set_seed(hp.seed)
        self.report("loading_model", 0.0, f"shard {name}: loading {spec.model_id}")
        loaded = load_model(spec.model_id, hp.quantization)
        check = self.check_cancelled
        loaded.model.register_forward_pre_hook(lambda _module, _args: check())
        checkpoints = load_checkpoints(self.parent_dir / CHECKPOINTS_DIR)
        adapter_dir = self.parent_dir / ADAPTER_DIR
        if checkpoints is None or not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"shard {name}: the training job's adapter/ and checkpoints/ are not in {self.parent_dir}"
            )
        model = load_adapter(loaded, adapter_dir)
        model.eval()
        lora_layers(model)  # raises now, not mid-pass, when the adapter has no LoRA layers
        timings["loading_model"] = time.monotonic() - started

        encoder = experiment_encoder(spec, loaded.tokenizer)
        examples = spec.training_data[request.start : request.stop]
        train_pairs = [encoder.train_pair(example) for example in examples]
        train_ids = [example.assigned_id for example in examples]
        query_pairs = [encoder.encode(example.turns, last_only=True) for example in spec.eval_data]
        pad = loaded.tokenizer.pad_token_id
        if pad is None:
            pad = loaded.tokenizer.eos_token_id
        message = f"shard {name}: indexing training examples {request.start}-{request.stop - 1}"

        started = time.monotonic()
        index_dir = self.artifacts_dir / SHARD_INDEX_DIR.format(shard=name)
        scored = projected_scores(
            entry,
            model,
            pad,
            train_pairs,
            train_ids,
            query_pairs,
            checkpoints,
            dim,
            spec.influence.projection_seed,
            hp.batch_size,
            index_dir,
            lambda fraction: self.report("influence", 0.05 + 0.85 * fraction, message),
        )
        assert scored.full is not None  # keep_full is the default
        timings["influence"] = time.monotonic() - started

        started = time.monotonic()
        summary_message = f"shard {name}: summarising its training examples"
        eval_gradients = None
        if entry.net_from_final_gradients:  # every method that builds an index, today
            eval_gradients = eval_gradient_sum(model, pad, query_pairs, hp.batch_size)
        signals = final_adapter_signals(
            spec.influence_method,
            model,
            pad,
            train_pairs,
            checkpoints,
            spec.influence,
            hp.batch_size,
            lambda fraction: self.report("influence", 0.9 + 0.1 * fraction, summary_message),
            eval_gradients=eval_gradients,
        )
        parts = self.artifacts_dir / SHARD_PARTS_DIR.format(shard=name)
        parts.mkdir(parents=True, exist_ok=True)
        np.save(parts / SHARD_SCORES, scored.full.numpy().astype(np.float64, copy=False))
        np.save(parts / SHARD_SELF_INFLUENCE, np.asarray(signals.self_influence, dtype=np.float64))
        np.save(parts / SHARD_TRAIN_LOSS, np.asarray(signals.train_loss, dtype=np.float64))
        if signals.net_influence is not None:
            np.save(parts / SHARD_NET_INFLUENCE, np.asarray(signals.net_influence, dtype=np.float64))
        timings["training_summary"] = time.monotonic() - started
        self.report("influence", 1.0, f"shard {name}: done")
        timings["total"] = time.monotonic() - run_started
        return IndexShardResult(
            shard=request.shard,
            shards=request.shards,
            start=request.start,
            stop=request.stop,
            method=spec.influence_method,
            fingerprint=GradientIndex.open(index_dir).manifest["fingerprint"],
            timings=timings,
            environment=describe_environment(loaded.device, loaded.dtype, hp.quantization),
            artifacts=collect_artifacts(self.artifacts_dir),
        )


def merge_shards(
    spec: ExperimentSpec,
    training: TrainingJobResult,
    shards: Sequence[tuple[IndexShardResult, Path]],
    artifacts_dir: Path,
) -> ExperimentResult:
    """The experiment's result from its training job and its shards (each with the directory its
    files are under); writes ``scores.npy``, ``training_summary.json`` and the merged
    ``gradient_index/{manifest.json, ids.json}`` to ``artifacts_dir``. Raises
    :class:`ShardMergeError` when the shards do not cover the training set exactly once or were
    built from different adapters or projections."""
    from gpu_core.influence.projected import ScoresFileWriter
    from gpu_core.influence_methods import influence_method
    from gpu_core.training_summary import summarize, write_summary

    started = time.monotonic()
    ordered = sorted(shards, key=lambda pair: pair[0].start)
    train_ids = [example.assigned_id for example in spec.training_data]
    eval_ids = [example.assigned_id for example in spec.eval_data]
    check_coverage([result for result, _ in ordered], len(train_ids), spec.influence_method)
    artifacts_dir.mkdir(parents=True, exist_ok=True)

    # The float64 matrix an unsharded run holds, so top-k and heatmap are computed alike.
    matrix = np.empty((len(eval_ids), len(train_ids)), dtype=np.float64)
    self_influence = np.empty(len(train_ids), dtype=np.float64)
    train_loss = np.empty(len(train_ids), dtype=np.float64)
    # TracIn's and TrackStar's net influence from the final adapter (gpu_core.training_summary).
    net_influence: np.ndarray | None = None
    if influence_method(spec.influence_method).net_from_final_gradients:
        net_influence = np.empty(len(train_ids), dtype=np.float64)
    for result, directory in ordered:
        parts = directory / SHARD_PARTS_DIR.format(shard=shard_name(result.shard))
        columns = np.load(parts / SHARD_SCORES, mmap_mode="r")
        if columns.shape != (len(eval_ids), result.stop - result.start):
            raise ShardMergeError(
                f"shard {result.shard}: scores have shape {columns.shape}; expected "
                f"({len(eval_ids)}, {result.stop - result.start})"
            )
        matrix[:, result.start : result.stop] = columns
        self_influence[result.start : result.stop] = np.load(parts / SHARD_SELF_INFLUENCE)
        train_loss[result.start : result.stop] = np.load(parts / SHARD_TRAIN_LOSS)
        if net_influence is not None:
            net_influence[result.start : result.stop] = np.load(parts / SHARD_NET_INFLUENCE)
        del columns

    scores_file = ScoresFileWriter(artifacts_dir / SCORES_NAME, len(eval_ids), len(train_ids))
    try:
        for start in range(0, len(train_ids), MERGE_BLOCK_COLUMNS):
            block = matrix[:, start : start + MERGE_BLOCK_COLUMNS]
            scores_file.write(start, _as_tensor(block))
    finally:
        scores_file.close()
    _write_index_manifest(ordered, train_ids, artifacts_dir / INDEX_DIR_NAME)

    influence = build_influence_result(
        spec.influence_method, matrix, train_ids, eval_ids, spec.influence.top_k
    )
    summary = summarize(train_ids, matrix, self_influence, train_loss, net_influence)
    texts = ["\n".join(content for _, content in example.turns) for example in spec.training_data]
    write_summary(artifacts_dir, summary, texts)
    timings = dict(training.timings)
    timings["influence"] = max(result.timings.get("total", 0.0) for result, _ in ordered)
    timings["shards_gpu_s"] = sum(result.timings.get("total", 0.0) for result, _ in ordered)
    timings["merge"] = time.monotonic() - started
    return ExperimentResult(
        eval_results=training.eval_results,
        influence=influence,
        training=training.training,
        timings=timings,
        environment={**training.environment, "shards": len(ordered)},
        data=training.data,
        artifacts=collect_artifacts(artifacts_dir),
    )


def _as_tensor(block: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(block))


def _write_index_manifest(
    shards: Sequence[tuple[IndexShardResult, Path]], train_ids: list[str], directory: Path
) -> None:
    """One manifest over every shard's index files, named relative to ``directory`` where the
    shard jobs wrote them (``shard-NNNNN/...``)."""
    merged: dict[str, Any] | None = None
    for result, source in shards:
        name = shard_name(result.shard)
        index = GradientIndex.open(source / SHARD_INDEX_DIR.format(shard=name))
        manifest = index.manifest
        if merged is None:
            merged = {**manifest, "n_examples": len(train_ids), "ids_file": IDS_FILE, "checkpoints": []}
            merged["checkpoints"] = [
                {"epoch": c["epoch"], "weight": c["weight"], "shards": []} for c in manifest["checkpoints"]
            ]
            merged["build_wall_s"] = 0.0
            merged["build_cpu_s"] = 0.0
            merged["index_shards"] = []
        elif manifest["projection"] != merged["projection"] or manifest["dim"] != merged["dim"]:
            raise ShardMergeError(f"shard {result.shard}: another projection than shard 0's")
        if len(manifest["checkpoints"]) != len(merged["checkpoints"]):
            raise ShardMergeError(f"shard {result.shard}: {len(manifest['checkpoints'])} checkpoints")
        for target, checkpoint in zip(merged["checkpoints"], manifest["checkpoints"], strict=True):
            for part in checkpoint["shards"]:
                file, start = f"{name}/{part['file']}", result.start + part["start"]
                target["shards"].append({"file": file, "start": start, "rows": part["rows"]})
        merged["build_wall_s"] = max(merged["build_wall_s"], float(manifest.get("build_wall_s", 0.0)))
        merged["build_cpu_s"] += float(manifest.get("build_cpu_s", 0.0))
        merged["index_shards"].append({"shard": result.shard, "start": result.start, "stop": result.stop})
    assert merged is not None  # _check_coverage refused an empty list
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / IDS_FILE).open("w") as handle:
        json.dump(train_ids, handle)
    (directory / MANIFEST).write_text(json.dumps(merged, indent=1))


def _result_of(events: Events) -> dict[str, Any]:
    for event in events:
        if event["type"] == "result":
            result: dict[str, Any] = event["result"]
            return result
    raise RuntimeError("the job ended without a result")


def shard_requests(spec: ExperimentSpec, shards: int) -> list[ShardRequest]:
    """The shard jobs of ``spec`` split ``shards`` ways (fewer when there are fewer batches)."""
    slices = shard_slices(len(spec.training_data), spec.hyperparams.batch_size, shards)
    return [
        ShardRequest(shard=i, shards=len(slices), start=start, stop=stop)
        for i, (start, stop) in enumerate(slices)
    ]


def run_sharded(spec: ExperimentSpec, shards: int, root: Path) -> ExperimentResult:
    """Training job, the shard jobs one after another, then the merge, in this process, each job
    in its own directory under ``root`` (``training/``, ``shard-NNNNN/``, ``merge/``)."""
    from gpu_core.pipeline import run_training_job

    training_dir = root / "training"
    training = TrainingJobResult.model_validate(_result_of(run_training_job(spec, training_dir)))
    done = []
    for request in shard_requests(spec, shards):
        directory = root / shard_name(request.shard)
        result = IndexShardResult.model_validate(
            _result_of(run_index_shard(spec, request, training_dir, directory))
        )
        done.append((result, directory))
    return merge_shards(spec, training, done, root / "merge")
