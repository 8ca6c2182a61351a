"""Job kinds: what a worker runs for a job, and the one payload every worker receives.

A job is an ``experiment`` (the whole pipeline on a spec) or a later job of an experiment that
builds on its stored spec and result: ``counterfactual`` (retrain without its top-k examples),
``query`` (follow-up attribution queries to its fine-tuned model, see gpu_core.query),
``curation`` (retrain on a selection of the training set against random ones, gpu_core.curation),
``merge`` (the adapter merged into the base, written as plain transformers weights, gpu_core.merge).
Each kind is one :class:`JobKind` in :data:`JOB_KINDS`: how to read its request, how to check
that request against the parent experiment (so a bad request is refused before anything runs),
and how to run it as a generator of progress events ending in ``{"type": "result", ...}``.
Adding a kind is adding an entry here; services pass ``kind`` and the JSON through untouched.

A sharded experiment (``influence.shards``, gpu_core.sharding) is three more kinds: ``training``
(no request, no parent), ``index_shard`` (a :class:`ShardRequest`; its parent is the training
job, whose adapter and checkpoints it downloads) and ``shard_merge`` (a
:class:`ShardMergeRequest` listing every shard's result; its parent is the training job too, and
its parent artifacts are the shards' files, every shard's under its own ``shard-NNNNN/`` names, so
one directory holds them all). Their parent results are ``TrainingJobResult``s, not experiment
results (``JobKind.parent_model``).

Payload (RunPod's job input, Modal's argument, compute-local's job folder): an experiment is the
bare spec object, as before; any other kind is ``{"kind", "spec", "request", "parent_result"}``,
plus ``"parent_artifacts": [{"name", "url", "sha256", "bytes"}]`` when the worker must download
the parent's files (a query or a merge: :func:`gpu_core.uploads.needed_parent_artifacts` names
them). Workers
put them under their manifest names in one directory, ``parent_artifacts_dir`` of :func:`run_job`.

This module imports no torch: the scheduler and the providers use it to validate; only
:func:`run_job` imports the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from gpu_core.curation_schemas import CurationRequest
from gpu_core.merge_schemas import MergeRequest
from gpu_core.schemas import (
    NO_SIZE_LIMITS,
    CounterfactualRequest,
    ExperimentResult,
    ExperimentSpec,
    QueryRequest,
    SpecError,
    parse_spec,
)
from gpu_core.shard_schemas import (
    ShardMergeError,
    ShardMergeRequest,
    ShardRequest,
    TrainingJobResult,
    check_coverage,
)

EXPERIMENT = "experiment"
COUNTERFACTUAL = "counterfactual"
QUERY = "query"
CURATION = "curation"
MERGE = "merge"
TRAINING = "training"
INDEX_SHARD = "index_shard"
SHARD_MERGE = "shard_merge"
# Later kinds that read the experiment's files (workers download them) and write files of their own.
READS_PARENT_ARTIFACTS = frozenset({QUERY, MERGE, INDEX_SHARD, SHARD_MERGE})
# Of those, the kinds whose files all lie in the parent job's own folder (a shard merge reads
# every shard's files: only its download list names them all).
IN_PARENT_FOLDER = frozenset({QUERY, MERGE, INDEX_SHARD})
# The kinds whose runs write files (gpu_core.uploads.planned_job_artifact_names names them).
WRITES_ARTIFACTS = frozenset({EXPERIMENT, MERGE, TRAINING, INDEX_SHARD, SHARD_MERGE})


class JobInputError(ValueError):
    """A job's kind, request or parent does not fit; the message names the field."""


class CounterfactualError(JobInputError):
    """The counterfactual request does not fit the experiment; the message names the field."""


Events = Generator[dict[str, Any], None, None]
# A platform's stop signal (RunPod's cancel, seen by another thread); checked within a batch.
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class JobKind:
    name: str
    request_model: type[BaseModel] | None  # None: the kind takes no request (an experiment)
    # Checks the request against the parent's spec and result; raises JobInputError.
    check: Callable[[Any, ExperimentSpec, Any], None] | None
    # (spec, request, parent result, artifacts dir, stop check, parent artifacts dir) -> events
    run: Callable[[ExperimentSpec, Any, Any, Path | None, StopCheck | None, Path | None], Events]
    # What the parent's result is (a sharded experiment's jobs hang under its training job).
    parent_model: type[BaseModel] = ExperimentResult
    # False: only the scheduler creates jobs of this kind (the parts of a sharded experiment).
    submittable: bool = True

    @property
    def needs_parent(self) -> bool:
        return self.request_model is not None


def counterfactual_eval_ids(
    request: CounterfactualRequest, spec: ExperimentSpec, result: ExperimentResult
) -> list[str]:
    """The eval ids the check covers (all of the experiment's by default), checked to be its own."""
    spec_ids = [example.id or "" for example in spec.training_data]
    if spec_ids != result.influence.train_ids:
        raise CounterfactualError(
            "result: its training ids are not the spec's; pass the experiment's own spec"
        )
    known = result.influence.eval_ids
    eval_ids = list(dict.fromkeys(request.eval_ids)) if request.eval_ids else list(known)
    unknown = [eval_id for eval_id in eval_ids if eval_id not in set(known)]
    if unknown:
        raise CounterfactualError(f"eval_ids: not in this experiment: {', '.join(map(repr, unknown[:5]))}")
    return eval_ids


def has_full_scores(result: ExperimentResult) -> bool:
    return bool(getattr(result.influence, "scores", None))


def check_counterfactual(
    request: CounterfactualRequest, spec: ExperimentSpec, result: ExperimentResult
) -> None:
    counterfactual_eval_ids(request, spec, result)
    full = has_full_scores(result)
    if request.k > spec.influence.top_k and not full:
        raise CounterfactualError(
            f"k: {request.k} is more than the {spec.influence.top_k} examples per eval example "
            "the experiment kept; choose a smaller k"
        )
    if request.lds_subsets and not full:
        raise CounterfactualError(
            "lds_subsets: LDS needs the experiment's full score matrix, which this result does not hold"
        )
    if request.k >= len(spec.training_data):
        raise CounterfactualError(f"k: must be less than the {len(spec.training_data)} training examples")


def check_query(request: QueryRequest, spec: ExperimentSpec, result: ExperimentResult) -> None:
    """The parent is this spec's finished experiment with influence scores of its method."""
    spec_ids = [example.id or "" for example in spec.training_data]
    if spec_ids != result.influence.train_ids:
        raise JobInputError(
            "parent_result: its training ids are not the spec's; pass the experiment's own spec"
        )
    if result.influence.method != spec.influence_method:
        raise JobInputError(
            f"parent_result: its influence method {result.influence.method!r} is not the spec's "
            f"{spec.influence_method!r}"
        )


def check_curation(request: CurationRequest, spec: ExperimentSpec, result: ExperimentResult) -> None:
    """The ids are this experiment's and leave something to train on; raises JobInputError."""
    if not request.resolved:
        raise JobInputError("drop: the rule was not turned into ids; submit through the gateway")
    known = {example.id for example in spec.training_data}
    ids = request.drop_ids if request.drop_ids is not None else request.keep_ids or []
    field = "drop_ids" if request.drop_ids is not None else "keep_ids"
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise JobInputError(
            f"{field}: not training examples of this experiment: {', '.join(map(repr, unknown[:5]))}"
        )
    if not ids:
        raise JobInputError(f"{field}: empty selection")
    kept = len(known) - len(set(ids)) if request.drop_ids is not None else len(set(ids))
    if kept < 1:
        raise JobInputError(f"{field}: the selection leaves no training data")


def check_merge(_request: MergeRequest, spec: ExperimentSpec, result: ExperimentResult) -> None:
    """The experiment kept its adapter (an experiment run without an artifacts folder did not)."""
    if not any(entry.name.startswith("adapter/") for entry in result.artifacts):
        raise JobInputError("parent_result: the experiment stored no adapter, so there is nothing to merge")


def _run_experiment(
    spec: ExperimentSpec,
    _request: Any,
    _parent: Any,
    artifacts_dir: Path | None,
    should_stop: StopCheck | None,
    _parent_artifacts_dir: Path | None,
) -> Events:
    from gpu_core.pipeline import run_experiment

    return run_experiment(spec, artifacts_dir, should_stop)


def _run_counterfactual(
    spec: ExperimentSpec,
    request: Any,
    parent: ExperimentResult | None,
    _artifacts_dir: Path | None,
    should_stop: StopCheck | None,
    _parent_artifacts_dir: Path | None,
) -> Events:
    from gpu_core.counterfactual import run_counterfactual_job

    assert parent is not None  # checked by parse_payload
    return run_counterfactual_job(spec, parent, request, should_stop=should_stop)


def _run_query(
    spec: ExperimentSpec,
    request: Any,
    parent: ExperimentResult | None,
    _artifacts_dir: Path | None,
    should_stop: StopCheck | None,
    parent_artifacts_dir: Path | None,
) -> Events:
    from gpu_core.query import run_query_job

    assert parent is not None  # checked by parse_payload
    return run_query_job(spec, parent, request, parent_artifacts_dir, should_stop)


def _run_curation(
    spec: ExperimentSpec,
    request: Any,
    parent: ExperimentResult | None,
    _artifacts_dir: Path | None,
    should_stop: StopCheck | None,
    _parent_artifacts_dir: Path | None,
) -> Events:
    from gpu_core.curation import run_curation_job

    assert parent is not None  # checked by parse_payload
    return run_curation_job(spec, parent, request, should_stop)


def _run_merge(
    spec: ExperimentSpec,
    request: Any,
    parent: ExperimentResult | None,
    artifacts_dir: Path | None,
    should_stop: StopCheck | None,
    parent_artifacts_dir: Path | None,
) -> Events:
    from gpu_core.merge import run_merge_job

    assert parent is not None  # checked by parse_payload
    return run_merge_job(spec, parent, request, artifacts_dir, parent_artifacts_dir, should_stop)


def training_count(spec: ExperimentSpec) -> int:
    """The spec's training examples: inline, or as its stored dataset records them (a payload is
    checked before the worker reads the dataset)."""
    if not spec.training_data and spec.training_dataset is not None:
        return spec.training_dataset.count
    return len(spec.training_data)


def check_index_shard(request: ShardRequest, spec: ExperimentSpec, _parent: TrainingJobResult) -> None:
    n_train = training_count(spec)
    if request.stop > n_train:
        raise JobInputError(f"request.stop: {request.stop} is past the {n_train} training examples")


def check_shard_merge(request: ShardMergeRequest, spec: ExperimentSpec, _parent: TrainingJobResult) -> None:
    try:
        check_coverage(request.shards, training_count(spec), spec.influence_method)
    except ShardMergeError as exc:
        raise JobInputError(f"request.shards: {exc}") from None


def _needs_artifacts_dir(kind: str, directory: Path | None) -> Path:
    if directory is None:
        raise JobInputError(f"kind: a {kind} job writes artifacts; the worker gave it no directory")
    return directory


def _run_training(
    spec: ExperimentSpec,
    _request: Any,
    _parent: Any,
    artifacts_dir: Path | None,
    should_stop: StopCheck | None,
    _parent_artifacts_dir: Path | None,
) -> Events:
    from gpu_core.pipeline import run_training_job

    return run_training_job(spec, _needs_artifacts_dir(TRAINING, artifacts_dir), should_stop)


def _run_index_shard(
    spec: ExperimentSpec,
    request: Any,
    _parent: Any,
    artifacts_dir: Path | None,
    should_stop: StopCheck | None,
    parent_artifacts_dir: Path | None,
) -> Events:
    from gpu_core.sharding import run_index_shard

    if parent_artifacts_dir is None:
        raise JobInputError(
            "parent_artifacts: an index shard reads the training job's adapter and checkpoints"
        )
    directory = _needs_artifacts_dir(INDEX_SHARD, artifacts_dir)
    return run_index_shard(spec, request, parent_artifacts_dir, directory, should_stop)


def _run_shard_merge(
    spec: ExperimentSpec,
    request: Any,
    parent: Any,
    artifacts_dir: Path | None,
    _should_stop: StopCheck | None,
    parent_artifacts_dir: Path | None,
) -> Events:
    from gpu_core.pipeline import run_in_worker
    from gpu_core.sharding import merge_shards

    if parent_artifacts_dir is None:
        raise JobInputError("parent_artifacts: a merge reads the shards' score columns and index manifests")
    directory = _needs_artifacts_dir(SHARD_MERGE, artifacts_dir)
    shards = [(result, parent_artifacts_dir) for result in request.shards]
    return run_in_worker(lambda _handoff, _cancel: merge_shards(spec, parent, shards, directory))


JOB_KINDS: dict[str, JobKind] = {
    EXPERIMENT: JobKind(EXPERIMENT, None, None, _run_experiment),
    COUNTERFACTUAL: JobKind(COUNTERFACTUAL, CounterfactualRequest, check_counterfactual, _run_counterfactual),
    QUERY: JobKind(QUERY, QueryRequest, check_query, _run_query),
    CURATION: JobKind(CURATION, CurationRequest, check_curation, _run_curation),
    MERGE: JobKind(MERGE, MergeRequest, check_merge, _run_merge),
    TRAINING: JobKind(TRAINING, None, None, _run_training, submittable=False),
    INDEX_SHARD: JobKind(
        INDEX_SHARD, ShardRequest, check_index_shard, _run_index_shard, TrainingJobResult, submittable=False
    ),
    SHARD_MERGE: JobKind(
        SHARD_MERGE,
        ShardMergeRequest,
        check_shard_merge,
        _run_shard_merge,
        TrainingJobResult,
        submittable=False,
    ),
}


def job_kind(name: str) -> JobKind:
    """The kind called ``name`` ("" is an experiment)."""
    kind = JOB_KINDS.get(name or EXPERIMENT)
    if kind is None:
        raise JobInputError(f"kind: unknown job kind {name!r}; expected one of {', '.join(JOB_KINDS)}")
    return kind


def submittable_kind(name: str) -> JobKind:
    """The kind called ``name`` when a researcher may submit it (not the parts of a sharded
    experiment, which the scheduler creates); JobInputError otherwise."""
    kind = job_kind(name)
    if not kind.submittable:
        raise JobInputError(
            f"kind: {kind.name} jobs are parts of a sharded experiment; submit the experiment "
            "with influence.shards instead"
        )
    return kind


def parse_request(kind: JobKind, raw: str | bytes | dict[str, Any] | None) -> Any:
    """The kind's request model from JSON or an object; None for a kind without one."""
    if kind.request_model is None:
        return None
    try:
        if isinstance(raw, (str, bytes)):
            return kind.request_model.model_validate_json(raw or b"{}")
        return kind.request_model.model_validate(raw or {})
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(part) for part in error['loc']) or 'request'}: "
            + str(error["msg"]).removeprefix("Value error, ")
            for error in exc.errors()
        ]
        raise JobInputError("; ".join(problems)) from None


def parse_result(raw: str | bytes | dict[str, Any], model: type[BaseModel] = ExperimentResult) -> Any:
    """The parent's result as ``model`` (an experiment's result unless a kind says otherwise)."""
    try:
        if isinstance(raw, (str, bytes)):
            return model.model_validate_json(raw)
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = exc.error_count()
        what = "an experiment result" if model is ExperimentResult else f"a {model.__name__}"
        raise JobInputError(f"parent_result: not {what} ({problems} problems)") from None


@dataclass(frozen=True)
class JobInput:
    kind: JobKind
    spec: ExperimentSpec
    request: Any
    parent_result: Any  # the kind's parent_model, or None


def make_payload(
    kind: str, spec: dict[str, Any], request: dict[str, Any] | None, parent_result: dict[str, Any] | None
) -> dict[str, Any]:
    """What a worker receives for a job (see the module docstring)."""
    if job_kind(kind).name == EXPERIMENT:
        return spec
    return {"kind": kind, "spec": spec, "request": request or {}, "parent_result": parent_result}


def parse_payload(payload: dict[str, Any]) -> JobInput:
    """A worker's payload, validated; raises :class:`SpecError` (the spec) or JobInputError."""
    if "kind" not in payload:
        return JobInput(job_kind(EXPERIMENT), parse_spec(payload, NO_SIZE_LIMITS), None, None)
    kind = job_kind(str(payload.get("kind")))
    spec = parse_spec(payload.get("spec") or {}, NO_SIZE_LIMITS)
    request = parse_request(kind, payload.get("request"))
    parent = None
    if kind.needs_parent:
        if not payload.get("parent_result"):
            raise JobInputError(f"parent_result: a {kind.name} job needs its experiment's result")
        parent = parse_result(payload["parent_result"], kind.parent_model)
        if kind.check is not None:
            kind.check(request, spec, parent)
    return JobInput(kind, spec, request, parent)


def run_job(
    job: JobInput,
    artifacts_dir: Path | None = None,
    should_stop: StopCheck | None = None,
    parent_artifacts_dir: Path | None = None,
) -> Events:
    """The job's events, ending in its result event (what every worker iterates). Once
    ``should_stop()`` is true the work stops within a batch and ``ExperimentCancelled`` is raised.
    ``parent_artifacts_dir``: the parent's artifacts under their manifest names (a query reads
    its adapter, checkpoints and gradient index there; missing files are recomputed)."""
    return job.kind.run(
        job.spec, job.request, job.parent_result, artifacts_dir, should_stop, parent_artifacts_dir
    )


__all__ = [
    "COUNTERFACTUAL",
    "CURATION",
    "EXPERIMENT",
    "INDEX_SHARD",
    "SHARD_MERGE",
    "TRAINING",
    "JOB_KINDS",
    "MERGE",
    "QUERY",
    "IN_PARENT_FOLDER",
    "READS_PARENT_ARTIFACTS",
    "WRITES_ARTIFACTS",
    "CounterfactualError",
    "JobInput",
    "JobInputError",
    "JobKind",
    "SpecError",
    "check_counterfactual",
    "check_curation",
    "check_merge",
    "check_query",
    "job_kind",
    "make_payload",
    "parse_payload",
    "parse_request",
    "parse_result",
    "run_job",
    "submittable_kind",
]
