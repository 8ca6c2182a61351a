"""The whole experiment on the tiny model: learning, events, determinism, cancellation."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_core.pipeline import WORKER_THREAD_NAME, run_experiment, run_experiment_to_result
from gpu_core.schemas import STAGES, ExperimentResult

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_run(copy_task: dict[str, Any]) -> tuple[list[dict[str, Any]], ExperimentResult]:
    """The 64-train / 16-eval copy task with TracIn, every event kept."""
    from gpu_core.schemas import ExperimentSpec

    events = list(run_experiment(ExperimentSpec.model_validate(copy_task)))
    return events[:-1], ExperimentResult.model_validate(events[-1]["result"])


def test_fine_tuning_learns_the_toy_task(full_run) -> None:
    _, result = full_run
    runs = result.eval_results
    assert runs.finetuned.metrics.mean_loss < runs.base.metrics.mean_loss - 2.0
    assert runs.finetuned.metrics.exact_match_rate > runs.base.metrics.exact_match_rate
    assert runs.finetuned.metrics.exact_match_rate >= 0.5
    curve = [point.loss for point in result.training.loss_curve]
    assert len(curve) == 8 * 8  # 8 epochs of 8 batches
    assert sum(curve[-8:]) / 8 < sum(curve[:8]) / 8 - 2.0


def test_result_shape(full_run) -> None:
    _, result = full_run
    assert [e.id for e in result.eval_results.base.examples] == [f"e{i}" for i in range(1, 17)]
    assert all(run.metrics.n == 16 for run in (result.eval_results.few_shot, result.eval_results.finetuned))
    influence = result.influence
    assert influence.method == "tracin"
    assert len(influence.scores) == 16 and all(len(row) == 64 for row in influence.scores)
    assert set(influence.top_k) == set(influence.eval_ids)
    assert len(influence.top_k["e1"].helpful) == 5
    assert set(result.timings) == {*STAGES, "training_summary", "total"}
    assert result.artifacts == []  # no artifacts directory, no files
    assert {"torch", "transformers", "peft", "device", "dtype", "gpu_name"} <= set(result.environment)


def test_progress_events(full_run) -> None:
    events, _ = full_run
    assert all(event["type"] == "progress" for event in events)
    stages = [event["stage"] for event in events]
    assert list(dict.fromkeys(stages)) == list(STAGES)
    overall = [event["progress"] for event in events]
    assert overall == sorted(overall) and overall[0] == 0.0 and overall[-1] == pytest.approx(1.0)
    steps = [event for event in events if event["step"] is not None]
    # Throttled to one event a second per stage: a rising subset of the steps, ending at the last.
    numbers = [event["step"] for event in steps]
    assert numbers == sorted(set(numbers)) and numbers[-1] == 64 and 1 <= len(numbers) <= 64
    assert all(event["total_steps"] == 64 and event["total_epochs"] == 8 for event in steps)
    assert all(event["loss"] > 0 and event["learning_rate"] > 0 and event["eta_s"] >= 0 for event in steps)
    assert steps[-1]["epoch"] == 8 and steps[-1]["eta_s"] == 0


@pytest.mark.parametrize("method", ["tracin", "datainf", "kronfluence"])
def test_same_spec_and_seed_give_identical_results(method: str, make_spec: Callable[..., Any]) -> None:
    spec = make_spec(n_train=24, n_eval=6, method=method, epochs=2)
    first, second = run_experiment_to_result(spec), run_experiment_to_result(spec)
    assert first.training.loss_curve == second.training.loss_curve
    assert first.influence.scores == second.influence.scores
    assert first.eval_results == second.eval_results


def test_another_seed_changes_the_run(make_spec: Callable[..., Any]) -> None:
    spec = make_spec(n_train=24, n_eval=6, epochs=2)
    other = make_spec(n_train=24, n_eval=6, epochs=2, seed=1)
    first, second = run_experiment_to_result(spec), run_experiment_to_result(other)
    assert first.training.loss_curve != second.training.loss_curve


def _live_models() -> int:
    """Models (base or peft) still reachable from anywhere in this process."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    gc.collect()
    return sum(issubclass(type(obj), PreTrainedModel | PeftModel) for obj in gc.get_objects())


def _worker_alive() -> bool:
    return any(thread.name == WORKER_THREAD_NAME for thread in threading.enumerate())


def test_closing_the_generator_stops_training_and_frees_the_model(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    events = run_experiment(make_spec(epochs=100), artifacts)
    for event in events:
        if event.get("step"):  # a training step is under way (throttled: not every step reports)
            break
    assert _worker_alive()
    events.close()
    assert not _worker_alive()
    # The adapter is saved right after training: its absence shows training never finished.
    assert not artifacts.exists()
    assert _live_models() == 0


class _Cancelled(BaseException):
    """Stands for a platform's cancellation (e.g. Modal's InputCancellation)."""


def test_an_exception_thrown_in_propagates_unchanged_and_stops_the_work(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    artifacts = tmp_path / "artifacts"
    events = run_experiment(make_spec(epochs=100), artifacts)
    for event in events:
        if event.get("step"):
            break
    with pytest.raises(_Cancelled):
        events.throw(_Cancelled())
    assert not _worker_alive()
    assert not artifacts.exists()
    assert _live_models() == 0


def test_a_failure_in_the_work_reaches_the_consumer(make_spec: Callable[..., Any]) -> None:
    spec = make_spec(n_train=8, n_eval=2, epochs=1, target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match=r"hyperparams.target_modules: none of \['no_such_proj'\]"):
        run_experiment_to_result(spec)
    assert not _worker_alive()
    assert _live_models() == 0


def test_should_stop_stops_inside_library_code_within_a_batch(make_spec: Callable[..., Any]) -> None:
    """kronfluence fits its factors in one opaque call (progress 0.5 comes after it): a stop
    requested as the stage starts ends the work inside that call, at its next forward pass."""
    from gpu_core.pipeline import ExperimentCancelled

    stop = threading.Event()
    seen: list[tuple[str, float]] = []
    spec = make_spec(n_train=16, n_eval=4, epochs=1, method="kronfluence")
    with pytest.raises(ExperimentCancelled):
        for event in run_experiment(spec, should_stop=stop.is_set):
            seen.append((event["stage"], event["stage_progress"]))
            if event["stage"] == "influence":
                stop.set()
    assert seen[-1] == ("influence", 0.0)
    assert not _worker_alive()
    assert _live_models() == 0


def test_should_stop_mid_training_stops_before_the_next_step(make_spec: Callable[..., Any]) -> None:
    from gpu_core.pipeline import ExperimentCancelled

    stop = threading.Event()
    steps: list[int] = []
    with pytest.raises(ExperimentCancelled):
        for event in run_experiment(make_spec(epochs=100), should_stop=stop.is_set):
            if event.get("step"):
                steps.append(event["step"])
                stop.set()
    # The consumer may see one step reported while it set the flag, never more.
    assert len(steps) <= 2 and steps[-1] <= steps[0] + 1
    assert not _worker_alive()
