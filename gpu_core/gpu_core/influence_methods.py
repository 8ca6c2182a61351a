"""The influence methods, registered once: ``INFLUENCE_METHODS[name]`` holds a method's
implementation and what it needs and builds.

``gpu_core.influence.compute_influence`` runs a method through its entry's ``score``; the
artifact plan (``gpu_core.uploads``), the projected index (``influence.projected``) and the cost
model read the capabilities instead of comparing names. Adding a method is adding an entry here
(and its name to ``schemas.InfluenceMethod``). This module imports no torch: the scheduler and
the gateway read it through the cost model; ``score`` imports its implementation when called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gpu_core.schemas import InfluenceOptions

# TrackStar's index dimensions when ``projection_dim`` is unset.
DEFAULT_TRACKSTAR_DIM = 4096


@dataclass(frozen=True)
class ScoringRun:
    """What ``compute_influence`` hands a method's ``score`` (its arguments, checked)."""

    model: Any  # peft model, eval mode, final adapter loaded
    pad_token_id: int
    train: Sequence[Any]  # gpu_core.data.EncodedPair
    queries: Sequence[Any]
    checkpoints: Sequence[Any]  # gpu_core.influence.AdapterCheckpoint, in epoch order
    options: InfluenceOptions
    batch_size: int
    work_dir: Path
    progress: Callable[[float], None]
    train_ids: Sequence[str] | None
    index_dir: Path | None
    scores_file: Path | None
    # Sees the training gradients at the final adapter where the method takes them anyway.
    final_tap: Callable[..., None] | None = None


@dataclass(frozen=True)
class InfluenceMethodEntry:
    name: str
    # [n_queries, n_train] float64 torch scores, positive = helpful.
    score: Callable[[ScoringRun], Any]
    # The adapter checkpoints gradients are taken at: every epoch's (weighted by its learning
    # rate) or the final one only.
    checkpoints: Literal["every", "final"]
    # Whether scoring goes through a projected gradient index on disk: never, when
    # ``options.projection_dim`` is set ("projected"), or always.
    gradient_index: Literal["never", "projected", "always"]
    default_index_dim: int | None = None  # with "always", when projection_dim is unset
    # Gradients divided by sqrt(Adam's second moment) + eps, then unit-normalised (TrackStar).
    adam_normalised: bool = False
    uses_damping: bool = False  # options.damping applies
    # The training summary's net influence: from the final adapter's gradients (TracIn, TrackStar:
    # plain inner products, see gpu_core.training_summary) rather than the score matrix's columns.
    net_from_final_gradients: bool = False
    # The summary's training gradients are Adam's step for the example, g / (sqrt(v) + eps),
    # against raw eval gradients (TracIn under Adam, as LESS derives it); TrackStar divides both
    # sides instead (adam_normalised).
    summary_adam_step: bool = False

    def index_dim(self, projection_dim: int | None) -> int | None:
        """The gradient index's dimensions, or None when the method builds no index."""
        if self.gradient_index == "always":
            return projection_dim or self.default_index_dim
        return projection_dim if self.gradient_index == "projected" else None

    def builds_index(self, projection_dim: int | None) -> bool:
        return self.index_dim(projection_dim) is not None

    def checkpoints_scored(self, epochs: int) -> int:
        return epochs if self.checkpoints == "every" else 1


def _projected(run: ScoringRun, method: str) -> Any:
    from gpu_core.influence.index import INDEX_DIR_NAME
    from gpu_core.influence.projected import projected_scores

    ids = list(run.train_ids) if run.train_ids is not None else [str(i) for i in range(len(run.train))]
    if len(ids) != len(run.train):
        raise ValueError(f"{len(ids)} train_ids for {len(run.train)} training examples")
    entry = influence_method(method)
    dim = entry.index_dim(run.options.projection_dim)
    assert dim is not None  # only methods that build an index score through it
    return projected_scores(
        entry,
        run.model,
        run.pad_token_id,
        run.train,
        ids,
        run.queries,
        run.checkpoints,
        dim,
        run.options.projection_seed,
        run.batch_size,
        Path(run.index_dir or run.work_dir / INDEX_DIR_NAME),
        run.progress,
        scores_file=run.scores_file,
        final_tap=run.final_tap,
    ).full


def _tracin(run: ScoringRun) -> Any:
    if run.options.projection_dim is not None:
        return _projected(run, "tracin")
    from gpu_core.influence.tracin import tracin_scores

    if not run.checkpoints:
        raise ValueError("TracIn needs at least one adapter checkpoint")
    weighted = [(c.state, c.learning_rate) for c in run.checkpoints]
    return tracin_scores(
        run.model,
        run.pad_token_id,
        run.train,
        run.queries,
        weighted,
        run.batch_size,
        run.progress,
        run.final_tap,
    )


def _datainf(run: ScoringRun) -> Any:
    from gpu_core.influence.datainf import datainf_scores

    return datainf_scores(
        run.model,
        run.pad_token_id,
        run.train,
        run.queries,
        run.options.damping,
        run.batch_size,
        run.progress,
    )


def _kronfluence(run: ScoringRun) -> Any:
    from gpu_core.influence.ekfac import kronfluence_scores

    return kronfluence_scores(
        run.model,
        run.pad_token_id,
        run.train,
        run.queries,
        run.options.damping,
        run.batch_size,
        run.work_dir,
        run.progress,
    )


def _trackstar(run: ScoringRun) -> Any:
    return _projected(run, "trackstar")


INFLUENCE_METHODS: dict[str, InfluenceMethodEntry] = {
    entry.name: entry
    for entry in (
        InfluenceMethodEntry(
            "tracin",
            _tracin,
            checkpoints="every",
            gradient_index="projected",
            net_from_final_gradients=True,
            summary_adam_step=True,
        ),
        InfluenceMethodEntry(
            "datainf", _datainf, checkpoints="final", gradient_index="never", uses_damping=True
        ),
        InfluenceMethodEntry(
            "kronfluence", _kronfluence, checkpoints="final", gradient_index="never", uses_damping=True
        ),
        InfluenceMethodEntry(
            "trackstar",
            _trackstar,
            checkpoints="final",
            gradient_index="always",
            default_index_dim=DEFAULT_TRACKSTAR_DIM,
            adam_normalised=True,
            net_from_final_gradients=True,
        ),
    )
}


def influence_method(name: str) -> InfluenceMethodEntry:
    """The entry of method ``name``; ValueError naming the known ones otherwise."""
    entry = INFLUENCE_METHODS.get(name)
    if entry is None:
        raise ValueError(f"unknown influence method {name!r}; expected one of {', '.join(INFLUENCE_METHODS)}")
    return entry
