"""The experiment spec, progress events and result: one validated, JSON-serialisable source of
truth for gpu_core, the services and the dashboard.

Limits on sizes are configurable: pass ``context={"limits": SpecLimits(...)}`` to
``ExperimentSpec.model_validate``. Every error names the field and the rule it broke.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

InfluenceMethod = Literal["tracin", "datainf", "kronfluence"]
Quantization = Literal["none", "8bit", "4bit"]
Stage = Literal[
    "loading_model", "eval_base", "eval_few_shot", "training", "eval_finetuned", "influence"
]
STAGES: tuple[str, ...] = (
    "loading_model", "eval_base", "eval_few_shot", "training", "eval_finetuned", "influence"
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


def _check_text(value: str, info: ValidationInfo) -> str:
    limit = _limits(info).max_text_chars
    if len(value) > limit:
        raise ValueError(f"text is {len(value)} characters; the limit is {limit}")
    return value


class TrainingExample(_Strict):
    id: str | None = Field(default=None, min_length=1, max_length=128)
    prompt: str
    completion: str = Field(min_length=1)

    _check_prompt = field_validator("prompt", "completion")(_check_text)


class EvalExample(_Strict):
    id: str | None = Field(default=None, min_length=1, max_length=128)
    prompt: str
    expected: str = Field(min_length=1)

    _check_prompt = field_validator("prompt", "expected")(_check_text)


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


class InfluenceOptions(_Strict):
    top_k: int = Field(default=10, ge=1, le=1000)
    damping: float | None = Field(default=None, gt=0)


class ExperimentSpec(_Strict):
    model_id: str = Field(default=TINY_MODEL_ID, min_length=1, max_length=256)
    training_data: list[TrainingExample]
    eval_data: list[EvalExample]
    hyperparams: Hyperparams = Field(default_factory=Hyperparams)
    few_shot_k: int = Field(default=3, ge=0, le=32)
    influence_method: InfluenceMethod = "tracin"
    influence: InfluenceOptions = Field(default_factory=InfluenceOptions)

    @field_validator("training_data")
    @classmethod
    def _train_size(cls, value: list[TrainingExample], info: ValidationInfo) -> list[TrainingExample]:
        limit = _limits(info).max_train_examples
        if not value:
            raise ValueError("needs at least one training example")
        if len(value) > limit:
            raise ValueError(f"has {len(value)} examples; the limit is {limit}")
        return value

    @field_validator("eval_data")
    @classmethod
    def _eval_size(cls, value: list[EvalExample], info: ValidationInfo) -> list[EvalExample]:
        limit = _limits(info).max_eval_examples
        if not value:
            raise ValueError("needs at least one eval example")
        if len(value) > limit:
            raise ValueError(f"has {len(value)} examples; the limit is {limit}")
        return value

    @model_validator(mode="after")
    def _assign_ids(self) -> ExperimentSpec:
        _fill_ids(self.training_data, "t", "training_data")
        _fill_ids(self.eval_data, "e", "eval_data")
        return self


def _fill_ids(examples: list[Any], prefix: str, field: str) -> None:
    """Give every example without an id a stable one (its 1-based position), unique in the list."""
    seen: dict[str, int] = {}
    for index, example in enumerate(examples):
        if example.id is not None:
            if example.id in seen:
                raise ValueError(
                    f"{field}[{index}].id: duplicate id {example.id!r} "
                    f"(also at {field}[{seen[example.id]}])"
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
        raise SpecError(
            [
                f"{'.'.join(str(part) for part in error['loc']) or 'spec'}: "
                + str(error["msg"]).removeprefix("Value error, ")
                for error in exc.errors()
            ]
        ) from None


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


class InfluenceResult(BaseModel):
    """``scores[i][j]``: influence of training example ``train_ids[j]`` on eval example
    ``eval_ids[i]``; positive = helpful (up-weighting it lowers the eval loss)."""

    method: InfluenceMethod
    train_ids: list[str]
    eval_ids: list[str]
    scores: list[list[float]]
    top_k: dict[str, TopInfluences]


class LossPoint(BaseModel):
    step: int
    epoch: float
    loss: float
    learning_rate: float


class TrainingSummary(BaseModel):
    loss_curve: list[LossPoint]


class ExperimentResult(BaseModel):
    eval_results: EvalResults
    influence: InfluenceResult
    training: TrainingSummary
    timings: dict[str, float]
    environment: dict[str, Any]


class ResultEvent(BaseModel):
    type: Literal["result"] = "result"
    result: ExperimentResult
