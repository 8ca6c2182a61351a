"""The curation job's request and result (gpu_core.curation runs it). No torch: the scheduler
and the gateway validate requests with it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_SEEDS = 10
MAX_CONTROLS = 10


class DropRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: Literal["harmful", "suspect", "self_influence", "loss", "worst_harm"]
    count: int = Field(ge=1)


class KeepRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: Literal["helpful"]
    fraction: float = Field(gt=0, lt=1)


class CurationRequest(BaseModel):
    """What the job runs: the selection as ids (``drop_ids`` or ``keep_ids``), the rule it came
    from when there was one (for the record), ``controls`` random selections per seed, ``seeds``."""

    model_config = ConfigDict(extra="forbid")

    drop_ids: list[str] | None = None
    keep_ids: list[str] | None = None
    drop: DropRule | None = None
    keep: KeepRule | None = None
    controls: int = Field(default=1, ge=0, le=MAX_CONTROLS)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS)

    @model_validator(mode="after")
    def _one_selection(self) -> CurationRequest:
        given = [name for name in ("drop_ids", "keep_ids", "drop", "keep") if getattr(self, name) is not None]
        if not given:
            raise ValueError("give drop_ids, or a rule: drop {by, count} or keep {by, fraction}")
        if self.drop_ids is not None and self.keep_ids is not None:
            raise ValueError("drop_ids and keep_ids: give one selection, not both")
        if self.drop is not None and self.keep is not None:
            raise ValueError("drop and keep: give one rule, not both")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: each seed once")
        return self

    @property
    def resolved(self) -> bool:
        return self.drop_ids is not None or self.keep_ids is not None

    def retrainings(self) -> int:
        return len(self.seeds) * (1 + self.controls)


class SelectionRun(BaseModel):
    selection: str  # "curated" or "control-N"
    seed: int
    exact_match: float
    mean_loss: float


class PairedDifference(BaseModel):
    """Curated minus controls, paired per eval example (see the module docstring)."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n_pairs: int


class CurationResult(BaseModel):
    mode: Literal["drop", "keep"]
    rule: dict[str, Any] | None
    selected_ids: list[str]  # the ids dropped (mode drop) or kept (mode keep)
    control_selected_ids: list[list[str]]  # per control, the same for every seed
    kept: int
    runs: list[SelectionRun]
    exact_match: PairedDifference | None  # None without controls
    loss: PairedDifference | None
    original: SelectionRun | None  # the experiment's own fine-tuned metrics, for reference
    timings: dict[str, float]
