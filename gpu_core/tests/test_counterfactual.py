"""Counterfactual checks on the real pipeline: retraining reproduces the experiment, removing a
planted duplicate's top-1 example hurts its eval example more than random removals, the CLI, and
requests that do not fit the experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import planted
from gpu_core.counterfactual import (
    CounterfactualError,
    retrain_and_evaluate,
    run_counterfactual,
    spearman,
)
from gpu_core.pipeline import run_experiment_to_result
from gpu_core.runtime import load_model
from gpu_core.schemas import CounterfactualRequest, ExperimentResult, ExperimentSpec, parse_spec

N_TRAIN, N_EVAL = 32, 8
# Eval example i copies training example DUPLICATE_OF[i].
DUPLICATE_OF = [planted.duplicate_of(i, N_TRAIN, N_EVAL) for i in range(N_EVAL)]


def planted_duplicate_spec(method: str, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> ExperimentSpec:
    return parse_spec(planted.planted_duplicate_spec(method, n_train, n_eval))


@pytest.fixture(scope="module")
def experiment() -> tuple[ExperimentSpec, ExperimentResult]:
    spec = planted_duplicate_spec("kronfluence")
    return spec, run_experiment_to_result(spec)


@pytest.mark.slow
def test_retraining_on_the_whole_set_reproduces_the_experiment(
    experiment: tuple[ExperimentSpec, ExperimentResult],
) -> None:
    spec, result = experiment
    loaded = load_model(spec.model_id, device=torch.device("cpu"))
    run = retrain_and_evaluate(loaded, spec, set(), spec.eval_data)
    assert [o.loss for o in run.examples] == [o.loss for o in result.eval_results.finetuned.examples]
    # The adapter came out again: the base model answers as the base model did.
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())


@pytest.mark.slow
def test_removing_each_duplicates_top_one_beats_random_removal(
    experiment: tuple[ExperimentSpec, ExperimentResult],
) -> None:
    spec, result = experiment
    events: list[tuple[float, str]] = []
    check = run_counterfactual(
        spec, result, CounterfactualRequest(k=1, controls=2), report=lambda f, m: events.append((f, m))
    )
    # Kronfluence ranks each planted duplicate first, so the union is exactly the duplicates.
    assert check.removed_ids == [f"t{j}" for j in DUPLICATE_OF]
    assert len(check.control_removed_ids) == 2
    for control in check.control_removed_ids:
        assert len(control) == N_EVAL and not set(control) & set(check.removed_ids)
    assert check.beats_controls_rate is not None and check.beats_controls_rate >= 0.9
    for outcome in check.examples:
        assert outcome.top_k_loss_change > 0  # forgetting its copy raises the eval loss
    fractions = [fraction for fraction, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("retraining 3/3" in message for _, message in events)


@pytest.mark.slow
def test_cli_writes_the_check_with_lds(
    experiment: tuple[ExperimentSpec, ExperimentResult], tmp_path: Path
) -> None:
    spec, result = experiment
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    scores_path, out = tmp_path / "scores.npy", tmp_path / "check" / "out.json"
    spec_path.write_text(spec.model_dump_json())
    result_path.write_text(result.model_dump_json())
    np.save(scores_path, np.asarray(result.influence.scores, dtype=np.float32))
    done = subprocess.run(
        [sys.executable, "-m", "gpu_core", "counterfactual", str(spec_path), str(result_path)]
        + ["--out", str(out), "--scores", str(scores_path), "--eval-ids", "e1,e2", "--k", "2"]
        + ["--controls", "1", "--lds-subsets", "4"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "GPU_CORE_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "retraining 6/6" in done.stderr  # 1 + 1 control + 4 LDS subsets
    check: dict[str, Any] = json.loads(out.read_text())
    assert [example["id"] for example in check["examples"]] == ["e1", "e2"]
    assert len(check["removed_ids"]) <= 4 and "t4" in check["removed_ids"] and "t8" in check["removed_ids"]
    assert check["lds"]["subsets"] == 4 and set(check["lds"]["per_eval"]) == {"e1", "e2"}
    assert all(-1.0 <= value <= 1.0 for value in check["lds"]["per_eval"].values())


def test_requests_that_do_not_fit_are_named(experiment: tuple[ExperimentSpec, ExperimentResult]) -> None:
    spec, result = experiment
    with pytest.raises(CounterfactualError, match="eval_ids: not in this experiment: 'nope'"):
        run_counterfactual(spec, result, CounterfactualRequest(eval_ids=["e1", "nope"]))
    # The result kept the top 3 per eval example and carries no matrix here.
    no_matrix = result.model_copy(deep=True)
    no_matrix.influence.scores = []
    with pytest.raises(CounterfactualError, match="k: 5 is more than the 3 examples"):
        run_counterfactual(spec, no_matrix, CounterfactualRequest(k=5))
    with pytest.raises(CounterfactualError, match="lds_subsets: LDS needs"):
        run_counterfactual(spec, no_matrix, CounterfactualRequest(k=1, lds_subsets=2))
    other = planted_duplicate_spec("kronfluence", n_train=N_TRAIN - 1)
    with pytest.raises(CounterfactualError, match="result: its training ids are not the spec's"):
        run_counterfactual(other, result, CounterfactualRequest(k=1))
    with pytest.raises(CounterfactualError, match="scores: shape"):
        run_counterfactual(spec, result, CounterfactualRequest(k=1), scores=np.zeros((2, 2)))


def test_cli_refuses_a_bad_result_file(tmp_path: Path) -> None:
    from gpu_core.cli import EXIT_BAD_SPEC, main

    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec_path.write_text(planted_duplicate_spec("tracin", n_train=4, n_eval=2).model_dump_json())
    result_path.write_text("{}")
    code = main(["counterfactual", str(spec_path), str(result_path), "--out", str(tmp_path / "o.json")])
    assert code == EXIT_BAD_SPEC
    assert not (tmp_path / "o.json").exists()


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.normal(size=40)
    assert spearman(a, b) == pytest.approx(float(spearmanr(a, b).statistic), abs=1e-12)
    assert spearman(np.ones(5), np.arange(5.0)) == 0.0


@pytest.mark.slow
def test_the_job_streams_progress_then_the_result_and_stops_when_closed(
    experiment: tuple[ExperimentSpec, ExperimentResult],
) -> None:
    import threading

    from gpu_core.jobs import COUNTERFACTUAL, make_payload, parse_payload, run_job
    from gpu_core.pipeline import WORKER_THREAD_NAME

    spec, result = experiment
    payload = make_payload(
        COUNTERFACTUAL,
        spec.model_dump(mode="json"),
        {"eval_ids": ["e1"], "k": 1, "controls": 1},
        result.model_dump(mode="json"),
    )
    events = list(run_job(parse_payload(json.loads(json.dumps(payload)))))
    *progress, last = events
    assert progress and {event["stage"] for event in progress} == {"counterfactual"}
    assert [e["progress"] for e in progress] == sorted(e["progress"] for e in progress)
    assert last["type"] == "result" and last["result"]["removed_ids"] == ["t4"]
    assert [example["id"] for example in last["result"]["examples"]] == ["e1"]

    # Closing the generator mid-retraining stops the worker thread before close() returns.
    running = run_job(parse_payload(payload))
    seen = [next(running) for _ in range(3)]
    assert all(event["type"] == "progress" for event in seen)
    running.close()
    assert not any(thread.name == WORKER_THREAD_NAME for thread in threading.enumerate())


def test_job_payloads_name_what_is_wrong(experiment: tuple[ExperimentSpec, ExperimentResult]) -> None:
    from gpu_core.jobs import COUNTERFACTUAL, EXPERIMENT, JobInputError, make_payload, parse_payload

    spec, result = experiment
    spec_json, result_json = spec.model_dump(mode="json"), result.model_dump(mode="json")
    # An experiment's payload is the bare spec, as workers have always received it.
    assert make_payload(EXPERIMENT, spec_json, None, None) is spec_json
    assert parse_payload(spec_json).kind.name == EXPERIMENT
    with pytest.raises(JobInputError, match="kind: unknown job kind 'retrain'"):
        parse_payload({"kind": "retrain", "spec": spec_json})
    with pytest.raises(JobInputError, match="parent_result: a counterfactual job needs"):
        parse_payload(make_payload(COUNTERFACTUAL, spec_json, {"k": 1}, None))
    with pytest.raises(JobInputError, match="^k: Input should be less than or equal to 1000"):
        parse_payload(make_payload(COUNTERFACTUAL, spec_json, {"k": 5000}, result_json))
    with pytest.raises(JobInputError, match="remove: Input should be 'helpful' or 'harmful'"):
        parse_payload(make_payload(COUNTERFACTUAL, spec_json, {"remove": "both"}, result_json))
    with pytest.raises(JobInputError, match="eval_ids: not in this experiment"):
        parse_payload(make_payload(COUNTERFACTUAL, spec_json, {"eval_ids": ["x"]}, result_json))
