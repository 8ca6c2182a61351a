"""A sharded experiment (training job, index shards, merge) equals the unsharded run: scores,
top-k, the index read back as one, the training-set summary."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpu_core.influence.index import INDEX_DIR_NAME, GradientIndex
from gpu_core.pipeline import run_experiment_to_result, run_training_job
from gpu_core.schemas import ExperimentResult, ExperimentSpec, SpecError, parse_spec
from gpu_core.shard_schemas import IndexShardResult, TrainingJobResult, shard_count, shard_name, shard_slices
from gpu_core.sharding import ShardMergeError, merge_shards, run_index_shard, shard_requests
from gpu_core.training_summary import SUMMARY_NAME

pytestmark = pytest.mark.slow


def _result(events: Any) -> dict[str, Any]:
    return next(event for event in events if event["type"] == "result")["result"]


def _top_ids(result: ExperimentResult) -> dict[str, tuple[list[str], list[str]]]:
    return {
        eval_id: ([s.id for s in top.helpful], [s.id for s in top.harmful])
        for eval_id, top in result.influence.top_k.items()
    }


class ShardedRun:
    """One training job, its shards at each N, merged; and the unsharded run of the same spec."""

    def __init__(self, spec: ExperimentSpec, root: Path) -> None:
        self.spec, self.root = spec, root
        self.reference = run_experiment_to_result(spec, root / "unsharded")
        self.training_dir = root / "training"
        self.training = TrainingJobResult.model_validate(_result(run_training_job(spec, self.training_dir)))
        self.shards: dict[int, list[tuple[IndexShardResult, Path]]] = {}
        self.merged: dict[int, ExperimentResult] = {}

    def shard_results(self, n: int) -> list[tuple[IndexShardResult, Path]]:
        if n not in self.shards:
            done = []
            for request in shard_requests(self.spec, n):
                directory = self.root / f"n{n}" / shard_name(request.shard)
                events = run_index_shard(self.spec, request, self.training_dir, directory)
                done.append((IndexShardResult.model_validate(_result(events)), directory))
            self.shards[n] = done
        return self.shards[n]

    def merged_result(self, n: int) -> ExperimentResult:
        if n not in self.merged:
            self.merged[n] = merge_shards(self.spec, self.training, self.shard_results(n), self.merge_dir(n))
        return self.merged[n]

    def merge_dir(self, n: int) -> Path:
        return self.root / f"n{n}" / "merge"


@pytest.fixture(scope="module", params=["tracin", "trackstar"])
def sharded(
    request: pytest.FixtureRequest, copy_task: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> ShardedRun:
    raw = json.loads(json.dumps(copy_task))
    raw["training_data"] = raw["training_data"][:40]
    raw["eval_data"] = raw["eval_data"][:6]
    raw["influence_method"] = request.param
    raw["influence"] = {"top_k": 5, "projection_dim": 64, "projection_seed": 7}
    raw["hyperparams"].update(epochs=2, batch_size=4)
    spec = ExperimentSpec.model_validate(raw)
    return ShardedRun(spec, tmp_path_factory.mktemp(f"sharded-{request.param}"))


@pytest.mark.parametrize("n", [2, 4])
def test_merged_equals_unsharded(sharded: ShardedRun, n: int) -> None:
    merged, reference = sharded.merged_result(n), sharded.reference
    assert len(sharded.shard_results(n)) == n
    got = np.load(sharded.merge_dir(n) / "scores.npy")
    want = np.load(sharded.root / "unsharded" / "scores.npy")
    assert got.shape == want.shape == (6, 40)
    relative = np.abs(got - want).max() / np.abs(want).max()
    assert relative < 1e-5, f"max relative error {relative:.2e} at N={n}"
    assert _top_ids(merged) == _top_ids(reference)
    assert merged.influence.heatmap is not None and reference.influence.heatmap is not None
    assert merged.influence.heatmap.train_ids == reference.influence.heatmap.train_ids
    assert merged.eval_results == reference.eval_results
    assert merged.training == reference.training


def test_every_shard_projects_as_the_unsharded_index(sharded: ShardedRun) -> None:
    """Same seed, same projection and adapter in every shard; the merged manifest reads back the
    unsharded rows."""
    shards = sharded.shard_results(2)
    reference = GradientIndex.open(sharded.root / "unsharded" / INDEX_DIR_NAME)
    assert {result.fingerprint for result, _ in shards} == {reference.manifest["fingerprint"]}
    # The union of the jobs' files is one tree: merge's manifest plus the shards' rows.
    tree = sharded.root / "n2" / "union"
    (tree / INDEX_DIR_NAME).mkdir(parents=True)
    for source in [sharded.merge_dir(2), *(directory for _, directory in shards)]:
        for path in (source / INDEX_DIR_NAME).rglob("*"):
            if path.is_file():
                target = tree / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path)
    merged = GradientIndex.open(tree / INDEX_DIR_NAME)
    assert merged.ids() == reference.ids() and merged.n_examples == 40
    assert merged.manifest["projection"] == reference.manifest["projection"]
    for checkpoint in range(len(reference.checkpoints)):
        got = np.concatenate([block.numpy() for _, block in merged.blocks(checkpoint, 16)])
        want = np.concatenate([block.numpy() for _, block in reference.blocks(checkpoint, 16)])
        np.testing.assert_array_equal(got, want)


def _union_tree(sharded: ShardedRun, n: int, target: Path) -> Path:
    """The experiment's artifacts as the scheduler would hold them: every job's files under
    their names (links; no name is written by two jobs)."""
    sources = [sharded.training_dir, sharded.merge_dir(n), *(d for _, d in sharded.shard_results(n))]
    for source in sources:
        for path in source.rglob("*"):
            if path.is_file():
                link = target / path.relative_to(source)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path)
    return target


def test_a_follow_up_query_reads_the_sharded_index_as_one(sharded: ShardedRun, tmp_path: Path) -> None:
    """A query job on the sharded experiment uses its stored (merged) index and scores an eval
    example asked again as the experiment did."""
    from gpu_core.jobs import QUERY, make_payload, parse_payload, run_job
    from gpu_core.schemas import QueryResult

    merged = sharded.merged_result(2)
    tree = _union_tree(sharded, 2, tmp_path / "experiment")
    evals = sharded.spec.eval_data[:2]
    request = {"queries": [{"prompt": e.prompt, "expected": e.expected} for e in evals], "top_k": 40}
    payload = make_payload(
        QUERY, sharded.spec.model_dump(mode="json"), request, merged.model_dump(mode="json")
    )
    answered = QueryResult.model_validate(_result(run_job(parse_payload(payload), None, None, tree)))
    assert answered.source == "index"
    scores = np.load(sharded.merge_dir(2) / "scores.npy")
    ids = [example.assigned_id for example in sharded.spec.training_data]
    for row, outcome in zip(scores[: len(evals)], answered.results, strict=True):
        got = {s.id: s.score for s in [*outcome.helpful, *outcome.harmful]}
        np.testing.assert_allclose([got.get(i, 0.0) for i in ids], row, rtol=1e-4, atol=1e-6)


def test_training_summary_matches(sharded: ShardedRun) -> None:
    sharded.merged_result(2)
    got = json.loads((sharded.merge_dir(2) / SUMMARY_NAME).read_text())["examples"]
    want = json.loads((sharded.root / "unsharded" / SUMMARY_NAME).read_text())["examples"]
    assert [row["id"] for row in got] == [row["id"] for row in want]
    for key in ("net_influence", "self_influence", "train_loss"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-4, atol=1e-6)


def test_merge_refuses_a_missing_shard(sharded: ShardedRun, tmp_path: Path) -> None:
    shards = sharded.shard_results(2)
    with pytest.raises(ShardMergeError, match="cover 20 of the 40"):
        merge_shards(sharded.spec, sharded.training, shards[:1], tmp_path)
    with pytest.raises(ShardMergeError, match="starts at 20, a gap after 0"):
        merge_shards(sharded.spec, sharded.training, shards[1:], tmp_path)


def test_shard_plan() -> None:
    assert shard_slices(40, 4, 2) == [(0, 20), (20, 40)]
    assert shard_slices(41, 4, 4) == [(0, 12), (12, 24), (24, 32), (32, 41)]
    assert all(start % 8 == 0 for start, _ in shard_slices(20_000, 8, 3))
    assert shard_slices(5, 8, 4) == [(0, 5)]  # one batch, one shard
    assert shard_count("auto", 20_000, 8, max_parallel=2) == 2
    assert shard_count("auto", 1_000, 8, max_parallel=4) == 1
    assert shard_count(3, 16, 8, max_parallel=1) == 2


def test_spec_refuses_shards_without_an_index(copy_task: dict[str, Any]) -> None:
    raw = {**copy_task, "influence": {"shards": 2}}
    with pytest.raises(SpecError, match="influence.shards: tracin builds no gradient index"):
        parse_spec(raw)
    with pytest.raises(SpecError, match="influence.shards: must be between 1 and 64"):
        parse_spec({**copy_task, "influence": {"shards": 65, "projection_dim": 64}})


def test_shard_job_needs_the_training_artifacts(make_spec: Callable[..., Any], tmp_path: Path) -> None:
    spec = make_spec(n_train=8, n_eval=2, method="trackstar")
    request = shard_requests(spec, 2)[0]
    with pytest.raises(FileNotFoundError, match="adapter/ and checkpoints/"):
        _result(run_index_shard(spec, request, tmp_path / "nothing", tmp_path / "out"))


def _stop_after(checks: int) -> Callable[[], bool]:
    """A stop signal that turns true at the ``checks``-th time it is asked."""
    remaining = iter(range(checks - 1))
    return lambda: next(remaining, None) is None


def test_the_graph_as_job_payloads_with_a_killed_shard_retried_alone(
    sharded: ShardedRun, tmp_path: Path
) -> None:
    """Each job through the payload every worker receives (``jobs.parse_payload``/``run_job``),
    its files within its upload plan; shard 1 is stopped mid-run, run again alone in the same
    directory, and the merge (given only the files it downloads) equals the unsharded run."""
    from gpu_core.jobs import INDEX_SHARD, SHARD_MERGE, make_payload, parse_payload, run_job
    from gpu_core.pipeline import ExperimentCancelled
    from gpu_core.uploads import (
        needed_shard_inputs,
        planned_merge_artifact_names,
        planned_shard_artifact_names,
        planned_training_artifact_names,
    )

    spec, raw_spec = sharded.spec, sharded.spec.model_dump(mode="json")
    training = sharded.training.model_dump(mode="json")
    assert {a.name for a in sharded.training.artifacts} <= set(planned_training_artifact_names(spec))
    results = []
    for request in shard_requests(spec, 2):
        job = parse_payload(make_payload(INDEX_SHARD, raw_spec, request.model_dump(), training))
        directory = tmp_path / shard_name(request.shard)
        if request.shard == 1:
            with pytest.raises(ExperimentCancelled):  # a few batches in, the platform stops it
                _result(run_job(job, directory, _stop_after(6), sharded.training_dir))
            assert not (directory / "shards").exists()  # stopped before its columns were written
        result = IndexShardResult.model_validate(_result(run_job(job, directory, None, sharded.training_dir)))
        assert {a.name for a in result.artifacts} <= set(planned_shard_artifact_names(spec, request))
        results.append(result)

    # The merge's parent artifacts: only what it downloads, every shard's in one directory.
    downloads = tmp_path / "merge-inputs"
    for result in results:
        for name in needed_shard_inputs(SHARD_MERGE, [a.name for a in result.artifacts]):
            target = downloads / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((tmp_path / shard_name(result.shard) / name).read_bytes())
    assert not list(downloads.rglob("ckpt-*"))  # no index rows move to the merge
    request = {"shards": [result.model_dump(mode="json") for result in results]}
    job = parse_payload(make_payload(SHARD_MERGE, raw_spec, request, training))
    merged = ExperimentResult.model_validate(_result(run_job(job, tmp_path / "merge", None, downloads)))
    assert {a.name for a in merged.artifacts} <= set(planned_merge_artifact_names())
    got = np.load(tmp_path / "merge" / "scores.npy")
    want = np.load(sharded.root / "unsharded" / "scores.npy")
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
    assert _top_ids(merged) == _top_ids(sharded.reference)


def test_merge_job_refuses_shards_that_do_not_cover(sharded: ShardedRun) -> None:
    from gpu_core.jobs import SHARD_MERGE, JobInputError, make_payload, parse_payload

    one = sharded.shard_results(2)[0][0].model_dump(mode="json")
    training = sharded.training.model_dump(mode="json")
    payload = make_payload(SHARD_MERGE, sharded.spec.model_dump(mode="json"), {"shards": [one]}, training)
    with pytest.raises(JobInputError, match="request.shards: the shards cover 20 of the 40"):
        parse_payload(payload)
