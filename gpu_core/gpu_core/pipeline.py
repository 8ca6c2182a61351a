"""One experiment as a generator of progress events ending in a result. Workers only wrap this.

``run_experiment(spec, artifacts_dir)`` yields ``ProgressEvent(...).model_dump()`` dicts for the
stages loading_model, eval_base, eval_few_shot, training, eval_finetuned, influence (``progress``
is overall and never decreases), then ``{"type": "result", "result": ExperimentResult(...)}``.

With ``artifacts_dir`` the run writes its files there: ``adapter/`` (peft), ``checkpoints/``
(TracIn's per-epoch adapters), ``scores.npy`` (the whole matrix, float32), and the result's
``artifacts`` lists every file under the directory with its size and sha256.

The work runs in one worker thread that hands events to the generator through a queue, so
progress reported from inside long calls (a training step, an influence batch) reaches the
consumer while the work goes on. Closing the generator (or any exception thrown into it, e.g.
Modal's input cancellation) sets a cancel flag; the generator then waits for the worker to stop
and free the model before it returns, and the exception propagates unchanged. ``should_stop``
(e.g. a platform's stop signal seen by another thread) stops the work the same way, and the
generator then raises :class:`ExperimentCancelled`.

The worker checks the flag and ``should_stop`` at every progress report and before every forward
pass of the model (a hook on the loaded model, so it also holds inside library code such as
kronfluence's factor fitting, and in every stage and method without each loop having to call
it): a stop takes effect within one batch.
"""

from __future__ import annotations

import json
import queue
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from gpu_core.artifacts import SCORES_NAME, collect_artifacts, write_scores
from gpu_core.data import Encoder, chat_template_sha256, few_shot_demonstrations, resolve_template
from gpu_core.environment import describe_environment
from gpu_core.evaluation import evaluate
from gpu_core.influence import AdapterCheckpoint, build_influence_result, compute_influence
from gpu_core.influence.index import INDEX_DIR_NAME
from gpu_core.influence.result import as_score_matrix
from gpu_core.influence_methods import influence_method
from gpu_core.runtime import (
    attach_lora,
    free_memory,
    load_model,
    lora_target_pattern,
    stage_memory,
)
from gpu_core.schemas import (
    STAGES,
    DataSummary,
    EvalResults,
    ExperimentResult,
    ExperimentSpec,
    ProgressEvent,
    TrainingSummary,
)
from gpu_core.shard_schemas import TrainingJobResult
from gpu_core.training import TrainingStep, train_lora
from gpu_core.training_summary import (
    FinalGradientFeatures,
    eval_gradient_sum,
    final_adapter_signals,
    summarize,
    write_summary,
)

# Share of the overall progress bar per stage (rough relative cost on the tiny model).
STAGE_WEIGHTS: dict[str, float] = {
    "loading_model": 0.05,
    "eval_base": 0.10,
    "eval_few_shot": 0.10,
    "training": 0.40,
    "eval_finetuned": 0.10,
    "influence": 0.25,
}
_STAGE_START: dict[str, float] = {
    stage: sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(stage)]) for stage in STAGES
}
WORKER_THREAD_NAME = "gpu_core-experiment"
# Progress events of one stage at most this often (its first and last always): a long run's
# events travel in a provider's capped output (RunPod's 10 MB).
PROGRESS_INTERVAL_S = 1.0


class ProgressThrottle:
    """Which progress reports become events: the first of each stage (a stage change), the
    stage's last (``stage_progress`` 1), and otherwise at most one per ``interval_s`` of
    ``clock``."""

    def __init__(
        self, interval_s: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._stage: str | None = None
        self._last = 0.0

    def admits(self, stage: str, stage_progress: float) -> bool:
        now = self.clock()
        if stage != self._stage or stage_progress >= 1.0 or now - self._last >= self.interval_s:
            self._stage, self._last = stage, now
            return True
        return False


def expected_memory_gb(spec: ExperimentSpec) -> float | None:
    """The cost model's GPU memory estimate for ``spec`` (None where the cost model is not
    installed, e.g. a worker image with gpu_core only)."""
    try:
        from cost_model.estimate import expected_memory_gb as estimate
    except ImportError:
        return None
    return estimate(spec)


class ExperimentCancelled(Exception):
    """The work stopped because it was cancelled (raised in the worker at the next check, and
    out of the generator when ``should_stop`` asked for it)."""


StopCheck = Callable[[], bool]


def run_experiment(
    spec: ExperimentSpec,
    artifacts_dir: Path | None = None,
    should_stop: StopCheck | None = None,
    throttle: ProgressThrottle | None = None,
) -> Generator[dict[str, Any], None, None]:
    """Run ``spec``; see the module docstring for the events (``throttle``: which progress
    reports become events, by default at most one a second per stage). Raises what the work
    raised, or :class:`ExperimentCancelled` once ``should_stop()`` returned True and the work
    has stopped."""
    return run_in_worker(
        lambda handoff, cancel: _Experiment(spec, artifacts_dir, handoff, cancel, should_stop, throttle).run()
    )


def run_training_job(
    spec: ExperimentSpec, artifacts_dir: Path, should_stop: StopCheck | None = None
) -> Generator[dict[str, Any], None, None]:
    """A sharded experiment's training job: the stages up to eval_finetuned as
    :func:`run_experiment` runs them, the adapter and checkpoints saved under ``artifacts_dir``,
    then ``{"type": "result", "result": TrainingJobResult}`` (the index shards score influence)."""
    return run_in_worker(
        lambda handoff, cancel: _Experiment(
            spec, artifacts_dir, handoff, cancel, should_stop, training_only=True
        ).run()
    )


# The work of one job: puts ("event", dict) progress into the queue, checks the cancel flag at
# every report (raising ExperimentCancelled), and returns the job's result.
Work = Callable[["queue.Queue[tuple[str, Any]]", threading.Event], BaseModel]


def run_in_worker(work: Work) -> Generator[dict[str, Any], None, None]:
    """Run ``work`` in the worker thread: its events, then ``{"type": "result", "result": ...}``.
    Every job kind (an experiment, a counterfactual check) runs through this."""
    handoff: queue.Queue[tuple[str, Any]] = queue.Queue()
    cancel = threading.Event()
    worker = threading.Thread(
        target=_work,
        args=(work, handoff, cancel),
        name=WORKER_THREAD_NAME,
        daemon=True,
    )
    worker.start()
    try:
        while True:
            kind, payload = handoff.get()
            if kind == "event":
                yield payload
            elif kind == "error":
                raise payload
            elif kind == "cancelled":
                raise ExperimentCancelled("the experiment was stopped before it finished")
            else:
                return
    finally:
        cancel.set()
        worker.join()


def experiment_encoder(spec: ExperimentSpec, tokenizer: Any) -> Encoder:
    """The template and encoding of ``spec``'s examples (retrainings of it use the same)."""
    conversational = any(example.is_conversation for example in (*spec.training_data, *spec.eval_data))
    template = resolve_template(spec.template, tokenizer, conversational, spec.model_id)
    return Encoder(tokenizer, template, spec.hyperparams.max_seq_len)


def run_experiment_to_result(spec: ExperimentSpec, artifacts_dir: Path | None = None) -> ExperimentResult:
    """Run to completion and return the result (progress events are dropped)."""
    for event in run_experiment(spec, artifacts_dir):
        if event["type"] == "result":
            return ExperimentResult.model_validate(event["result"])
    raise RuntimeError("the experiment ended without a result")


def _work(work: Work, handoff: queue.Queue[tuple[str, Any]], cancel: threading.Event) -> None:
    try:
        result = work(handoff, cancel)
        handoff.put(("event", {"type": "result", "result": result.model_dump()}))
        handoff.put(("done", None))
    except ExperimentCancelled:
        handoff.put(("cancelled", None))
    except BaseException as exc:  # handed to the consumer's thread and re-raised there
        # The frames hold the model; clear them so memory is freed before the consumer sees it.
        traceback.clear_frames(exc.__traceback__)
        handoff.put(("error", exc))
    finally:
        free_memory()


class _Experiment:
    def __init__(
        self,
        spec: ExperimentSpec,
        artifacts_dir: Path | None,
        handoff: queue.Queue[tuple[str, Any]],
        cancel: threading.Event,
        should_stop: StopCheck | None = None,
        throttle: ProgressThrottle | None = None,
        training_only: bool = False,
    ) -> None:
        self.spec = spec
        # A sharded experiment's training job: stops after saving the adapter and checkpoints.
        self.training_only = training_only
        self.throttle = throttle or ProgressThrottle()
        self.artifacts_dir = artifacts_dir
        self.handoff = handoff
        self.cancel = cancel
        self.should_stop = should_stop
        self.overall = 0.0
        self.timings: dict[str, float] = {}

    def check_cancelled(self) -> None:
        if self.cancel.is_set() or (self.should_stop is not None and self.should_stop()):
            self.cancel.set()
            raise ExperimentCancelled

    def report(self, stage: str, stage_progress: float, message: str = "", **fields: Any) -> None:
        self.check_cancelled()
        stage_progress = min(max(stage_progress, 0.0), 1.0)
        self.overall = max(self.overall, _STAGE_START[stage] + STAGE_WEIGHTS[stage] * stage_progress)
        if not self.throttle.admits(stage, stage_progress):
            return
        event = ProgressEvent(
            stage=stage,  # type: ignore[arg-type]
            progress=min(self.overall, 1.0),
            stage_progress=stage_progress,
            message=message,
            **fields,
        )
        self.handoff.put(("event", event.model_dump()))

    def stage_reporter(self, stage: str, message: str) -> Callable[[float], None]:
        return lambda fraction: self.report(stage, fraction, message)

    def timed(self, stage: str, started: float) -> None:
        self.timings[stage] = time.monotonic() - started

    def run(self) -> ExperimentResult | TrainingJobResult:
        from transformers import set_seed

        spec, hp = self.spec, self.spec.hyperparams
        run_started = time.monotonic()
        set_seed(hp.seed)

        started = time.monotonic()
        self.report("loading_model", 0.0, f"loading {spec.model_id}")
        loaded = load_model(spec.model_id, hp.quantization)
        model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
        # Before any paid work: the LoRA targets must name layers of the language model.
        lora_target_pattern(model, hp.target_modules)
        # Every forward pass checks for a stop (the model is this run's own, dropped at its end).
        # A plain function, not a bound method: kronfluence deep-copies the model, hooks included.
        check = self.check_cancelled
        model.register_forward_pre_hook(lambda _module, _args: check())
        self.report("loading_model", 1.0, f"loaded {spec.model_id} on {device}")
        self.timed("loading_model", started)

        encoder = experiment_encoder(spec, tokenizer)
        template = encoder.template
        data = DataSummary(
            training_format=spec.data_format.training or "prompt_completion",
            eval_format=spec.data_format.eval or "prompt_completion",
            template=template,
            chat_template_sha256=chat_template_sha256(tokenizer) if template == "chat" else None,
        )

        def run_eval(stage: str, eval_model: Any, demonstrations: Any, message: str) -> Any:
            started = time.monotonic()
            self.report(stage, 0.0, message)
            with stage_memory(stage, device, lambda: expected_memory_gb(spec)):
                outcome = evaluate(
                    eval_model,
                    encoder,
                    spec.eval_data,
                    device,
                    hp.max_new_tokens,
                    hp.batch_size,
                    demonstrations=demonstrations,
                    on_progress=self.stage_reporter(stage, message),
                )
            self.timed(stage, started)
            return outcome

        base = run_eval("eval_base", model, (), "evaluating the base model")
        demonstrations = few_shot_demonstrations(spec.training_data, spec.few_shot_k, hp.seed)
        few_shot = run_eval(
            "eval_few_shot",
            model,
            demonstrations,
            f"evaluating the base model with {spec.few_shot_k} demonstrations",
        )

        started = time.monotonic()
        self.report("training", 0.0, "attaching LoRA adapters")
        torch.manual_seed(hp.seed)
        model = attach_lora(loaded, hp)
        train_pairs = [encoder.train_pair(example) for example in spec.training_data]

        def on_step(step: TrainingStep) -> None:
            self.report(
                "training",
                step.step / step.total_steps,
                f"epoch {step.epoch}/{step.total_epochs}, step {step.step}/{step.total_steps}",
                epoch=step.epoch,
                total_epochs=step.total_epochs,
                step=step.step,
                total_steps=step.total_steps,
                loss=step.loss,
                learning_rate=step.learning_rate,
                eta_s=step.eta_s,
            )

        with stage_memory("training", device, lambda: expected_memory_gb(spec)):
            training = train_lora(
                model,
                train_pairs,
                hp,
                tokenizer.pad_token_id,
                device,
                on_step,
                gradient_checkpointing=loaded.config.gradient_checkpointing,
            )
        self.timed("training", started)

        finetuned = run_eval("eval_finetuned", model, (), "evaluating the fine-tuned model")

        if self.artifacts_dir is not None:
            save_artifacts(self.artifacts_dir, model, training.checkpoints)
        if self.training_only:
            if self.artifacts_dir is None:
                raise ValueError("a training job needs an artifacts directory for its checkpoints")
            self.timings["total"] = time.monotonic() - run_started
            return TrainingJobResult(
                eval_results=EvalResults(base=base, few_shot=few_shot, finetuned=finetuned),
                training=TrainingSummary(loss_curve=training.loss_curve),
                timings=self.timings,
                environment=describe_environment(device, loaded.dtype, hp.quantization),
                data=data,
                artifacts=collect_artifacts(self.artifacts_dir),
            )

        message = f"scoring training examples with {spec.influence_method}"
        self.report("influence", 0.0, message)
        # The same masked loss as evaluation: the expected answer given the conversation before it.
        query_pairs = [encoder.encode(example.turns, last_only=True) for example in spec.eval_data]
        # TracIn's and TrackStar's net influence in the training summary: the training gradients
        # their pass takes at the final adapter against the eval set's summed final gradient.
        started = time.monotonic()
        eval_gradients = None
        if influence_method(spec.influence_method).net_from_final_gradients:
            with stage_memory("influence", device, lambda: expected_memory_gb(spec)):
                eval_gradients = eval_gradient_sum(model, tokenizer.pad_token_id, query_pairs, hp.batch_size)
        summary_s = time.monotonic() - started
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="gpu_core-influence-") as work_dir:
            # A projected gradient index is a job artifact when there is an artifacts dir.
            index_root = self.artifacts_dir if self.artifacts_dir is not None else Path(work_dir)
            # Methods scoring from the index write scores.npy block by block as they score.
            scores_file = self.artifacts_dir / SCORES_NAME if self.artifacts_dir is not None else None
            if scores_file is not None:
                scores_file.unlink(missing_ok=True)  # so an existing file is this run's
            # TracIn and TrackStar hand the summary their final-adapter gradients as they go.
            gathered = FinalGradientFeatures(
                spec.influence_method, model, len(train_pairs), training.checkpoints, eval_gradients
            )
            # Influence passes halve their batch on their own; this names what still does not fit.
            with stage_memory("influence", device, lambda: expected_memory_gb(spec)):
                scores = compute_influence(
                    spec.influence_method,
                    model,
                    tokenizer,
                    train_pairs,
                    query_pairs,
                    training.checkpoints,
                    spec.influence,
                    hp.batch_size,
                    Path(work_dir),
                    progress=self.stage_reporter("influence", message),
                    train_ids=[example.assigned_id for example in spec.training_data],
                    index_dir=index_root / INDEX_DIR_NAME,
                    scores_file=scores_file,
                    final_tap=gathered,
                )
        train_ids = [example.assigned_id for example in spec.training_data]
        eval_ids = [example.assigned_id for example in spec.eval_data]
        matrix = as_score_matrix(scores, len(eval_ids), len(train_ids), spec.influence_method)
        del scores
        influence = build_influence_result(
            spec.influence_method, matrix, train_ids, eval_ids, spec.influence.top_k
        )
        self.timed("influence", started)

        # Self-influence and training loss per example: from the influence pass's final-adapter
        # gradients where it took them, else one more pass.
        started = time.monotonic()
        self.report("influence", 1.0 - 1e-6, "summarising the training set")
        with stage_memory("influence", device, lambda: expected_memory_gb(spec)):
            signals = final_adapter_signals(
                spec.influence_method,
                model,
                tokenizer.pad_token_id,
                train_pairs,
                training.checkpoints,
                spec.influence,
                hp.batch_size,
                gathered=gathered,
                eval_gradients=eval_gradients,
            )
        summary = summarize(
            train_ids, matrix, signals.self_influence, signals.train_loss, signals.net_influence
        )
        if self.artifacts_dir is not None:
            texts = ["\n".join(content for _, content in example.turns) for example in spec.training_data]
            write_summary(self.artifacts_dir, summary, texts)
        self.timed("training_summary", started)
        self.timings["training_summary"] += summary_s  # the eval set's gradient pass, before influence
        self.report("influence", 1.0, "done")

        artifacts = []
        if self.artifacts_dir is not None:
            started = time.monotonic()
            if not (self.artifacts_dir / SCORES_NAME).exists():
                write_scores(self.artifacts_dir, matrix)
            artifacts = collect_artifacts(self.artifacts_dir)
            self.timed("artifacts", started)
        self.timings["total"] = time.monotonic() - run_started

        return ExperimentResult(
            eval_results=EvalResults(base=base, few_shot=few_shot, finetuned=finetuned),
            influence=influence,
            training=TrainingSummary(loss_curve=training.loss_curve),
            timings=self.timings,
            environment=describe_environment(device, loaded.dtype, hp.quantization),
            data=data,
            artifacts=artifacts,
        )


def save_artifacts(directory: Path, model: Any, checkpoints: list[AdapterCheckpoint]) -> None:
    """``adapter/`` (peft ``save_pretrained``, loadable with ``PeftModel.from_pretrained``) and
    ``checkpoints/epoch-N.safetensors`` with ``checkpoints/checkpoints.json`` listing each
    file's epoch and the learning rate TracIn weights it by, and with the optimizer's second
    moments (TrackStar's), ``checkpoints/epoch-N.second-moment.safetensors``."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / "adapter")
    checkpoint_dir = directory / "checkpoints"
    checkpoint_dir.mkdir(exist_ok=True)
    index = []
    for checkpoint in checkpoints:
        name = f"epoch-{checkpoint.epoch}.safetensors"
        tensors = {key: value.detach().cpu().contiguous() for key, value in checkpoint.state.items()}
        save_file(tensors, str(checkpoint_dir / name))
        entry = {"epoch": checkpoint.epoch, "learning_rate": checkpoint.learning_rate, "file": name}
        if checkpoint.second_moment:
            moment_name = f"epoch-{checkpoint.epoch}.second-moment.safetensors"
            moments = {k: v.detach().cpu().contiguous() for k, v in checkpoint.second_moment.items()}
            save_file(moments, str(checkpoint_dir / moment_name))
            entry["second_moment_file"] = moment_name
        index.append(entry)
    (checkpoint_dir / "checkpoints.json").write_text(json.dumps({"checkpoints": index}, indent=2))
