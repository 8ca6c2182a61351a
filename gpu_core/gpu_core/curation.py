"""Curation: retrain on a selection of the training set and compare it with random selections
of the same size, fine-tuned only, on the experiment's eval set.

A request names the selection as ``drop_ids`` or ``keep_ids`` (the gateway turns a rule such as
"drop the 10 most suspect" into ids from the experiment's training summary before submitting, so
the job needs no artifact of its parent). For each seed the selection is retrained once and each
of ``controls`` random selections of the same size once (a control drops, or keeps, as many
examples drawn at random from the whole training set). Every run evaluates the fine-tuned
adapter only (no base or few-shot pass) on every eval example.

The comparison is paired per eval example: for each eval example, the curated run's value minus
the controls' (exact match 0/1, loss), averaged over seeds and controls. The mean of those paired
differences is reported with a 95% bootstrap interval and a two-sided sign-flip permutation
p-value (exact up to 16 eval examples, else 20,000 random flips), numpy only, so a worker image
without scipy runs it too.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, Literal

import numpy as np

from gpu_core.counterfactual import retrain_and_evaluate, retraining_job
from gpu_core.curation_schemas import CurationRequest, CurationResult, PairedDifference, SelectionRun
from gpu_core.runtime import LoadedModel, load_model
from gpu_core.schemas import EvalRun, ExperimentResult, ExperimentSpec
from gpu_core.training import TrainingStep

PERMUTATIONS = 20_000


def paired_difference(differences: np.ndarray, seed: int = 0) -> PairedDifference:
    """Mean of ``differences`` with a 95% bootstrap interval and a two-sided sign-flip p-value."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    rng = np.random.default_rng(seed)
    mean = float(d.mean())
    boot = d[rng.integers(0, n, size=(10_000, n))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    if n <= 16:
        signs = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1) * 2 - 1
    else:
        signs = rng.choice(np.array([-1, 1]), size=(PERMUTATIONS, n))
    flipped = np.abs((signs * d).mean(axis=1))
    p = float(
        (np.sum(flipped >= abs(mean) - 1e-12) + (0 if n <= 16 else 1)) / (len(signs) + (0 if n <= 16 else 1))
    )
    return PairedDifference(mean=mean, ci_low=float(low), ci_high=float(high), p_value=p, n_pairs=n)


def controls_for(train_ids: Sequence[str], size: int, count: int, seed: int) -> list[list[str]]:
    """``count`` random selections of ``size`` training ids (fixed by ``seed``)."""
    rng = random.Random(seed)
    return [sorted(rng.sample(list(train_ids), size), key=list(train_ids).index) for _ in range(count)]


Report = Callable[[float, str], None]


def run_curation(
    spec: ExperimentSpec,
    result: ExperimentResult | None,
    request: CurationRequest,
    report: Report | None = None,
    loaded: LoadedModel | None = None,
) -> CurationResult:
    """Retrain on the selection and its controls for each seed; see the module docstring."""
    started = time.monotonic()
    train_ids = [example.assigned_id for example in spec.training_data]
    mode: Literal["drop", "keep"] = "drop" if request.drop_ids is not None else "keep"
    selected = list(dict.fromkeys(request.drop_ids or request.keep_ids or []))
    controls = controls_for(train_ids, len(selected), request.controls, seed=min(request.seeds))
    loaded_model = loaded or load_model(spec.model_id, spec.hyperparams.quantization)
    total = request.retrainings()
    done = 0
    runs: list[SelectionRun] = []
    curated_runs: list[EvalRun] = []
    control_runs: list[list[EvalRun]] = []

    def exclude_for(ids: Sequence[str]) -> set[str]:
        return set(ids) if mode == "drop" else set(train_ids) - set(ids)

    def retrain(ids: Sequence[str], seed: int, what: str) -> EvalRun:
        nonlocal done

        def on_step(step: TrainingStep) -> None:
            if report is not None:
                report(
                    (done + step.step / step.total_steps) / total, f"retraining {done + 1}/{total}: {what}"
                )

        seeded = spec.model_copy(update={"hyperparams": spec.hyperparams.model_copy(update={"seed": seed})})
        run = retrain_and_evaluate(loaded_model, seeded, exclude_for(ids), spec.eval_data, on_step)
        done += 1
        return run

    for seed in request.seeds:
        curated = retrain(selected, seed, f"the {mode} selection, seed {seed}")
        curated_runs.append(curated)
        runs.append(_run_view("curated", seed, curated))
        seed_controls = []
        for index, ids in enumerate(controls):
            control = retrain(ids, seed, f"random control {index + 1}, seed {seed}")
            seed_controls.append(control)
            runs.append(_run_view(f"control-{index + 1}", seed, control))
        control_runs.append(seed_controls)

    exact, loss = None, None
    if controls:
        eval_ids = [example.assigned_id for example in spec.eval_data]
        exact = paired_difference(_paired(eval_ids, curated_runs, control_runs, "exact_match"))
        loss = paired_difference(_paired(eval_ids, curated_runs, control_runs, "loss"))
    original = None
    if result is not None:
        metrics = result.eval_results.finetuned.metrics
        original = SelectionRun(
            selection="original",
            seed=spec.hyperparams.seed,
            exact_match=metrics.exact_match_rate,
            mean_loss=metrics.mean_loss,
        )
    if report is not None:
        report(1.0, "done")
    rule = request.drop or request.keep
    return CurationResult(
        mode=mode,
        rule=rule.model_dump() if rule is not None else None,
        selected_ids=selected,
        control_selected_ids=controls,
        kept=len(train_ids) - len(selected) if mode == "drop" else len(selected),
        runs=runs,
        exact_match=exact,
        loss=loss,
        original=original,
        timings={"total": time.monotonic() - started},
    )


def _run_view(selection: str, seed: int, run: EvalRun) -> SelectionRun:
    return SelectionRun(
        selection=selection,
        seed=seed,
        exact_match=run.metrics.exact_match_rate,
        mean_loss=run.metrics.mean_loss,
    )


def _paired(
    eval_ids: Sequence[str], curated: Sequence[EvalRun], controls: Sequence[Sequence[EvalRun]], field: str
) -> np.ndarray:
    """Per eval example: curated minus control, averaged over seeds and controls."""

    def values(run: EvalRun) -> np.ndarray:
        by_id = {outcome.id: float(getattr(outcome, field)) for outcome in run.examples}
        return np.array([by_id[i] for i in eval_ids])

    differences = [
        values(run) - values(control)
        for run, seed_controls in zip(curated, controls, strict=True)
        for control in seed_controls
    ]
    return np.mean(differences, axis=0)


def run_curation_job(
    spec: ExperimentSpec,
    result: ExperimentResult,
    request: CurationRequest,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[dict[str, Any], None, None]:
    """:func:`run_curation` as a job: progress events (stage ``curation``), then the result."""

    return retraining_job(
        "curation",
        spec,
        request.retrainings(),
        should_stop,
        lambda report: run_curation(spec, result, request, report),
    )
