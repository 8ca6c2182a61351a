"""Training-data influence of each training example on each eval example, on the LoRA weight
matrices of a peft model: TracIn (TracInCP), DataInf, Kronfluence (EK-FAC) and TrackStar.
TracIn with ``projection_dim`` and TrackStar score from a projected gradient index on disk
(``projected``, ``index``). Each method is one entry of ``gpu_core.influence_methods``.

One sign convention: positive = helpful (up-weighting the training example lowers the eval
example's loss). One loss for train and query gradients: the summed next-token cross-entropy
over the example's completion tokens. Per-example gradients come from one batched
forward+backward pass per batch (see ``gradients``). Details: docs/influence.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_core.data import EncodedPair
from gpu_core.influence.gradients import GradientTap
from gpu_core.influence.result import build_influence_result
from gpu_core.influence_methods import INFLUENCE_METHODS, ScoringRun, influence_method
from gpu_core.schemas import InfluenceOptions

METHODS = tuple(INFLUENCE_METHODS)

__all__ = ["METHODS", "AdapterCheckpoint", "build_influence_result", "compute_influence"]


@dataclass
class AdapterCheckpoint:
    """LoRA parameters at one point of training (TracIn weighs it by its learning rate)."""

    state: dict[str, torch.Tensor]  # by model.named_parameters() name, detached clones
    learning_rate: float
    epoch: int
    # Adam's bias-corrected second moment (exp_avg_sq / (1 - beta2^step)) per parameter, same
    # keys; TrackStar divides gradients by its square root. None when training kept none.
    second_moment: dict[str, torch.Tensor] | None = None


def compute_influence(
    method: str,
    model: Any,
    tokenizer: Any,
    train: Sequence[EncodedPair],
    queries: Sequence[EncodedPair],
    checkpoints: Sequence[AdapterCheckpoint],
    options: InfluenceOptions,
    batch_size: int,
    work_dir: Path,
    progress: Callable[[float], None] | None = None,
    train_ids: Sequence[str] | None = None,
    index_dir: Path | None = None,
    scores_file: Path | None = None,
    final_tap: GradientTap | None = None,
) -> torch.Tensor:
    """``[n_queries, n_train]`` float64 scores, positive = helpful.

    ``model``: a peft model with the final adapter loaded. TracIn loads each checkpoint's LoRA
    state in turn and restores the final state afterwards; DataInf and Kronfluence use the
    model's current (final) state. ``options.damping`` overrides DataInf's lambda_l and
    Kronfluence's damping factor (TracIn has none). ``work_dir`` holds temporary files (DataInf's
    gradient chunks, kronfluence's factors), removed before returning.

    TrackStar, and TracIn with ``options.projection_dim``, write a gradient index to
    ``index_dir`` (default ``work_dir / "gradient_index"``), kept after returning, its rows named
    by ``train_ids`` (default the positions), and with ``scores_file`` also write the scores
    there as float32 ``.npy``, block by block while scoring (the other methods ignore it).
    ``final_tap`` sees every training example's gradient and loss at the final adapter when the
    method's own pass takes them (TracIn, TrackStar); the others never call it."""
    entry = influence_method(method)
    if not train or not queries:
        raise ValueError("influence needs at least one training and one eval example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        return entry.score(
            ScoringRun(
                model=model,
                pad_token_id=pad_token_id,
                train=train,
                queries=queries,
                checkpoints=checkpoints,
                options=options,
                batch_size=batch_size,
                work_dir=work_dir,
                progress=progress or (lambda _fraction: None),
                train_ids=train_ids,
                index_dir=index_dir,
                scores_file=scores_file,
                final_tap=final_tap,
            )
        )
    finally:
        model.train(was_training)
