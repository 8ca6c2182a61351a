"""The JSON shapes of the Influence Dashboard REST API.

This module is the single definition: the gateway declares these as its response models (so
/openapi.json describes every answer) and the client parses answers with them. It imports only
pydantic, so the gateway pulls in nothing of the client and the client nothing of the gateway.

Every model accepts fields it does not know (``extra="allow"``): a newer gateway may add fields
without breaking an older client, and the gateway never drops a field a view adds.

The experiment spec and result are gpu_core's contract (``gpu_core.schemas``); the client sends
and returns them as plain JSON objects rather than keeping a second copy of that schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- errors -------------------------------------------------------------------------------


class FieldProblem(ApiModel):
    field: str = Field(description="Where the problem is, e.g. training_data[3].completion")
    message: str = Field(description="What is wrong with it")


class ErrorResponse(ApiModel):
    """Every 4xx and 5xx answer. ``detail`` is a sentence naming what failed, or, for an
    invalid body or spec (422), one ``{field, message}`` per problem."""

    detail: str | list[FieldProblem]


# ---- system and auth ----------------------------------------------------------------------


class Health(ApiModel):
    status: str = Field(description='"ok"')


class Readiness(ApiModel):
    status: str = Field(description='"ready" or "not ready"')
    not_ready: list[str] = Field(description="Dependencies that are not serving")
    detail: str | None = None


class AccessToken(ApiModel):
    access_token: str
    token_type: str = Field(description='"bearer"')
    expires_in: int = Field(description="Seconds until the token expires")


# ---- jobs ---------------------------------------------------------------------------------


class ActualCost(ApiModel):
    """What a finished job really cost: the GPU-seconds its provider measured (RunPod's
    executionTime, the Modal function's wall time, compute-local's host time), the price-table GPU
    it ran on, and that GPU's rate."""

    gpu_seconds: float
    delay_seconds: float = Field(description="Wait before it ran (RunPod delayTime: queue, cold start)")
    gpu: str
    device: str | None = Field(description="The device the worker reported, e.g. NVIDIA L4")
    usd_per_second: float
    cost_usd: float
    source: str = Field(description="How the seconds were measured and which price table priced them")


class JobPart(ApiModel):
    """One part of a sharded experiment: its training job, an index shard, or the merge."""

    kind: str = Field(description="training, index_shard or shard_merge")
    shard: int | None = Field(description="The index shard's number (0-based); null for the others")
    job_id: str | None = Field(description="The part's current attempt; null before it is created")
    status: str = Field(description="pending, queued, submitted, running, completed, failed or cancelled")
    progress: float = Field(description="The part's own progress, 0..1")
    attempts: int = Field(description="Jobs run for this part (a failed shard runs again alone)")
    error: str | None


class Job(ApiModel):
    job_id: str
    status: str = Field(description="queued, submitted, running, completed, failed or cancelled")
    stage: str | None = Field(description="The pipeline stage running now, e.g. training")
    progress: float = Field(description="Overall progress, 0..1")
    stage_message: str
    metrics: dict[str, Any] = Field(
        description="The last progress event's figures: epoch, total_epochs, step, loss, eta_s, ..."
    )
    error: str | None
    backend: str
    provider: str
    model_id: str
    influence_method: str
    n_train: int
    n_eval: int
    estimated_time_s: float
    estimated_cost_usd: float
    estimated_gpu: str | None = Field(default=None, description="The GPU the estimate priced")
    estimated_usd_per_second: float = 0.0
    max_cost_usd: float | None = Field(default=None, description="Your spend cap for the job; null = none")
    actual: ActualCost | None = Field(
        default=None, description="The real cost once the job has ended; null before, or when unmeasured"
    )
    last_event_seq: int
    created_at: str | None = Field(description="ISO 8601, UTC")
    updated_at: str | None = Field(description="ISO 8601, UTC")
    finished_at: str | None = Field(description="ISO 8601, UTC")
    name: str | None = Field(default=None, description="The experiment's name (spec.name)")
    tags: list[str] = Field(default_factory=list, description="The experiment's tags (spec.tags)")
    note: str | None = Field(default=None, description="The experiment's note (spec.note)")
    started_at: str | None = Field(default=None, description="When it started running; ISO 8601, UTC")
    run_time_s: float | None = Field(default=None, description="Seconds from running to finished")
    outcome: dict[str, Any] = Field(
        default_factory=dict,
        description="A completed experiment's evaluations: {base, few_shot, finetuned}, each "
        "{exact_match_rate, mean_loss, n}; empty before",
    )
    tracking: dict[str, Any] = Field(
        default_factory=dict,
        description="An experiment's export to MLflow / W&B: {status: none|pending|exporting|exported|"
        "failed, trackers: {mlflow|wandb: {status, run_id, url, error, source}}}",
    )
    shards: int = Field(
        default=1, description="Index shards of a sharded experiment (influence.shards); 1 otherwise"
    )
    parts: list[JobPart] = Field(
        default_factory=list,
        description="A sharded experiment's parts (training job, each shard, merge) as they stand; "
        "[] otherwise",
    )


class Comparison(ApiModel):
    """``GET /api/compare``: 2 to 4 experiments, every list in the order of ``ids``."""

    ids: list[str]
    runs: list[Job]
    config_diff: dict[str, list[Any]] = Field(
        description="Each spec field (dotted path) whose value differs, with its value per run; "
        "a data list shows as its size and a digest"
    )
    metrics: dict[str, list[dict[str, Any] | None]] = Field(
        description="base, few_shot, finetuned: {exact_match_rate, mean_loss, n} per run (null: no result)"
    )
    loss_curves: list[list[dict[str, Any]]] = Field(description="{step, loss} points per run")
    examples: list[dict[str, Any]] = Field(
        description="Per eval example: id, prompt, expected and answers (per run: base, few_shot, "
        "finetuned, each {output, exact_match, loss}; null where the run has no result)"
    )
    influence_agreement: dict[str, Any] = Field(
        description="available, reason, and per pair of runs: top_k_overlap per eval example, "
        "mean_top_k_overlap and net_influence_spearman"
    )


class SubmittedJob(ApiModel):
    job_id: str
    status: str
    estimated_time_s: float
    estimated_cost_usd: float


class JobList(ApiModel):
    jobs: list[Job] = Field(description="Newest first")


class JobEvent(ApiModel):
    """The ``data`` of one Server-Sent Event of /api/jobs/{id}/events (its ``id`` is ``seq``).
    Progress events carry the pipeline's figures (epoch, total_epochs, step, loss, eta_s, ...);
    the last event of a job is ``{"type": "status", "state": "completed" | "failed" | ...}``."""

    type: str = Field(description='"progress", "status", ...')
    seq: int
    stage: str | None = None
    progress: float | None = None
    message: str | None = None
    state: str | None = Field(default=None, description="On status events: the job's new status")
    time: str | None = None


class StreamEnd(ApiModel):
    """The ``data`` of the final ``event: end`` of the event stream."""

    job_id: str
    status: str | None
    error: str | None = None


class BackendEstimate(ApiModel):
    backend: str
    provider: str
    gpu: str
    gpu_memory_gb: float
    required_memory_gb: float
    estimated_time_s: float
    usd_per_second: float
    estimated_cost_usd: float
    gpu_seconds: float = Field(default=0.0, description="GPU time billed over every job of the experiment")
    shards: int = Field(default=1, description="Index-shard jobs (influence.shards resolved)")
    parallel_jobs: int = Field(
        default=1, description="Jobs the backend runs at once (how many shards run side by side)"
    )
    prices_as_of: str
    price_source: str
    notes: list[str]


class DataReport(ApiModel):
    """The data check of an estimate (gpu_core.datareport): formats, template, token lengths with
    the model's tokenizer and truncation at max_seq_len, duplicates, eval copies of training."""

    training_format: str | None
    eval_format: str | None
    template: str
    tokens: dict[str, Any] = Field(
        description="available; then template, preview, max_seq_len and per-list lengths "
        "(n, min, median, p95, max, mean, truncated, truncated_examples), else reason"
    )
    duplicates: dict[str, list[list[str]]] = Field(description="Ids of identical examples, per list")
    eval_copies_training: list[dict[str, str]] = Field(description="{eval_id, training_id} pairs")
    eval_copies_count: int
    notes: list[str] = Field(description="The findings, one sentence each")


class EstimateAnswer(ApiModel):
    active_backend: str = Field(description="The caller's backend; its estimate comes first")
    estimates: list[BackendEstimate]
    notes: list[str]
    data_report: DataReport


class ParsedDataFile(ApiModel):
    """A training or eval file read by gpu_core's parser (POST /api/data/parse)."""

    format: str = Field(description="prompt_completion, messages or alpaca")
    format_label: str
    count: int
    examples: list[dict[str, Any]] = Field(description="As the spec's training_data / eval_data want them")


class Artifact(ApiModel):
    name: str = Field(description="POSIX path under the job's artifacts, e.g. adapter/adapter_config.json")
    bytes: int
    sha256: str
    media_type: str


class ArtifactList(ApiModel):
    artifacts: list[Artifact]


class JobDeleted(ApiModel):
    id: str
    deleted: bool
    deleted_artifacts: int = Field(description="Files removed from the artifact store")


# ---- counterfactual checks ----------------------------------------------------------------


class CounterfactualEstimate(ApiModel):
    backend: str = Field(description="The experiment's backend, where the check runs")
    retrainings: int = Field(description="1 + controls + lds_subsets fine-tunings")
    estimates: list[BackendEstimate]
    notes: list[str]


class CounterfactualSubmitted(ApiModel):
    counterfactual_job_id: str
    status: str
    estimated_time_s: float
    estimated_cost_usd: float


class CounterfactualCheck(Job):
    """A check's job status, its request (gpu_core CounterfactualRequest) and, once it
    completed, its result (only on GET .../counterfactual/{id})."""

    counterfactual_job_id: str
    parent_job_id: str
    request: dict[str, Any] | None
    result: dict[str, Any] | None = None


class CounterfactualList(ApiModel):
    counterfactual_jobs: list[CounterfactualCheck] = Field(description="Newest first")


# ---- merged weights ------------------------------------------------------------------------


class MergeEstimate(ApiModel):
    backend: str = Field(description="The experiment's backend, where the merge runs")
    estimates: list[BackendEstimate]
    notes: list[str]


class MergeSubmitted(ApiModel):
    merge_job_id: str
    status: str
    estimated_time_s: float
    estimated_cost_usd: float


class MergeCheck(ApiModel):
    """The merged files loaded back with ``from_pretrained`` and scored on the eval examples."""

    eval_ids: list[str]
    finetuned_losses: list[float] = Field(description="Each eval example's loss in the experiment")
    merged_losses: list[float] = Field(description="The same examples' losses under the merged model")
    max_relative_difference: float
    tolerance: float | None = Field(description="None: no match expected (a quantized experiment)")
    passed: bool | None


class MergeResultView(ApiModel):
    """gpu_core MergeResult: the ``merged/`` folder's files are the job's artifacts."""

    base_model: str
    dtype: str = Field(description="The merged weights' dtype: the base checkpoint's own")
    experiment_quantization: str
    merged_on: str = Field(description="Where the merge ran: a GPU when the 16-bit base fits, else cpu")
    parameters: int
    weight_bytes: int
    shards: int
    files: list[str] = Field(description="The files under merged/ (artifact names merged/<file>)")
    check: MergeCheck
    notes: list[str]
    peak_memory_gb: dict[str, float]
    timings: dict[str, float]


class MergeJob(Job):
    """A merge's job status, its request (gpu_core MergeRequest) and, once it completed, its
    result; its files are downloaded at /api/jobs/{merge_job_id}/artifacts."""

    merge_job_id: str
    parent_job_id: str
    request: dict[str, Any] | None
    result: MergeResultView | None = None


class MergeList(ApiModel):
    merges: list[MergeJob] = Field(description="Newest first")


# ---- training data: ranking and curations ------------------------------------------------


class TrainingExampleRow(ApiModel):
    """One training example of an experiment's training summary (docs/influence.md)."""

    id: str
    net_influence: float = Field(description="Summed influence over the eval set; positive = helpful")
    self_influence: float = Field(description="The method's score of the example on itself")
    train_loss: float = Field(description="Mean loss of its answer under the fine-tuned model")
    worst_harm: float | None = Field(
        None,
        description="Its lowest score on any one eval example, in that eval example's standard "
        "deviations over the training set (negative = harms it); null in summaries from before it",
    )
    suspect_rank: int = Field(
        description="1 = most suspect (net influence, worst harm, self-influence and loss combined)"
    )
    text: str = ""


class TrainingExamples(ApiModel):
    examples: list[TrainingExampleRow]
    total: int


class Curation(Job):
    """A curation's job status, its request (gpu_core CurationRequest, rule resolved to ids)
    and, once it completed, its result (gpu_core CurationResult)."""

    curation_job_id: str
    parent_job_id: str
    request: dict[str, Any] | None
    result: dict[str, Any] | None = None


class CuratedExample(ApiModel):
    """One line of a curated training set: a training example as the spec holds it."""

    id: str
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, Any]] | None = None


class CurationEstimate(ApiModel):
    backend: str = Field(description="The experiment's backend, where the curation runs")
    retrainings: int = Field(description="len(seeds) x (1 + controls) fine-tunings")
    selected: int = Field(description="How many training examples the selection drops or keeps")
    mode: str = Field(description="drop or keep")
    estimates: list[BackendEstimate]
    notes: list[str]


class CurationList(ApiModel):
    curations: list[Curation] = Field(description="Newest first")


class CurationSubmitted(ApiModel):
    curation_job_id: str
    status: str
    estimated_time_s: float
    estimated_cost_usd: float


# ---- follow-up queries --------------------------------------------------------------------


class QuerySubmitted(ApiModel):
    query_job_id: str
    status: str
    estimated_time_s: float
    estimated_cost_usd: float


class ExampleText(ApiModel):
    """A training example as the dashboard shows it: the turns before its last answer (joined by
    " / ") and that answer."""

    prompt: str
    answer: str


class QueryExample(ApiModel):
    id: str = Field(description="The training example's id in the experiment's spec")
    score: float = Field(description="Its influence on the query's loss, by the experiment's method")
    text: ExampleText | None = Field(description="Its texts, from the experiment's spec")


class QueryAnswer(ApiModel):
    """One answered query (gpu_core QueryOutcome) with the texts of its training examples."""

    id: str
    prompt: str
    output: str = Field(description="The fine-tuned model's greedy answer")
    target: str = Field(description="The attributed text: expected, or output when none was given")
    span: list[int] | None = Field(description="[start, end) character offsets into target that counted")
    span_tokens: int
    loss: float = Field(description="Mean per-token loss of target (of its span) given the prompt")
    helpful: list[QueryExample] = Field(description="Training examples that most lowered the loss")
    harmful: list[QueryExample] = Field(description="Training examples that most raised the loss")


class QueryResults(ApiModel):
    results: list[QueryAnswer]
    method: str
    source: str = Field(description="index, recomputed or retrained: where the training side came from")
    timings: dict[str, float]


class QueryJob(Job):
    """A query job's status, its request (gpu_core QueryRequest) and, once it completed, its
    answers with the training examples' texts (only on GET .../queries/{id})."""

    query_job_id: str
    parent_job_id: str
    request: dict[str, Any] | None
    result: QueryResults | None = None


class QueryList(ApiModel):
    queries: list[QueryJob] = Field(description="Newest first")


# ---- models -------------------------------------------------------------------------------


class BackendPrice(ApiModel):
    provider: str
    gpu: str
    gpu_memory_gb: float
    usd_per_second: float
    usd_per_hour: float
    prices_as_of: str
    price_source: str


class ModelInfo(ApiModel):
    id: str
    name: str
    params_b: float
    default_quantization: str
    context_length: int
    licence: str
    note: str
    recommended_tier_gb: int
    required_memory_gb: float
    fits: bool
    prices: dict[str, BackendPrice] = Field(description='By backend: "hosted", "runpod"')
    presets: dict[str, Any] = Field(
        default_factory=dict,
        description="Hyperparams (gpu_core) this model learns with; the dashboard fills them in",
    )


class ModelList(ApiModel):
    models: list[ModelInfo]


class RunpodGpu(ApiModel):
    pool: str = Field(description='A RunPod GPU pool id, the value of the spec\'s runpod_gpu, e.g. "ADA_24"')
    description: str = Field(description="The GPUs in the pool")
    memory_gb: float
    usd_per_second: float


class RunpodGpuList(ApiModel):
    """The RunPod GPU pools that hold a model, cheapest first: what a job may be pinned to."""

    model_id: str
    quantization: str
    gpus: list[RunpodGpu]


# ---- settings -----------------------------------------------------------------------------


class ComputeSettings(ApiModel):
    backend: str = Field(description='"hosted" or "runpod"')
    hosted_provider: str
    runpod_endpoint_id: str | None
    endpoint_status: str
    endpoint_error: str | None


class RunpodKeySaved(ApiModel):
    last4: str
    backend: str
    endpoint_status: str
    balance_usd: float | None = Field(description="None when RunPod could not say the balance")
    message: str = Field(description="A note from the key check, e.g. why the balance is unknown")


class RunpodKeyStatus(ComputeSettings):
    has_key: bool
    last4: str | None
    verified_at: str | None
    updated_at: str | None
    runpod_simulated: bool = Field(description="The RunPod is the test fake (GATEWAY_RUNPOD_SIMULATED)")


class RunpodKeyDeleted(ComputeSettings):
    has_key: bool
    deleted: bool
    endpoint_deleted: bool = Field(description="The RunPod endpoint was deleted too (?delete_endpoint=true)")


class RunpodEndpointWorkers(ApiModel):
    running: int
    idle: int
    initializing: int
    throttled: int = Field(description="Waiting for a GPU RunPod does not have free (not billed)")
    unhealthy: int
    total: int


class RunpodEndpoint(ApiModel):
    """The caller's own RunPod serverless endpoint as RunPod reports it now."""

    byok_available: bool = Field(description="This server can run jobs on researchers' own RunPod keys")
    unavailable_reason: str | None = Field(description="What the operator must set, when it cannot")
    state: str = Field(
        description='"none" (no endpoint yet), "live", "gone" (deleted outside the dashboard: '
        'forgotten, the next job creates one) or "unknown" (no key stored to look with)'
    )
    endpoint_id: str | None
    name: str | None
    gpu_pools: list[str] = Field(description="The RunPod GPU pools the endpoint may run on")
    workers_max: int
    workers: RunpodEndpointWorkers | None
    execution_timeout_s: int
    console_url: str | None = Field(description="The endpoint's page in RunPod's console")


class HfTokenStatus(ApiModel):
    """The researcher's own Hugging Face token (for gated models such as Llama and Gemma): only
    whether one is stored and its last 4 characters."""

    has_token: bool
    last4: str | None
    updated_at: str | None


class HfTokenDeleted(ApiModel):
    has_token: bool
    deleted: bool


class MlflowTracking(ApiModel):
    tracking_uri: str | None
    experiment_name: str | None
    has_token: bool
    token_last4: str | None


class WandbTracking(ApiModel):
    project: str | None
    entity: str | None
    has_key: bool
    key_last4: str | None


class TrackingSettings(ApiModel):
    """Where the researcher's experiments are logged: their own MLflow and W&B (secrets shown by
    their last 4 only), and whether the operator's trackers apply where they set none."""

    mlflow: MlflowTracking
    wandb: WandbTracking
    operator_mlflow: bool = Field(description="The operator logs experiments to MLflow unless you set yours")
    operator_wandb: bool = Field(description="The operator logs experiments to W&B unless you set yours")


# ---- gateway configuration ----------------------------------------------------------------


class SpecLimitsInfo(ApiModel):
    max_train_examples: int
    max_eval_examples: int
    max_text_chars: int = Field(description="Per prompt, completion or expected answer")
    max_body_bytes: int


class InfluenceMethodInfo(ApiModel):
    value: str = Field(description="The spec's influence_method")
    label: str
    description: str


class GatewayConfig(ApiModel):
    """What a client needs to build a valid spec for this deployment."""

    auth_mode: str = Field(description='"local" (POST /api/auth/local) or "jwt"')
    limits: SpecLimitsInfo
    influence_methods: list[InfluenceMethodInfo]
    spec_schema: dict[str, Any] = Field(
        description="JSON Schema of the experiment spec (gpu_core ExperimentSpec): defaults and bounds"
    )


# ---- usage --------------------------------------------------------------------------------


class UsageLimit(ApiModel):
    name: str = Field(description="e.g. active_jobs, submissions_per_hour, gpu_seconds_per_month")
    description: str
    used: float
    limit: float | None = Field(description="null: no limit on this deployment")
    resets_at: str | None = Field(default=None, description="ISO time the window resets, if it does")


class Usage(ApiModel):
    """The caller's usage against the admission limits of their backend; a submission over one
    is a 429 with Retry-After."""

    backend: str
    limits: list[UsageLimit]
    max_job_time_s: float | None = Field(description="Per-job ceiling on the estimated time (hosted)")
    max_job_cost_usd: float | None = Field(description="Per-job ceiling on the estimated cost (hosted)")


class Dataset(ApiModel):
    """A stored training or eval file (POST /api/datasets), named in a spec by its id
    (``training_dataset_id`` / ``eval_dataset_id``) instead of inline examples."""

    dataset_id: str = Field(description='"ds_" and 32 hex digits')
    kind: str = Field(description="train or eval")
    filename: str
    format: str = Field(description="prompt_completion, messages or alpaca")
    format_label: str
    count: int = Field(description="Examples in the file, every one checked")
    bytes: int
    sha256: str
    created_at: str
    existing: bool = Field(
        default=False, description="True when this upload matched one you had stored (same bytes, same kind)"
    )


class DatasetList(ApiModel):
    datasets: list[Dataset]
