"""Follow-up attribution queries to a finished experiment: the ``query`` job kind.

A query asks the experiment's fine-tuned model a new prompt and attributes an answer to the
training set with the experiment's own influence method and settings. Per query:

1. ``output``: the fine-tuned model's greedy answer (the evaluation stage's decoding);
   ``target``: ``expected`` when given, else ``output``.
2. ``loss``: the mean per-token cross-entropy of ``target`` given the prompt (as evaluation
   reports it), over the tokens overlapping ``span`` (character offsets into ``target``) when
   one is given, else over all of the target's labelled tokens (its end-of-turn token included).
3. Query gradients of the summed loss over those same tokens, scored against every training
   example with the experiment's method: the same projection seed and dimension and the same
   Adam normaliser (TrackStar), the same checkpoints and learning-rate weights (TracIn), the
   same damping (DataInf, Kronfluence). ``helpful``/``harmful``: the ``top_k`` largest positive
   and most negative scores, by training id (the texts are the parent spec's).

:class:`QuerySession` holds what every query of one experiment shares, prepared once (on the
first answer) and kept for the next ones, so a warm query skips it:

- the base model and tokenizer, loaded once;
- the experiment's adapter, from ``adapter/`` of the parent's artifacts directory
  (``PeftModel.from_pretrained``), with ``checkpoints/`` (TracIn's per-epoch states and
  TrackStar's Adam second moments). When those files are missing the adapter is retrained with
  the experiment's seed and data, which reproduces it exactly on the same hardware (the
  pipeline and gpu_core.counterfactual train the same way);
- the training side of the scores: the stored ``gradient_index/`` (TrackStar, projected TracIn)
  when it was built from this very adapter (its fingerprint matches), else one built in the
  session's own work directory from the adapter. Exact TracIn, DataInf and Kronfluence have no
  index: exact TracIn computes every checkpoint's training gradients once and keeps them;
  DataInf keeps the training gradients with their squared norms and lambdas
  (``DataInfTrainSide``), Kronfluence its fitted, prepared EK-FAC factors with the training
  gradients (``KronfluenceTrainSide``), so a warm answer takes only the query gradients and one
  product. Each cache holds up to :data:`TRAIN_GRADIENT_CACHE_BYTES` of gradients; beyond it each
  answer recomputes the training side through the pipeline's own path (``compute_influence``).
  Either way the scores are the experiment's (tested: an eval example asked again scores as in
  the experiment, and a cached answer as the uncached path).

:meth:`QuerySession.answer` runs in the pipeline's worker thread (``run_in_worker``): progress
events (stage ``query``), then ``{"type": "result", "result": QueryResult}``. A stop
(``should_stop``, or closing the generator) takes effect within one batch (every forward pass
checks it) and leaves the session usable for the next answer. One answer runs at a time.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gpu_core.data import IGNORE_INDEX, EncodedPair, Encoder, has_offsets, token_offsets
from gpu_core.evaluation import generate, target_losses
from gpu_core.influence import AdapterCheckpoint, build_influence_result
from gpu_core.influence.gradients import (
    load_lora_state,
    lora_layers,
    lora_state,
    lora_state_restored,
    stacked_gradients,
)
from gpu_core.influence.index import INDEX_DIR_NAME, MANIFEST, GradientIndex, fingerprint
from gpu_core.influence_methods import influence_method
from gpu_core.jobs import Events, JobInputError, StopCheck
from gpu_core.pipeline import ExperimentCancelled, ProgressThrottle, experiment_encoder, run_in_worker
from gpu_core.runtime import LoadedModel, attach_lora, free_memory, load_adapter, load_model
from gpu_core.schemas import (
    ExperimentResult,
    ExperimentSpec,
    ProgressEvent,
    QueryItem,
    QueryOutcome,
    QueryRequest,
    QueryResult,
)
from gpu_core.uploads import needed_parent_artifacts, needs_stored_checkpoints

# The scheduler mints download URLs with gpu_core's base install (no torch), so the list of files
# a query reads lives in gpu_core.uploads; re-exported here.
__all__ = ["QuerySession", "needed_parent_artifacts", "run_query_job"]

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINTS_INDEX = "checkpoints.json"
# Exact TracIn, DataInf and Kronfluence keep their training gradients between answers up to this
# many bytes (beyond it each answer recomputes them, as the pipeline does).
TRAIN_GRADIENT_CACHE_BYTES = 1 << 30


class TrainSide(Protocol):
    """A method's training side kept between answers (``influence.datainf.DataInfTrainSide``,
    ``influence.ekfac.KronfluenceTrainSide``)."""

    @property
    def nbytes(self) -> int: ...

    def scores(
        self, model: Any, pad_token_id: int, queries: Sequence[EncodedPair], batch_size: int
    ) -> torch.Tensor: ...


def load_checkpoints(directory: Path) -> list[AdapterCheckpoint] | None:
    """``checkpoints/`` as the pipeline saved it (``save_artifacts``), or None when any file is
    missing."""
    from safetensors.torch import load_file

    listing = directory / CHECKPOINTS_INDEX
    if not listing.is_file():
        return None
    checkpoints = []
    for entry in json.loads(listing.read_text())["checkpoints"]:
        files = [directory / entry["file"]]
        if entry.get("second_moment_file"):
            files.append(directory / entry["second_moment_file"])
        if not all(path.is_file() for path in files):
            return None
        checkpoints.append(
            AdapterCheckpoint(
                state=load_file(str(files[0])),
                learning_rate=float(entry["learning_rate"]),
                epoch=int(entry["epoch"]),
                second_moment=load_file(str(files[1])) if len(files) > 1 else None,
            )
        )
    return checkpoints or None


def target_token_offsets(encoder: Encoder, turns: Sequence[tuple[str, str]]) -> list[tuple[int, int] | None]:
    """Character offsets into the last (assistant) turn's text of each labelled token of
    ``encoder.encode(turns, last_only=True)``, in order; None for a token outside that text (the
    end-of-turn token). A tokenizer without offsets is read token by token (``data.token_offsets``)."""
    tokenizer, target = encoder.tokenizer, turns[-1][1]
    if encoder.template == "raw":
        offsets = token_offsets(tokenizer, target)
        return [*offsets, None] if tokenizer.eos_token_id is not None else list(offsets)
    text = encoder._render(turns, False)  # the rendering Encoder._chat tokenises
    before = encoder._render(turns[:-1], True)
    through = encoder._render(turns, False)
    if has_offsets(tokenizer):
        labelled = [(begin, end) for begin, end in token_offsets(tokenizer, text) if begin >= len(before)]
    else:
        # Encoder._chat_by_segments tokenises the assistant turn's piece on its own.
        piece = text[len(before) : len(through)]
        labelled = [
            (len(before) + begin, len(before) + end) for begin, end in token_offsets(tokenizer, piece)
        ]
    start = text.find(target, len(before))
    if start < 0:
        return [None] * len(labelled)
    return [
        (begin - start, end - start) if begin >= start and end <= start + len(target) else None
        for begin, end in labelled
    ]


def span_pair(
    encoder: Encoder, prompt: str, target: str, span: tuple[int, int] | None, field: str
) -> EncodedPair:
    """The query's encoded pair, labelled on the target's tokens overlapping ``span`` (all of
    the target's labelled tokens without one)."""
    turns = [("user", prompt), ("assistant", target)]
    pair = encoder.encode(turns, last_only=True)
    if span is None:
        return pair
    start, end = span
    if end > len(target):
        raise JobInputError(f"{field}: ends at {end} but the answer has {len(target)} characters")
    offsets = iter(target_token_offsets(encoder, turns))
    labels = []
    for label in pair.labels:
        if label == IGNORE_INDEX:
            labels.append(label)
            continue
        offset = next(offsets, None)
        inside = offset is not None and offset[0] < end and offset[1] > start
        labels.append(label if inside else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):
        raise JobInputError(f"{field}: [{start}, {end}] covers no token of the answer the model scores")
    return EncodedPair(input_ids=pair.input_ids, labels=labels)


class _StopFlag:
    """What the model's forward hook checks: the running answer's cancel and stop signal."""

    def __init__(self) -> None:
        self.cancel: threading.Event | None = None
        self.should_stop: StopCheck | None = None

    def check(self) -> None:
        if self.cancel is None:
            return
        if self.cancel.is_set() or (self.should_stop is not None and self.should_stop()):
            self.cancel.set()
            raise ExperimentCancelled


class QuerySession:
    """Answers queries to one experiment; see the module docstring. ``parent_artifacts_dir``
    holds the parent's artifacts under their manifest names (None or missing files: recompute,
    retrain). ``close()`` frees the model."""

    def __init__(
        self,
        spec: ExperimentSpec,
        parent_result: ExperimentResult,
        parent_artifacts_dir: Path | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.spec = spec
        self.parent = parent_result
        self.parent_artifacts_dir = Path(parent_artifacts_dir) if parent_artifacts_dir is not None else None
        self.device = device
        self.method = spec.influence_method
        self.train_ids = [example.id or "" for example in spec.training_data]
        self._lock = threading.Lock()
        self._stop = _StopFlag()
        self._loaded: LoadedModel | None = None
        self._model: Any = None  # the peft model with the experiment's final adapter
        self._encoder: Encoder | None = None
        self._checkpoints: list[AdapterCheckpoint] = []
        self._train_pairs: list[EncodedPair] | None = None
        self._index: GradientIndex | None = None
        # Exact TracIn: per checkpoint [n_train, d] training gradients, kept between answers.
        self._train_gradients: list[torch.Tensor] | None = None
        # DataInf, Kronfluence: the training side of the scores, kept between answers.
        self._train_side: TrainSide | None = None
        self._work_dir: tempfile.TemporaryDirectory[str] | None = None
        self.source: str | None = None  # "index", "recomputed" or "retrained" once prepared

    @property
    def ready(self) -> bool:
        return self._model is not None

    def answer(self, request: QueryRequest, should_stop: StopCheck | None = None) -> Events:
        """Progress events, then ``{"type": "result", "result": QueryResult dict}``."""
        return run_in_worker(lambda handoff, cancel: self._answer(request, handoff, cancel, should_stop))

    def close(self) -> None:
        """Drops the model and the session's files; a later answer prepares again."""
        with self._lock:
            self._reset()
        free_memory()

    def resident_bytes(self) -> int:
        """Bytes of tensors the session keeps between answers (model, adapter, checkpoints, the
        cached training side: exact TracIn's gradients, DataInf's or Kronfluence's)."""
        total = 0
        if self._model is not None:
            total += sum(p.numel() * p.element_size() for p in self._model.parameters())
        for checkpoint in self._checkpoints:
            for tensors in (checkpoint.state, checkpoint.second_moment or {}):
                total += sum(t.numel() * t.element_size() for t in tensors.values())
        for gradients in self._train_gradients or []:
            total += gradients.numel() * gradients.element_size()
        if self._train_side is not None:
            total += self._train_side.nbytes
        return total

    # ---- the work, in the worker thread ------------------------------------------------------

    def _answer(
        self, request: QueryRequest, handoff: Any, cancel: threading.Event, should_stop: StopCheck | None
    ) -> QueryResult:
        started = time.monotonic()
        progress = [0.0]
        throttle = ProgressThrottle()

        def report(fraction: float, message: str) -> None:
            if cancel.is_set() or (should_stop is not None and should_stop()):
                cancel.set()
                raise ExperimentCancelled
            progress[0] = max(progress[0], min(max(fraction, 0.0), 1.0))
            if not throttle.admits("query", progress[0]):
                return
            event = ProgressEvent(
                stage="query", progress=progress[0], stage_progress=progress[0], message=message
            )
            handoff.put(("event", event.model_dump()))

        def phase(low: float, high: float, message: str) -> Callable[[float], None]:
            return lambda fraction: report(low + (high - low) * fraction, message)

        with self._lock:
            self._stop.cancel, self._stop.should_stop = cancel, should_stop
            try:
                timings: dict[str, float] = {}
                if not self.ready:
                    try:
                        self._prepare(report, phase, timings)
                    except BaseException:
                        self._reset()
                        raise
                result = self._score(request, report, phase, timings)
                result.timings["total"] = time.monotonic() - started
                return result
            finally:
                self._stop.cancel = self._stop.should_stop = None

    def _prepare(
        self,
        report: Callable[[float, str], None],
        phase: Callable[[float, float, str], Callable[[float], None]],
        timings: dict[str, float],
    ) -> None:
        spec, hp = self.spec, self.spec.hyperparams
        started = time.monotonic()
        report(0.0, f"loading {spec.model_id}")
        from transformers import set_seed

        set_seed(hp.seed)
        loaded = load_model(spec.model_id, hp.quantization, self.device)
        stop = self._stop
        # A plain function, not a bound method: kronfluence deep-copies the model, hooks included.
        loaded.model.register_forward_pre_hook(lambda _module, _args: stop.check())
        self._loaded = loaded
        self._encoder = experiment_encoder(spec, loaded.tokenizer)
        timings["loading_model"] = time.monotonic() - started

        started = time.monotonic()
        directory = self.parent_artifacts_dir
        adapter_dir = directory / ADAPTER_DIR if directory is not None else None
        checkpoints = load_checkpoints(directory / CHECKPOINTS_DIR) if directory is not None else None
        needs_checkpoints = needs_stored_checkpoints(influence_method(self.method))
        stored = adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file()
        if stored and (checkpoints or not needs_checkpoints):
            assert adapter_dir is not None
            report(0.1, "loading the experiment's adapter")
            # Prepared as the experiment's base was (k-bit preparation of a quantized base).
            self._model = load_adapter(loaded, adapter_dir)
            self._checkpoints = checkpoints or []
            self.source = "recomputed"
        else:
            self._retrain(phase(0.1, 0.5, "retraining the adapter with the experiment's seed"))
            self.source = "retrained"
        self._model.eval()
        timings["adapter"] = time.monotonic() - started

        if influence_method(self.method).builds_index(spec.influence.projection_dim):
            started = time.monotonic()
            self._index = self._stored_index()
            if self._index is not None:
                self.source = "index" if self.source == "recomputed" else self.source
            else:
                self._index = self._build_index(phase(0.5, 0.8, "building the gradient index"))
            timings["gradient_index"] = time.monotonic() - started

    def _training_pairs(self) -> list[EncodedPair]:
        """The training set encoded as the pipeline encoded it (not needed to score an index)."""
        if self._train_pairs is None:
            assert self._encoder is not None
            self._train_pairs = [self._encoder.train_pair(example) for example in self.spec.training_data]
        return self._train_pairs

    def _retrain(self, progress: Callable[[float], None]) -> None:
        from gpu_core.training import train_lora

        assert self._loaded is not None
        hp = self.spec.hyperparams
        torch.manual_seed(hp.seed)
        model = attach_lora(self._loaded, hp)
        outcome = train_lora(
            model,
            self._training_pairs(),
            hp,
            self._loaded.tokenizer.pad_token_id,
            self._loaded.device,
            lambda step: progress(step.step / step.total_steps),
            gradient_checkpointing=self._loaded.config.gradient_checkpointing,
        )
        self._model, self._checkpoints = model, outcome.checkpoints

    def _index_dim(self) -> int:
        """The index's dimensions (only asked for a method that builds one)."""
        dim = influence_method(self.method).index_dim(self.spec.influence.projection_dim)
        assert dim is not None
        return dim

    def _stored_index(self) -> GradientIndex | None:
        """The parent's index when it is whole and was built for this adapter and settings."""
        if self.parent_artifacts_dir is None:
            return None
        directory = self.parent_artifacts_dir / INDEX_DIR_NAME
        if not (directory / MANIFEST).is_file():
            return None
        try:
            index = GradientIndex.open(directory)
        except (ValueError, KeyError, json.JSONDecodeError):
            return None
        layers = lora_layers(self._model)
        expected = fingerprint(self._model, [layer.param_name for layer in layers], lora_state(layers))
        manifest = index.manifest
        fits = (
            manifest.get("method") == self.method
            and index.dim == self._index_dim()
            and manifest.get("projection", {}).get("seed") == self.spec.influence.projection_seed
            and manifest.get("fingerprint") == expected
            and all(path.is_file() for path in index.files())
            and index.ids() == self.train_ids
        )
        return index if fits else None

    def _build_index(self, progress: Callable[[float], None]) -> GradientIndex:
        from gpu_core.influence.projected import build_gradient_index, plan_checkpoints

        assert self._loaded is not None
        train_pairs = self._training_pairs()
        layers = lora_layers(self._model)
        plans = plan_checkpoints(
            influence_method(self.method), layers, self._checkpoints, self._loaded.device
        )
        batch_size = self.spec.hyperparams.batch_size
        total = -(-len(train_pairs) // batch_size) * len(plans)
        self._work_dir = tempfile.TemporaryDirectory(prefix="gpu_core-query-")
        return build_gradient_index(
            self._model,
            self._pad_token_id(),
            train_pairs,
            self.train_ids,
            plans,
            influence_method(self.method),
            self._index_dim(),
            self.spec.influence.projection_seed,
            batch_size,
            Path(self._work_dir.name) / INDEX_DIR_NAME,
            lambda done: progress(done / total),
        )

    def _pad_token_id(self) -> int:
        assert self._loaded is not None
        tokenizer = self._loaded.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _score(
        self,
        request: QueryRequest,
        report: Callable[[float, str], None],
        phase: Callable[[float, float, str], Callable[[float], None]],
        timings: dict[str, float],
    ) -> QueryResult:
        assert self._loaded is not None and self._encoder is not None
        hp = self.spec.hyperparams
        queries = request.queries
        started = time.monotonic()
        report(0.8, f"answering {len(queries)} queries")
        outputs = self._generate(queries)
        targets = [
            query.expected if query.expected is not None else output
            for query, output in zip(queries, outputs, strict=True)
        ]
        pairs = [
            span_pair(self._encoder, query.prompt, target, query.span, f"queries[{i}].span")
            for i, (query, target) in enumerate(zip(queries, targets, strict=True))
        ]
        losses: list[float] = []
        for start in range(0, len(pairs), hp.batch_size):
            losses += target_losses(
                self._model, pairs[start : start + hp.batch_size], self._pad_token_id(), self._loaded.device
            )
        timings["generation"] = time.monotonic() - started

        started = time.monotonic()
        message = f"scoring {len(self.train_ids)} training examples with {self.method}"
        scores = self._scores(pairs, phase(0.85, 1.0, message))
        matrix = scores.detach().cpu().double().numpy() if hasattr(scores, "detach") else np.asarray(scores)
        query_ids = [query.id or "" for query in queries]
        ranked = build_influence_result(self.method, matrix, self.train_ids, query_ids, request.top_k).top_k
        timings["scoring"] = time.monotonic() - started
        report(1.0, "done")
        results = [
            QueryOutcome(
                id=query_id,
                prompt=query.prompt,
                output=output,
                target=target,
                span=query.span,
                span_tokens=sum(label != IGNORE_INDEX for label in pair.labels),
                loss=loss,
                helpful=ranked[query_id].helpful,
                harmful=ranked[query_id].harmful,
            )
            for query_id, query, output, target, pair, loss in zip(
                query_ids, queries, outputs, targets, pairs, losses, strict=True
            )
        ]
        assert self.source is not None
        return QueryResult(results=results, method=self.method, source=self.source, timings=timings)  # type: ignore[arg-type]

    def _generate(self, queries: Sequence[QueryItem]) -> list[str]:
        """Greedy answers, decoded as the evaluation stage decodes them."""
        assert self._loaded is not None and self._encoder is not None
        hp = self.spec.hyperparams
        prompts = [
            self._encoder.generation_prompt([("user", query.prompt), ("assistant", "")], hp.max_new_tokens)
            for query in queries
        ]
        outputs: list[str] = []
        for start in range(0, len(prompts), hp.batch_size):
            outputs += generate(
                self._model,
                self._loaded.tokenizer,
                prompts[start : start + hp.batch_size],
                self._loaded.device,
                hp.max_new_tokens,
            )
        return outputs

    def _scores(self, pairs: Sequence[EncodedPair], progress: Callable[[float], None]) -> Any:
        """``[n_queries, n_train]`` scores, positive = helpful, by the experiment's method."""
        assert self._loaded is not None
        hp, options = self.spec.hyperparams, self.spec.influence
        pad = self._pad_token_id()
        if self._index is not None:
            from gpu_core.influence.projected import plan_checkpoints, query_rows, score_blocks

            layers = lora_layers(self._model)
            entry = influence_method(self.method)
            plans = plan_checkpoints(entry, layers, self._checkpoints, self._loaded.device)
            total = -(-len(pairs) // hp.batch_size) * len(plans)
            rows = query_rows(
                self._model,
                pad,
                pairs,
                plans,
                entry,
                self._index,
                hp.batch_size,
                lambda done: progress(0.5 * done / total),
            )
            scores = torch.empty(len(pairs), self._index.n_examples, dtype=torch.float64)
            for start, block in score_blocks(self._index, rows):
                scores[:, start : start + block.shape[1]] = block
                progress(0.5 + 0.5 * (start + block.shape[1]) / self._index.n_examples)
            return scores
        if self.method == "tracin" and self._cache_tracin_gradients(progress):
            return self._tracin_from_cache(pairs, progress)
        if self.method in ("datainf", "kronfluence") and self._cache_train_side(progress):
            assert self._train_side is not None
            scores = self._train_side.scores(self._model, pad, pairs, hp.batch_size)
            progress(1.0)
            return scores
        from gpu_core.influence import compute_influence

        with tempfile.TemporaryDirectory(prefix="gpu_core-query-") as work_dir:
            return compute_influence(
                self.method,
                self._model,
                self._loaded.tokenizer,
                self._training_pairs(),
                pairs,
                self._checkpoints,
                options,
                hp.batch_size,
                Path(work_dir),
                progress=progress,
                train_ids=self.train_ids,
            )

    def _cache_tracin_gradients(self, progress: Callable[[float], None]) -> bool:
        """Computes exact TracIn's training gradients at every checkpoint once, when they fit
        :data:`TRAIN_GRADIENT_CACHE_BYTES`; False when they do not."""
        if self._train_gradients is not None:
            return True
        layers = lora_layers(self._model)
        width = sum(layer.numel for layer in layers)
        train = self._training_pairs()
        itemsize = layers[0].module.weight.element_size()
        if len(self._checkpoints) * len(train) * width * itemsize > TRAIN_GRADIENT_CACHE_BYTES:
            return False
        hp = self.spec.hyperparams
        cached = []
        with lora_state_restored(layers):
            for index, checkpoint in enumerate(self._checkpoints):
                load_lora_state(layers, checkpoint.state)
                pad = self._pad_token_id()
                cached.append(stacked_gradients(self._model, layers, train, pad, hp.batch_size))
                progress(0.8 * (index + 1) / len(self._checkpoints))
        self._train_gradients = cached
        return True

    def _cache_train_side(self, progress: Callable[[float], None]) -> bool:
        """Computes DataInf's or Kronfluence's training side once, when its gradients fit
        :data:`TRAIN_GRADIENT_CACHE_BYTES`; False when they do not."""
        if self._train_side is not None:
            return True
        layers = lora_layers(self._model)
        train = self._training_pairs()
        itemsize = layers[0].module.weight.element_size()
        if len(train) * sum(layer.numel for layer in layers) * itemsize > TRAIN_GRADIENT_CACHE_BYTES:
            return False
        hp, damping = self.spec.hyperparams, self.spec.influence.damping

        def building(fraction: float) -> None:
            progress(0.8 * fraction)  # the last 20% is the product with the queries

        if self.method == "datainf":
            from gpu_core.influence.datainf import datainf_train_side

            self._train_side = datainf_train_side(
                self._model, self._pad_token_id(), train, damping, hp.batch_size, building
            )
        else:
            from gpu_core.influence.ekfac import kronfluence_train_side

            with tempfile.TemporaryDirectory(prefix="gpu_core-query-") as work_dir:
                self._train_side = kronfluence_train_side(
                    self._model, self._pad_token_id(), train, damping, hp.batch_size, Path(work_dir), building
                )
        return True

    def _tracin_from_cache(self, pairs: Sequence[EncodedPair], progress: Callable[[float], None]) -> Any:
        """TracInCP ``sum_c lr_c <g_c(query), g_c(train)>`` against the cached training side."""
        assert self._train_gradients is not None
        layers = lora_layers(self._model)
        scores = torch.zeros(len(pairs), self._train_gradients[0].shape[0], dtype=torch.float64)
        with lora_state_restored(layers):
            for checkpoint, train_gradients in zip(self._checkpoints, self._train_gradients, strict=True):
                load_lora_state(layers, checkpoint.state)
                query_gradients = stacked_gradients(
                    self._model, layers, pairs, self._pad_token_id(), self.spec.hyperparams.batch_size
                )
                block = (query_gradients @ train_gradients.T).to(device="cpu", dtype=torch.float64)
                scores += checkpoint.learning_rate * block
        progress(1.0)
        return scores

    def _reset(self) -> None:
        self._model = self._loaded = self._encoder = self._index = self._train_pairs = None
        self._checkpoints = []
        self._train_gradients = None
        self._train_side = None
        self.source = None
        if self._work_dir is not None:
            self._work_dir.cleanup()
            self._work_dir = None


def run_query_job(
    spec: ExperimentSpec,
    result: ExperimentResult,
    request: QueryRequest,
    parent_artifacts_dir: Path | None = None,
    should_stop: StopCheck | None = None,
) -> Events:
    """The ``query`` job: a :class:`QuerySession` used once."""
    session = QuerySession(spec, result, parent_artifacts_dir)
    try:
        yield from session.answer(request, should_stop)
    finally:
        session.close()
