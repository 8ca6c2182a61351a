"""The experiment spec, progress events and result: one validated, JSON-serialisable source of
truth for gpu_core, the services and the dashboard.

Limits on sizes are configurable: pass ``context={"limits": SpecLimits(...)}`` to
``ExperimentSpec.model_validate``. Every error names the field and the rule it broke.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

InfluenceMethod = Literal["tracin", "datainf", "kronfluence", "trackstar"]
Role = Literal["system", "user", "assistant"]
# The shape of the file the examples came from: alpaca rows arrive as messages.
DataFormat = Literal["prompt_completion", "messages", "alpaca"]
# auto: the model's chat template when its tokenizer has one and the data holds conversations.
Template = Literal["auto", "chat", "raw"]
ResolvedTemplate = Literal["chat", "raw"]
Quantization = Literal["none", "8bit", "4bit"]
Stage = Literal[
    "loading_model",
    "eval_base",
    "eval_few_shot",
    "training",
    "eval_finetuned",
    "influence",
    "counterfactual",  # the one stage of a counterfactual check (gpu_core.counterfactual)
    "query",  # the one stage of a follow-up query (gpu_core.query)
    "curation",  # the one stage of a curation (gpu_core.curation)
    "merge",  # the one stage of a merged-weights job (gpu_core.merge)
]
STAGES: tuple[str, ...] = (
    "loading_model",
    "eval_base",
    "eval_few_shot",
    "training",
    "eval_finetuned",
    "influence",
)
TINY_MODEL_ID = "local/tiny-llama"


class SpecLimits(BaseModel):
    """Operator-configurable limits (the gateway reads them from its settings)."""

    max_train_examples: int = 10_000
    max_eval_examples: int = 1_000
    max_text_chars: int = 20_000


DEFAULT_LIMITS = SpecLimits()
# For the services behind the gateway: the operator sets the size limits there, and a provider
# must not refuse a spec the gateway accepted under raised limits.
NO_SIZE_LIMITS = SpecLimits(max_train_examples=2**31, max_eval_examples=2**31, max_text_chars=2**31)


def _limits(info: ValidationInfo) -> SpecLimits:
    context = info.context or {}
    limits = context.get("limits") if isinstance(context, dict) else None
    return limits if isinstance(limits, SpecLimits) else DEFAULT_LIMITS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


def _check_text(value: str | None, info: ValidationInfo) -> str | None:
    limit = _limits(info).max_text_chars
    # None: an optional text left out (a chat example has no prompt).
    if value is not None and len(value) > limit:
        raise ValueError(f"text is {len(value)} characters; the limit is {limit}")
    return value


class Message(_Strict):
    """One turn of an OpenAI-style conversation."""

    role: Role
    content: str

    _check_content = field_validator("content")(_check_text)


def _check_conversation(messages: list[Message], answer_last: bool) -> None:
    """System only first, at least one non-empty assistant turn (and, for eval, one at the end)."""
    for index, message in enumerate(messages):
        if message.role == "system" and index > 0:
            raise ValueError(f"messages[{index}].role: system is allowed only as the first turn")
    assistant = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if not assistant:
        raise ValueError("messages: the conversation has no assistant turn (the answer to learn)")
    if answer_last and assistant[-1] != len(messages) - 1:
        raise ValueError(
            f"messages: the last turn is {messages[-1].role!r}; an eval conversation ends with "
            "the assistant turn that is the expected answer"
        )
    for i in assistant:
        if not messages[i].content:
            raise ValueError(f"messages[{i}].content: an assistant turn is empty")


class _Example(_Strict):
    """Either ``prompt`` + answer text or ``messages``; ``turns`` is the one view the pipeline uses."""

    id: str | None = Field(default=None, min_length=1, max_length=128)
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)

    _check_prompt = field_validator("prompt")(_check_text)
    _answer_field: ClassVar[str]

    def _answer_text(self) -> str | None:
        return getattr(self, self._answer_field)

    @property
    def assigned_id(self) -> str:
        """``id``, which ExperimentSpec gives every example that has none."""
        if self.id is None:
            raise ValueError("the example has no id: it was not validated inside an ExperimentSpec")
        return self.id

    @model_validator(mode="after")
    def _one_shape(self) -> _Example:
        answer = self._answer_text()
        if self.messages is not None:
            if self.prompt is not None or answer is not None:
                raise ValueError(f"give either messages or prompt and {self._answer_field}, not both")
            _check_conversation(self.messages, answer_last=self._answer_field == "expected")
            return self
        given = (("prompt", self.prompt), (self._answer_field, answer))
        missing = [name for name, value in given if value is None]
        if missing:
            raise ValueError(
                f"needs prompt and {self._answer_field} (or messages); {' and '.join(missing)} missing"
            )
        return self

    @model_serializer(mode="wrap")
    def _drop_other_shape(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Today's prompt/answer examples serialise as before: no "messages": null.
        shape = ("messages",) if self.messages is not None else ("prompt", self._answer_field)
        return {k: v for k, v in handler(self).items() if k in ("id", *shape)}

    @property
    def is_conversation(self) -> bool:
        return self.messages is not None

    @property
    def turns(self) -> list[tuple[str, str]]:
        """(role, content) turns; a prompt/answer pair is one user turn and one assistant turn."""
        if self.messages is not None:
            return [(m.role, m.content) for m in self.messages]
        return [("user", self.prompt or ""), ("assistant", self._answer_text() or "")]

    @property
    def text(self) -> str:
        """Every turn's text, concatenated (for size estimates)."""
        return "".join(content for _, content in self.turns)


class TrainingExample(_Example):
    completion: str | None = Field(default=None, min_length=1)

    _answer_field: ClassVar[str] = "completion"
    _check_completion = field_validator("completion")(_check_text)


class EvalExample(_Example):
    """With ``messages``, the final (assistant) turn is the expected answer."""

    expected: str | None = Field(default=None, min_length=1)

    _answer_field: ClassVar[str] = "expected"
    _check_expected = field_validator("expected")(_check_text)

    @property
    def answer(self) -> str:
        return self.turns[-1][1]


class DataFormats(_Strict):
    """The file format each list came from; filled from the examples' shape when not given."""

    training: DataFormat | None = None
    eval: DataFormat | None = None


def _list_format(examples: Sequence[_Example], given: DataFormat | None, field: str) -> DataFormat:
    first = examples[0].is_conversation
    for index, example in enumerate(examples):
        if example.is_conversation != first:
            shapes = ("prompt/answer", "messages")
            raise ValueError(
                f"{field}[{index}]: is {shapes[example.is_conversation]} but {field}[0] is "
                f"{shapes[first]}; one list holds one format"
            )
    if given is None:
        return "messages" if first else "prompt_completion"
    if (given != "prompt_completion") != first:
        raise ValueError(f"data_format: {given!r} does not match the shape of {field}")
    return given


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Hyperparams(_Strict):
    epochs: int = Field(default=3, ge=1, le=100)
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    batch_size: int = Field(default=8, ge=1, le=512)
    lora_r: int = Field(default=8, ge=1, le=256)
    lora_alpha: float = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    max_seq_len: int = Field(default=256, ge=8, le=8192)
    quantization: Quantization = "none"
    seed: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=32, ge=1, le=1024)

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, names: list[str]) -> list[str]:
        # Leaf names of linear layers (gpu_core.runtime matches them under the language model
        # only); a pattern or a comma-joined list would silently match nothing or too much.
        for name in names:
            if not _MODULE_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a module name (letters, digits and _, e.g. 'q_proj')")
        return names


# Index-shard jobs one experiment may fan out to (influence.shards).
MAX_SHARDS = 64


class InfluenceOptions(_Strict):
    top_k: int = Field(default=10, ge=1, le=1000)
    damping: float | None = Field(default=None, gt=0)
    # Per-example LoRA gradients projected to this many dimensions into an on-disk gradient
    # index (TracIn; TrackStar always projects, 4,096 when unset). None: exact TracIn.
    projection_dim: int | None = Field(default=None, ge=16, le=65_536)
    projection_seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # The gradient index built by this many jobs at once, each over a contiguous slice of the
    # training set (gpu_core.sharding); "auto" picks from the size and the backend's limits.
    shards: int | Literal["auto"] = 1

    @field_validator("shards")
    @classmethod
    def _shard_count(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_SHARDS:
            raise ValueError(f"must be between 1 and {MAX_SHARDS}, or 'auto'")
        return value


MAX_TAGS = 16
# A tag is one word a list can be filtered by: no spaces or commas (the CLI and the list's
# ?tag= take one tag; a comma separates tags where several are typed at once).
ExperimentName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
ExperimentTag = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40, pattern=r"^[^\s,]+$")
]
ExperimentNote = Annotated[str, StringConstraints(max_length=4000)]


def _distinct_tags(tags: list[str] | None) -> list[str] | None:
    """The tags in their order, each once."""
    return list(dict.fromkeys(tags)) if tags is not None else None


class ExperimentLabels(_Strict):
    """What a researcher calls an experiment: labels only, no effect on the run. Given at submit
    (the spec's ``name``, ``tags``, ``note``) and changed later with ``PATCH /api/jobs/{id}``,
    where a field left out keeps its value."""

    name: ExperimentName | None = None
    tags: list[ExperimentTag] | None = Field(default=None, max_length=MAX_TAGS)
    note: ExperimentNote | None = None

    _tags_once = field_validator("tags")(_distinct_tags)


DatasetId = Annotated[str, StringConstraints(pattern=r"^ds_[0-9a-f]{32}$")]


class StoredDataset(_Strict):
    """A stored dataset (``POST /api/datasets``) as the scheduler found it when the job was
    submitted: written into the spec there (what a researcher sends here is replaced), so the
    estimate and the artifact plan count its examples without reading it."""

    id: DatasetId
    format: DataFormat
    count: int = Field(ge=1)
    # Summed over the examples: the cost model's token estimate (cost_model.workload).
    text_chars: int = Field(ge=0)
    answer_chars: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=1)
    # The object's name in the store, whose suffix says how to read it.
    filename: str = Field(pattern=r"^data\.(jsonl|json|csv|parquet)$")


# ExperimentSpec.runpod_gpu's value for "every RunPod pool that fits, regardless of its price".
RUNPOD_ALL_FITTING = "all-fitting"


def _empty(value: Any) -> bool:
    return value is None or value == []


class ExperimentSpec(_Strict):
    # Labels (see ExperimentLabels): the pipeline ignores them.
    name: ExperimentName | None = None
    tags: list[ExperimentTag] = Field(default_factory=list, max_length=MAX_TAGS)
    note: ExperimentNote | None = None
    model_id: str = Field(default=TINY_MODEL_ID, min_length=1, max_length=256)
    # The examples inline, or a stored dataset by id (read by the worker from the artifact store:
    # gpu_core.datasets); one of the two for each list. An inline spec serialises as before (no
    # dataset keys), one naming a dataset without the empty list.
    training_data: list[TrainingExample] = Field(default_factory=list, exclude_if=_empty)
    eval_data: list[EvalExample] = Field(default_factory=list, exclude_if=_empty)
    training_dataset_id: DatasetId | None = Field(default=None, exclude_if=_empty)
    eval_dataset_id: DatasetId | None = Field(default=None, exclude_if=_empty)
    training_dataset: StoredDataset | None = Field(default=None, exclude_if=_empty)
    eval_dataset: StoredDataset | None = Field(default=None, exclude_if=_empty)
    hyperparams: Hyperparams = Field(default_factory=Hyperparams)
    few_shot_k: int = Field(default=3, ge=0, le=32)
    influence_method: InfluenceMethod = "tracin"
    influence: InfluenceOptions = Field(default_factory=InfluenceOptions)
    template: Template = "auto"
    data_format: DataFormats = Field(default_factory=DataFormats)
    # On the researcher's own RunPod endpoint only (other backends ignore it; the pipeline too):
    # the GPU pool to run on (a RunPod pool id such as "ADA_24"), or RUNPOD_ALL_FITTING for every
    # pool that fits the model whatever its price; absent, the fitting pools within the price band.
    # Whether the pool exists and fits the model is the gateway's check (cost_model.fitting_gpus).
    runpod_gpu: str | None = Field(
        default=None, pattern=rf"^({RUNPOD_ALL_FITTING}|[A-Z][A-Z0-9_]{{0,39}})$", exclude_if=_empty
    )

    _tags_once = field_validator("tags")(_distinct_tags)

    @field_validator("training_data")
    @classmethod
    def _train_size(cls, value: list[TrainingExample], info: ValidationInfo) -> list[TrainingExample]:
        limit = _limits(info).max_train_examples
        if len(value) > limit:
            raise ValueError(f"has {len(value)} examples; the limit is {limit}")
        return value

    @field_validator("eval_data")
    @classmethod
    def _eval_size(cls, value: list[EvalExample], info: ValidationInfo) -> list[EvalExample]:
        limit = _limits(info).max_eval_examples
        if len(value) > limit:
            raise ValueError(f"has {len(value)} examples; the limit is {limit}")
        return value

    @model_validator(mode="after")
    def _shards_need_an_index(self) -> ExperimentSpec:
        # Here, not at import: influence_methods imports this module.
        from gpu_core.influence_methods import influence_method

        entry = influence_method(self.influence_method)
        if self.influence.shards != 1 and not entry.builds_index(self.influence.projection_dim):
            raise ValueError(
                f"influence.shards: {self.influence_method} builds no gradient index to shard; "
                "use trackstar, or tracin with influence.projection_dim"
            )
        return self

    @model_validator(mode="after")
    def _assign_ids(self) -> ExperimentSpec:
        for field, label in (("training", "training"), ("eval", "eval")):
            inline = getattr(self, f"{field}_data")
            named = getattr(self, f"{field}_dataset_id")
            if inline and named:
                raise ValueError(f"give {field}_data or {field}_dataset_id, not both")
            if not inline and not named:
                raise ValueError(f"{field}_data: needs at least one {label} example (or {field}_dataset_id)")
            stored = getattr(self, f"{field}_dataset")
            if stored is not None and stored.id != named:
                raise ValueError(f"{field}_dataset: describes {stored.id}, not {field}_dataset_id")
        _fill_ids(self.training_data, "t", "training_data")
        _fill_ids(self.eval_data, "e", "eval_data")
        self.data_format = DataFormats(
            training=self._format_of(
                self.training_data, self.training_dataset, self.data_format.training, "training_data"
            ),
            eval=self._format_of(self.eval_data, self.eval_dataset, self.data_format.eval, "eval_data"),
        )
        return self

    @staticmethod
    def _format_of(
        examples: Sequence[_Example], stored: StoredDataset | None, given: DataFormat | None, field: str
    ) -> DataFormat | None:
        """A stored dataset's format is the one its upload detected; unknown until the scheduler
        has looked the dataset up."""
        if examples:
            return _list_format(examples, given, field)
        return stored.format if stored is not None else given

    @property
    def n_train(self) -> int:
        """Training examples, inline or in the stored dataset (0: a dataset not looked up yet)."""
        if self.training_dataset_id is not None:
            return self.training_dataset.count if self.training_dataset is not None else 0
        return len(self.training_data)

    @property
    def n_eval(self) -> int:
        if self.eval_dataset_id is not None:
            return self.eval_dataset.count if self.eval_dataset is not None else 0
        return len(self.eval_data)

    @property
    def stored_datasets(self) -> list[tuple[Literal["train", "eval"], StoredDataset]]:
        """The datasets a worker must read before it runs the spec (gpu_core.datasets)."""
        found: list[tuple[Literal["train", "eval"], StoredDataset]] = []
        if self.training_dataset is not None:
            found.append(("train", self.training_dataset))
        if self.eval_dataset is not None:
            found.append(("eval", self.eval_dataset))
        return found


def _fill_ids(examples: list[Any], prefix: str, field: str) -> None:
    """Give every example without an id a stable one (its 1-based position), unique in the list."""
    seen: dict[str, int] = {}
    for index, example in enumerate(examples):
        if example.id is not None:
            if example.id in seen:
                raise ValueError(
                    f"{field}[{index}].id: duplicate id {example.id!r} (also at {field}[{seen[example.id]}])"
                )
            seen[example.id] = index
    for index, example in enumerate(examples):
        if example.id is None:
            candidate, n = f"{prefix}{index + 1}", 1
            while candidate in seen:
                n += 1
                candidate = f"{prefix}{index + 1}-{n}"
            example.id = candidate
            seen[candidate] = index


class SpecError(ValueError):
    """An invalid experiment spec; ``problems`` name each field and the rule it broke."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid experiment spec: " + "; ".join(problems))


def parse_spec(raw: str | bytes | dict[str, Any], limits: SpecLimits = DEFAULT_LIMITS) -> ExperimentSpec:
    """Validate a spec given as JSON text or an object; raises :class:`SpecError`."""
    try:
        if isinstance(raw, (str, bytes)):
            return ExperimentSpec.model_validate_json(raw, context={"limits": limits})
        return ExperimentSpec.model_validate(raw, context={"limits": limits})
    except ValidationError as exc:
        raise SpecError(_problems(exc)) from None


def parse_labels(raw: dict[str, Any]) -> ExperimentLabels:
    """Validate changed labels (only the keys given); raises :class:`SpecError`."""
    try:
        return ExperimentLabels.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_problems(exc)) from None


def _problems(exc: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(part) for part in error['loc']) or 'spec'}: "
        + str(error["msg"]).removeprefix("Value error, ")
        for error in exc.errors()
    ]


# ---- events -------------------------------------------------------------------------------


class ProgressEvent(BaseModel):
    """Yielded while an experiment runs. ``progress`` is overall (0..1), ``stage_progress``
    within the stage; training events carry epoch/step/loss/learning_rate/eta_s."""

    type: Literal["progress"] = "progress"
    stage: Stage
    progress: float = Field(ge=0, le=1)
    stage_progress: float = Field(default=0.0, ge=0, le=1)
    message: str = ""
    epoch: int | None = None
    total_epochs: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    eta_s: float | None = None


# ---- result -------------------------------------------------------------------------------


class ExampleOutcome(BaseModel):
    id: str
    output: str
    exact_match: bool
    loss: float


class EvalMetrics(BaseModel):
    exact_match_rate: float
    mean_loss: float
    n: int


class EvalRun(BaseModel):
    metrics: EvalMetrics
    examples: list[ExampleOutcome]


class EvalResults(BaseModel):
    base: EvalRun
    few_shot: EvalRun
    finetuned: EvalRun


class ScoredExample(BaseModel):
    id: str
    score: float


class TopInfluences(BaseModel):
    helpful: list[ScoredExample]
    harmful: list[ScoredExample]


class Heatmap(BaseModel):
    """The submatrix of the (at most 50) eval rows and (at most 200) training columns with the
    largest absolute scores, rows and columns in input order: what the results page draws."""

    eval_ids: list[str]
    train_ids: list[str]
    scores: list[list[float]]


class InfluenceResult(BaseModel):
    """``scores[i][j]``: influence of training example ``train_ids[j]`` on eval example
    ``eval_ids[i]``; positive = helpful (up-weighting it lowers the eval loss).

    ``scores`` is inline only for small matrices (n_eval x n_train at most 20,000); the whole
    matrix is always the ``scores.npy`` artifact when the run had an artifacts directory."""

    method: InfluenceMethod
    train_ids: list[str]
    eval_ids: list[str]
    scores: list[list[float]] | None = None
    top_k: dict[str, TopInfluences]
    heatmap: Heatmap | None = None


class LossPoint(BaseModel):
    step: int
    epoch: float
    loss: float
    learning_rate: float


class TrainingSummary(BaseModel):
    loss_curve: list[LossPoint]


class DataSummary(BaseModel):
    """How the examples were read and rendered, so a run can be reproduced."""

    training_format: DataFormat
    eval_format: DataFormat
    template: ResolvedTemplate
    chat_template_sha256: str | None = None


class ArtifactEntry(BaseModel):
    """One file of the run: ``name`` is its POSIX path under the artifacts directory."""

    name: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    media_type: str


class ExperimentResult(BaseModel):
    eval_results: EvalResults
    influence: InfluenceResult
    training: TrainingSummary
    timings: dict[str, float]
    environment: dict[str, Any]
    # Absent in results written before formats and templates existed.
    data: DataSummary | None = None
    # Every file under the artifacts directory (empty when the run had none).
    artifacts: list[ArtifactEntry] = Field(default_factory=list)


class ResultEvent(BaseModel):
    type: Literal["result"] = "result"
    result: ExperimentResult


# ---- counterfactual check ------------------------------------------------------------------


class CounterfactualRequest(_Strict):
    """Retrain without the ``k`` training examples the experiment ranked most ``remove`` for the
    given eval examples (the union over ``eval_ids``), plus ``controls`` retrainings without as
    many random examples, and optionally ``lds_subsets`` retrainings on random subsets of
    ``lds_fraction`` of the training set (the linear datamodeling score)."""

    eval_ids: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    k: int = Field(default=10, ge=1, le=1000)
    remove: Literal["helpful", "harmful"] = "helpful"
    controls: int = Field(default=2, ge=0, le=16)
    lds_subsets: int = Field(default=0, ge=0, le=64)
    lds_fraction: float = Field(default=0.5, gt=0, lt=1)
    seed: int = Field(default=0, ge=0)

    def retrainings(self) -> int:
        """How many fine-tunings the check costs (what an estimate multiplies)."""
        return 1 + self.controls + self.lds_subsets


class CounterfactualOutcome(BaseModel):
    """One eval example: its loss and answer in the experiment, without the removed examples,
    and without each control's random examples. ``*_change`` = loss after minus original."""

    id: str
    original_loss: float
    without_top_k_loss: float
    without_random_k_losses: list[float]
    original_output: str
    without_top_k_output: str
    top_k_loss_change: float
    random_loss_changes: list[float]
    # Removing the top-k moved the loss further (up for helpful, down for harmful) than every
    # control did; None without controls.
    beats_controls: bool | None


class LdsReport(BaseModel):
    subsets: int
    fraction: float
    per_eval: dict[str, float]
    mean: float


class CounterfactualResult(BaseModel):
    method: InfluenceMethod
    remove: Literal["helpful", "harmful"]
    k: int
    removed_ids: list[str]
    control_removed_ids: list[list[str]]
    examples: list[CounterfactualOutcome]
    beats_controls_rate: float | None
    lds: LdsReport | None
    timings: dict[str, float]


# ---- follow-up queries ---------------------------------------------------------------------

MAX_QUERIES = 32
MAX_QUERY_TEXT_CHARS = 8_000
MAX_QUERY_TOP_K = 100


class QueryItem(_Strict):
    """One question to the fine-tuned model: ``prompt``, the answer to attribute (``expected``,
    or the model's own greedy answer when absent) and optionally ``span``, character offsets
    ``[start, end)`` into that answer that restrict the attributed loss to their tokens."""

    id: str | None = Field(default=None, min_length=1, max_length=128)
    prompt: str = Field(min_length=1, max_length=MAX_QUERY_TEXT_CHARS)
    expected: str | None = Field(default=None, min_length=1, max_length=MAX_QUERY_TEXT_CHARS)
    span: tuple[int, int] | None = None

    @field_validator("span")
    @classmethod
    def _ordered_span(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None:
            start, end = value
            if start < 0 or end <= start:
                raise ValueError(f"[{start}, {end}] is not a span: needs 0 <= start < end")
        return value

    @model_validator(mode="after")
    def _span_in_expected(self) -> QueryItem:
        if self.span is not None and self.expected is not None and self.span[1] > len(self.expected):
            raise ValueError(f"span: ends at {self.span[1]} but expected has {len(self.expected)} characters")
        return self


class QueryRequest(_Strict):
    """Follow-up attribution queries to a finished experiment (gpu_core.query)."""

    queries: list[QueryItem] = Field(min_length=1, max_length=MAX_QUERIES)
    top_k: int = Field(default=10, ge=1, le=MAX_QUERY_TOP_K)

    @model_validator(mode="after")
    def _assign_ids(self) -> QueryRequest:
        _fill_ids(self.queries, "q", "queries")
        return self


class QueryOutcome(BaseModel):
    """One answered query: the model's greedy ``output``, the ``target`` whose loss was
    attributed (``expected`` or ``output``), the ``span`` of it that counted (None: all of it)
    and its mean per-token ``loss``; the training examples that most lowered (``helpful``) or
    raised (``harmful``) that loss, by id, as the experiment's method scores them."""

    id: str
    prompt: str
    output: str
    target: str
    span: tuple[int, int] | None
    span_tokens: int
    loss: float
    helpful: list[ScoredExample]
    harmful: list[ScoredExample]


class QueryResult(BaseModel):
    results: list[QueryOutcome]
    method: InfluenceMethod
    # Where the training side came from: the stored gradient index, recomputed from the stored
    # adapter and checkpoints, or from an adapter retrained with the experiment's seed.
    source: Literal["index", "recomputed", "retrained"]
    timings: dict[str, float]
