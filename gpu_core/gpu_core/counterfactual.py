"""Counterfactual checks of an experiment's influence scores: retrain without training examples
and see what the eval answers do.

One function, :func:`retrain_and_evaluate`, fine-tunes a fresh LoRA adapter on a subset of the
training set with the experiment's own hyperparameters and seed, evaluates it, and removes the
adapter again, so one loaded base model serves every retraining. Two checks use it:

- **Top-k removal** (kronfluence's ``run_counterfactual.py``, dattri's brittleness): retrain
  without the ``k`` examples ranked most helpful (or harmful) for the selected eval examples, and
  ``controls`` times without as many random examples. The removal set is the **union** of each
  selected eval example's top-k: the check then costs ``1 + controls`` retrainings however many
  eval examples are checked (one set per eval example would cost ``n_eval x (1 + controls)``), and
  each eval example is judged against controls that removed as many examples as the union did.
- **LDS** (TRAK's linear datamodeling score): retrain on ``m`` random subsets; per eval example,
  the Spearman correlation between the summed scores of each subset's examples and minus its
  loss (positive = helpful, so more helpful examples kept should mean a lower loss).

Same seed and same data as the experiment reproduce its fine-tuned model exactly on the same
hardware (training seeds torch before attaching LoRA, as the pipeline does).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from gpu_core.evaluation import evaluate
from gpu_core.jobs import CounterfactualError, counterfactual_eval_ids
from gpu_core.pipeline import (
    ExperimentCancelled,
    ProgressThrottle,
    expected_memory_gb,
    experiment_encoder,
    run_in_worker,
)
from gpu_core.runtime import LoadedModel, attach_lora, load_model, stage_memory
from gpu_core.schemas import (
    CounterfactualOutcome,
    CounterfactualRequest,
    CounterfactualResult,
    EvalExample,
    EvalRun,
    ExperimentResult,
    ExperimentSpec,
    LdsReport,
    ProgressEvent,
    Stage,
)
from gpu_core.training import TrainingStep, train_lora

# (stage fraction in 0..1, message); the caller may raise from it to cancel.
Report = Callable[[float, str], None]


def retrain_and_evaluate(
    loaded: LoadedModel,
    spec: ExperimentSpec,
    exclude: set[str],
    eval_examples: Sequence[EvalExample],
    on_step: Callable[[TrainingStep], None] | None = None,
) -> EvalRun:
    """Fine-tune a fresh adapter on ``spec.training_data`` minus ``exclude`` and evaluate it on
    ``eval_examples``; ``loaded.model`` is the bare base model again afterwards."""
    hp = spec.hyperparams
    kept = [example for example in spec.training_data if example.id not in exclude]
    if not kept:
        raise CounterfactualError("k: removing these examples leaves no training data")
    encoder = experiment_encoder(spec, loaded.tokenizer)
    torch.manual_seed(hp.seed)
    model = attach_lora(loaded, hp)
    try:
        pairs = [encoder.train_pair(example) for example in kept]
        with stage_memory("counterfactual retraining", loaded.device, lambda: expected_memory_gb(spec)):
            train_lora(
                model,
                pairs,
                hp,
                loaded.tokenizer.pad_token_id,
                loaded.device,
                on_step,
                gradient_checkpointing=loaded.config.gradient_checkpointing,
            )
            return evaluate(model, encoder, eval_examples, loaded.device, hp.max_new_tokens, hp.batch_size)
    finally:
        # peft injected the LoRA layers into the base model in place: take them out again.
        loaded.model = model.unload()


def removal_set(
    request: CounterfactualRequest,
    spec: ExperimentSpec,
    result: ExperimentResult,
    eval_ids: Sequence[str],
    scores: np.ndarray | None,
) -> list[str]:
    """The union over ``eval_ids`` of each one's ``k`` most helpful (or harmful) training ids, in
    first-seen order. Only strictly positive (helpful) or negative (harmful) scores count."""
    influence = result.influence
    removed: dict[str, None] = {}
    if scores is None:
        if request.k > spec.influence.top_k:
            raise CounterfactualError(
                f"k: {request.k} is more than the {spec.influence.top_k} examples per eval example "
                "the experiment kept; pass its score matrix (scores.npy) or choose a smaller k"
            )
        for eval_id in eval_ids:
            top = influence.top_k[eval_id]
            ranked = top.helpful if request.remove == "helpful" else top.harmful
            removed.update((scored.id, None) for scored in ranked[: request.k])
        return list(removed)
    row_of = {eval_id: row for row, eval_id in enumerate(influence.eval_ids)}
    sign = 1.0 if request.remove == "helpful" else -1.0
    for eval_id in eval_ids:
        row = sign * np.asarray(scores[row_of[eval_id]], dtype=np.float64)
        order = np.argsort(-row, kind="stable")[: request.k]
        removed.update((influence.train_ids[j], None) for j in order if row[j] > 0)
    return list(removed)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties; 0 when either side is constant."""

    def ranks(values: np.ndarray) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values), dtype=np.float64)
        ranked[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def run_counterfactual(
    spec: ExperimentSpec,
    result: ExperimentResult,
    request: CounterfactualRequest,
    scores: np.ndarray | None = None,
    report: Report | None = None,
    loaded: LoadedModel | None = None,
) -> CounterfactualResult:
    """The top-k removal check (and LDS when ``request.lds_subsets`` > 0) for ``spec``'s
    experiment, whose result is ``result``. ``scores``: its full [n_eval, n_train] matrix
    (scores.npy), needed for LDS and for ``k`` beyond the result's stored top-k."""
    from transformers import set_seed

    started = time.monotonic()
    scores = _full_scores(result, scores)
    eval_ids = counterfactual_eval_ids(request, spec, result)
    if request.lds_subsets and scores is None:
        raise CounterfactualError("lds_subsets: LDS needs the experiment's full score matrix (scores.npy)")
    removed = removal_set(request, spec, result, eval_ids, scores)
    if not removed:
        raise CounterfactualError(
            f"remove: no training example has a {request.remove} score for these eval examples"
        )
    train_ids = [example.id or "" for example in spec.training_data]
    candidates = [train_id for train_id in train_ids if train_id not in set(removed)]
    rng = random.Random(request.seed)
    controls = [rng.sample(candidates, min(len(removed), len(candidates))) for _ in range(request.controls)]
    subset_size = max(1, round(request.lds_fraction * len(train_ids)))
    subsets = [rng.sample(range(len(train_ids)), subset_size) for _ in range(request.lds_subsets)]

    selected = {eval_id: None for eval_id in eval_ids}
    eval_examples = [example for example in spec.eval_data if example.id in selected]
    total = request.retrainings()
    done = 0

    def progress(what: str) -> Callable[[TrainingStep], None]:
        def on_step(step: TrainingStep) -> None:
            if report is not None:
                report((done + step.step / step.total_steps) / total, f"retraining {done + 1}/{total} {what}")

        return on_step

    def retrain(exclude: set[str], what: str) -> EvalRun:
        nonlocal done
        run = retrain_and_evaluate(loaded_model, spec, exclude, eval_examples, progress(what))
        done += 1
        return run

    set_seed(spec.hyperparams.seed)
    loaded_model = loaded or load_model(spec.model_id, spec.hyperparams.quantization)
    timings: dict[str, float] = {"loading_model": time.monotonic() - started}
    phase = time.monotonic()
    without_top = retrain(set(removed), f"without the top {request.k} {request.remove}")
    without_random = [retrain(set(ids), f"without {len(ids)} random examples") for ids in controls]
    timings["top_k_and_controls"] = time.monotonic() - phase

    lds = None
    if subsets and scores is not None:
        phase = time.monotonic()
        subset_losses = []
        for subset in subsets:
            keep = set(subset)
            exclude = {train_ids[j] for j in range(len(train_ids)) if j not in keep}
            run = retrain(exclude, f"on a random {request.lds_fraction:.0%} subset")
            subset_losses.append({outcome.id: outcome.loss for outcome in run.examples})
        lds = _lds(result, scores, eval_ids, subsets, subset_losses, request.lds_fraction)
        timings["lds"] = time.monotonic() - phase

    examples = _outcomes(request, result, eval_ids, without_top, without_random)
    judged = [outcome.beats_controls for outcome in examples if outcome.beats_controls is not None]
    timings["total"] = time.monotonic() - started
    if report is not None:
        report(1.0, "done")
    return CounterfactualResult(
        method=result.influence.method,
        remove=request.remove,
        k=request.k,
        removed_ids=removed,
        control_removed_ids=controls,
        examples=examples,
        beats_controls_rate=sum(judged) / len(judged) if judged else None,
        lds=lds,
        timings=timings,
    )


def run_counterfactual_job(
    spec: ExperimentSpec,
    result: ExperimentResult,
    request: CounterfactualRequest,
    scores: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[dict[str, Any], None, None]:
    """:func:`run_counterfactual` as a job: progress events (stage ``counterfactual``), then
    ``{"type": "result", "result": CounterfactualResult}``, with the pipeline's worker thread and
    cancellation (closing the generator stops the work at the next training step)."""

    return retraining_job(
        "counterfactual",
        spec,
        request.retrainings(),
        should_stop,
        lambda report: run_counterfactual(spec, result, request, scores, report),
    )


def retraining_job(
    stage: Stage,
    spec: ExperimentSpec,
    retrainings: int,
    should_stop: Callable[[], bool] | None,
    run: Callable[[Report], BaseModel],
    opening: str | None = None,
) -> Generator[dict[str, Any], None, None]:
    """A later job that retrains ``spec`` ``retrainings`` times: ``run(report)`` in the pipeline's
    worker thread, its reports as throttled progress events of ``stage``, then the result; a
    cancel (or ``should_stop``) stops it at the next report. ``opening``: the first event's
    message (by default, the retrainings to run)."""

    def work(handoff: Any, cancel: Any) -> BaseModel:
        throttle = ProgressThrottle()

        def report(fraction: float, message: str) -> None:
            if cancel.is_set() or (should_stop is not None and should_stop()):
                cancel.set()
                raise ExperimentCancelled
            fraction = min(max(fraction, 0.0), 1.0)
            if not throttle.admits(stage, fraction):
                return
            event = ProgressEvent(stage=stage, progress=fraction, stage_progress=fraction, message=message)
            handoff.put(("event", event.model_dump()))

        report(0.0, opening or f"loading {spec.model_id}; {retrainings} retrainings to run")
        return run(report)

    return run_in_worker(work)


def _full_scores(result: ExperimentResult, scores: np.ndarray | None) -> np.ndarray | None:
    influence = result.influence
    inline = getattr(influence, "scores", None)
    if scores is None and inline:
        scores = np.asarray(inline, dtype=np.float32)
    if scores is not None and tuple(scores.shape) != (len(influence.eval_ids), len(influence.train_ids)):
        raise CounterfactualError(
            f"scores: shape {tuple(scores.shape)} does not match the experiment's "
            f"(n_eval, n_train) = {(len(influence.eval_ids), len(influence.train_ids))}"
        )
    return scores


def _outcomes(
    request: CounterfactualRequest,
    result: ExperimentResult,
    eval_ids: Sequence[str],
    without_top: EvalRun,
    without_random: Sequence[EvalRun],
) -> list[CounterfactualOutcome]:
    original = {outcome.id: outcome for outcome in result.eval_results.finetuned.examples}
    top = {outcome.id: outcome for outcome in without_top.examples}
    controls = [{outcome.id: outcome for outcome in run.examples} for run in without_random]
    outcomes = []
    for eval_id in eval_ids:
        before = original[eval_id]
        change = top[eval_id].loss - before.loss
        random_changes = [control[eval_id].loss - before.loss for control in controls]
        beats: bool | None = None
        if random_changes:
            beats = (
                change > max(random_changes) if request.remove == "helpful" else change < min(random_changes)
            )
        outcomes.append(
            CounterfactualOutcome(
                id=eval_id,
                original_loss=before.loss,
                without_top_k_loss=top[eval_id].loss,
                without_random_k_losses=[control[eval_id].loss for control in controls],
                original_output=before.output,
                without_top_k_output=top[eval_id].output,
                top_k_loss_change=change,
                random_loss_changes=random_changes,
                beats_controls=beats,
            )
        )
    return outcomes


def _lds(
    result: ExperimentResult,
    scores: np.ndarray,
    eval_ids: Sequence[str],
    subsets: Sequence[Sequence[int]],
    subset_losses: Sequence[dict[str, float]],
    fraction: float,
) -> LdsReport:
    row_of = {eval_id: row for row, eval_id in enumerate(result.influence.eval_ids)}
    masks = np.zeros((len(subsets), scores.shape[1]), dtype=np.float64)
    for j, subset in enumerate(subsets):
        masks[j, list(subset)] = 1.0
    per_eval: dict[str, float] = {}
    for eval_id in eval_ids:
        predicted = masks @ np.asarray(scores[row_of[eval_id]], dtype=np.float64)
        losses = np.array([losses[eval_id] for losses in subset_losses])
        per_eval[eval_id] = spearman(predicted, -losses)
    return LdsReport(
        subsets=len(subsets),
        fraction=fraction,
        per_eval=per_eval,
        mean=float(np.mean(list(per_eval.values()))) if per_eval else 0.0,
    )


def load_scores(path: Any) -> np.ndarray:
    """scores.npy as written by the pipeline, memory-mapped (it can be n_eval x n_train large)."""
    return np.load(path, mmap_mode="r")
