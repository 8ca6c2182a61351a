"""The training-set summary: per training example its net influence over the eval set, its
self-influence, its loss under the fine-tuned model, its worst harm to a single eval example, and
a suspicion rank combining the four.

- **net influence**: ``sum over eval examples`` of the method's score; positive = helpful overall
  (up-weighting it lowers the eval set's summed loss), negative = harmful. DataInf and
  Kronfluence: the column sum of their score matrix (already at the final adapter). TracIn and
  TrackStar (:attr:`InfluenceMethodEntry.net_from_final_gradients`): the same inner product at
  the final adapter, for TracIn ``<g_train / (sqrt(v) + eps), sum_e g_eval>`` times the
  checkpoints' summed learning rate (the first-order change of the eval loss from an Adam step on
  the example: TracIn for a model trained with Adam, as LESS derives it, arXiv 2402.04333), for
  TrackStar between Adam-corrected gradients on both sides without the unit normalisation (as
  their self-influence), from the training gradients their pass takes anyway and one gradient
  pass over the eval set. TracIn's early checkpoints, before the model tells the examples apart,
  and TrackStar's unit normalisation, which makes an example the model has fitted (tiny
  gradient) count as much as one it is torn over, drowned the signal on planted noise
  (docs/influence.md, ``make bench-curate``).
- **self-influence**: the method's own score of an example on itself, at the final adapter:
  ``sum_c lr_c * <g / (sqrt(v) + eps), g>`` for TracIn (the checkpoints' summed learning rate
  times the final gradient against its own Adam step; the raw ``|g|^2`` without Adam state),
  ``|g / (sqrt(v) + eps)|^2`` for TrackStar (its Adam correction, before
  the unit normalisation that would make every self-score 1), and DataInf's per-layer inverse
  Hessian ``g_l^T H_l^-1 g_l`` with only the example's own rank-one term kept (the diagonal of
  ``sum_l 1/lambda_l (|g_l|^2 - (1/n) sum_i (g_i.g_l)^2 / (lambda_l + |g_i|^2))``) for DataInf and
  Kronfluence (whose EK-FAC factors live inside its scoring pass; the same damped per-layer metric
  stands in for them).
- **train loss**: mean cross-entropy over the example's answer tokens under the fine-tuned model.
- **worst harm**: from the method's ``[n_eval, n_train]`` score matrix, each eval example's row
  standardised over the training set, then per training example the lowest value: how many
  standard deviations below that eval example's typical training example it pulls the eval
  example it harms most (:func:`worst_harm_scores`). Net influence sums over the eval set, so
  many small pulls from eval examples about other things (on the planted-noise task: every eval
  example whose answer is the wrong label's letter) can outweigh the one strong harm to the eval
  example that asks the mislabelled example's own question; the minimum keeps that harm. No
  extra pass: the matrix is the method's own result.

Self-influence and loss (and TracIn's and TrackStar's net influence) come from per-example
gradients at the final adapter (the loss from the same forward): TracIn and TrackStar take them
in their own pass (:class:`FinalGradientFeatures` as the pass's tap), DataInf and Kronfluence in
one extra pass over the training set (one forward and backward per batch, no [n_eval, n_train]
work).
The suspicion score is the mean of the four signals' percentile ranks, each oriented so that high
= suspect (``-net influence``, ``-worst harm``, self-influence, loss): mislabelled examples are
hard to fit (high loss), pull the model on their own (high self-influence), work against the eval
set (negative net influence) and most of all against the eval example that asks their question
(negative worst harm); a rank average needs no common scale across methods. ``suspect_rank`` 1 is
the most suspect. The figures that chose this combination are in docs/influence.md (``make
bench-curate``), with the alternatives tried and not adopted (RelatIF's relative harm, products,
maxima, weights, gates, a standardised net influence).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from gpu_core.data import EncodedPair
from gpu_core.influence.datainf import datainf_lambdas
from gpu_core.influence.gradients import (
    layer_slices,
    lora_grad_enabled,
    lora_layers,
    model_device,
    sorted_gradients,
)
from gpu_core.influence.projected import second_moment_denominators
from gpu_core.influence_methods import influence_method
from gpu_core.schemas import InfluenceOptions

SUMMARY_NAME = "training_summary.json"
# Characters of each example's text kept in the summary (the table shows a preview).
TEXT_PREVIEW_CHARS = 400
# Values per block when reading the score matrix (float64: 32 MB).
BLOCK_VALUES = 4_000_000
SORTS = ("harmful", "helpful", "self_influence", "loss", "worst_harm", "suspect")


@dataclass
class TrainingSetSummary:
    ids: list[str]
    net_influence: np.ndarray  # [n] float64, positive = helpful
    self_influence: np.ndarray
    train_loss: np.ndarray
    # Its most negative score on any one eval example, in that eval example's standard deviations
    # over the training set (NaN in summaries stored before it existed).
    worst_harm: np.ndarray
    suspicion: np.ndarray  # mean percentile rank, 1 = most suspect on every signal

    @property
    def has_worst_harm(self) -> bool:
        """False for a summary stored before worst harm existed."""
        return not bool(np.isnan(self.worst_harm).all())

    @property
    def suspect_rank(self) -> np.ndarray:
        """1-based rank by suspicion (1 = most suspect), ties broken by position."""
        order = np.argsort(-self.suspicion, kind="stable")
        ranks = np.empty(len(order), dtype=np.int64)
        ranks[order] = np.arange(1, len(order) + 1)
        return ranks

    def order(self, sort: str) -> np.ndarray:
        """Indices by ``sort`` (one of :data:`SORTS`), first = most of it."""
        keys = {
            "harmful": self.net_influence,
            "helpful": -self.net_influence,
            "self_influence": -self.self_influence,
            "loss": -self.train_loss,
            "worst_harm": np.nan_to_num(self.worst_harm, nan=0.0),
            "suspect": -self.suspicion,
        }
        if sort not in keys:
            raise ValueError(f"sort: {sort!r} is not one of {', '.join(SORTS)}")
        return np.argsort(keys[sort], kind="stable")

    def to_json(self, texts: Sequence[str] | None = None) -> dict[str, Any]:
        ranks = self.suspect_rank
        examples = []
        for j, example_id in enumerate(self.ids):
            row: dict[str, Any] = {
                "id": example_id,
                "net_influence": float(self.net_influence[j]),
                "self_influence": float(self.self_influence[j]),
                "train_loss": float(self.train_loss[j]),
                "worst_harm": None if np.isnan(self.worst_harm[j]) else float(self.worst_harm[j]),
                "suspicion": float(self.suspicion[j]),
                "suspect_rank": int(ranks[j]),
            }
            if texts is not None:
                row["text"] = texts[j][:TEXT_PREVIEW_CHARS]
            examples.append(row)
        return {"version": 1, "examples": examples}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingSetSummary:
        rows = data["examples"]
        return cls(
            ids=[row["id"] for row in rows],
            net_influence=np.array([row["net_influence"] for row in rows], dtype=np.float64),
            self_influence=np.array([row["self_influence"] for row in rows], dtype=np.float64),
            train_loss=np.array([row["train_loss"] for row in rows], dtype=np.float64),
            worst_harm=np.array(
                [np.nan if row.get("worst_harm") is None else row["worst_harm"] for row in rows],
                dtype=np.float64,
            ),
            suspicion=np.array([row["suspicion"] for row in rows], dtype=np.float64),
        )


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks scaled to (0, 1]: the largest value gets 1; ties share their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if len(counts) < len(values):  # average the ranks of tied values
        sums = np.bincount(inverse, weights=ranks)
        ranks = sums[inverse] / counts[inverse]
    return ranks / max(len(values), 1)


def suspicion_scores(
    net_influence: np.ndarray, worst_harm: np.ndarray, self_influence: np.ndarray, train_loss: np.ndarray
) -> np.ndarray:
    """Mean percentile rank of -net influence, -worst harm, self-influence and loss (high =
    suspect)."""
    return (
        percentile_ranks(-np.asarray(net_influence))
        + percentile_ranks(-np.asarray(worst_harm))
        + percentile_ranks(self_influence)
        + percentile_ranks(train_loss)
    ) / 4.0


def _row_blocks(scores: np.ndarray) -> Iterator[np.ndarray]:
    """``scores`` (possibly memory-mapped) as float64 blocks of whole rows, about
    :data:`BLOCK_VALUES` values each: a million training examples are 8 MB a row."""
    rows = max(1, BLOCK_VALUES // max(scores.shape[1], 1))
    for start in range(0, scores.shape[0], rows):
        yield np.asarray(scores[start : start + rows], dtype=np.float64)


def worst_harm_scores(scores: np.ndarray) -> np.ndarray:
    """Per training example (column of the ``[n_eval, n_train]`` score matrix, positive =
    helpful), its lowest score over the eval examples after standardising each eval example's row
    over the training set: how far below that eval example's typical training example it pulls
    the eval example it harms most. A sum over the eval set lets many small pulls from unrelated
    eval examples (cross-talk) outweigh one strong harm; a mislabelled example is the outlier of
    the one eval example that asks its question. Block-wise: ``scores`` may be memory-mapped."""
    n_eval, n_train = scores.shape
    worst = np.full(n_train, np.inf)
    for block in _row_blocks(scores):
        spread = block.std(axis=1, keepdims=True)
        standardised = np.divide(
            block - block.mean(axis=1, keepdims=True),
            spread,
            out=np.zeros_like(block),
            where=spread > 0,
        )
        np.minimum(worst, standardised.min(axis=0), out=worst)
    return worst if n_eval else np.zeros(n_train)


def eval_gradient_sum(
    model: Any, pad_token_id: int, queries: Sequence[EncodedPair], batch_size: int
) -> torch.Tensor:
    """``sum over eval examples`` of their LoRA gradients at ``model``'s current (final) adapter:
    ``[d]`` float32 on the model's device, one gradient pass over the eval set."""
    layers = lora_layers(model)
    total = torch.zeros(sum(s.stop - s.start for s in layer_slices(layers)), device=model_device(model))
    was_training = model.training
    model.eval()
    try:
        with lora_grad_enabled(layers):
            for _, grads in sorted_gradients(model, layers, queries, pad_token_id, batch_size):
                total += grads.detach().to(torch.float32).sum(dim=0)
    finally:
        model.train(was_training)
    return total


class FinalGradientFeatures:
    """Per training example at the final adapter, per LoRA layer ``<step, g>`` (its gradient g
    times its update: ``g`` for DataInf and Kronfluence, Adam's step ``g / (sqrt(v) + eps)`` for
    TracIn, and for TrackStar both divided), its loss and, given the eval set's summed gradient
    (:func:`eval_gradient_sum`), the step's inner product with it (divided too for TrackStar):
    what self-influence, the training loss and TracIn's and TrackStar's net influence are
    computed from. Filled as a :data:`GradientTap` by the method's own pass where
    it takes those gradients (TracIn's last checkpoint, the index's final plan), else by
    :func:`final_adapter_signals`'s own pass."""

    def __init__(
        self,
        method: str,
        model: Any,
        n_train: int,
        checkpoints: Sequence[Any],
        eval_gradients: torch.Tensor | None = None,
    ) -> None:
        layers = lora_layers(model)
        entry = influence_method(method)
        self.slices = layer_slices(layers)
        final = checkpoints[-1] if checkpoints else None
        moments = getattr(final, "second_moment", None)
        # Divides the training gradients (TracIn: Adam's step; without Adam state, SGD's) and,
        # for TrackStar, the eval gradients too.
        self.denominators = None
        if entry.adam_normalised or (entry.summary_adam_step and moments):
            self.denominators = second_moment_denominators(layers, moments, model_device(model))
        self.both_sides = entry.adam_normalised
        self.direction = None
        if eval_gradients is not None:
            direction = eval_gradients.detach().to(model_device(model), torch.float32)
            if self.both_sides and self.denominators is not None:
                direction = direction / self.denominators
            self.direction = direction
        # Columns: each layer's <step, g>, the loss, the step's inner product with the eval gradients.
        self.rows = np.full((n_train, len(layers) + 2), np.nan, dtype=np.float64)

    def __call__(self, indices: Sequence[int], grads: torch.Tensor, losses: torch.Tensor) -> None:
        grads = grads.detach().to(torch.float32)  # the pass's own tensor: never changed in place
        steps = grads / self.denominators if self.denominators is not None else grads
        if self.direction is not None:
            net = steps @ self.direction
        else:
            net = torch.zeros(len(grads), device=grads.device)
        # Self-influence <step, g> (TrackStar divides g as well: |g / (sqrt(v) + eps)|^2), in the
        # step's own memory where it has one: a 12B model's per-example gradients are large.
        if steps is grads:
            products = grads.square()
        else:
            products = steps.square_() if self.both_sides else steps.mul_(grads)
        norms = torch.stack([products[:, s].sum(dim=1) for s in self.slices], dim=1)
        rows = torch.cat([norms, losses.detach().unsqueeze(1).to(norms), net.unsqueeze(1).to(norms)], dim=1)
        self.rows[list(indices)] = rows.to("cpu", torch.float64).numpy()

    @property
    def complete(self) -> bool:
        return not np.isnan(self.rows).any()


class FinalSignals(NamedTuple):
    """Float64 ``[n_train]`` each; ``net_influence`` only for the methods that take it from the
    final adapter's gradients (None: the score matrix's column sum)."""

    self_influence: np.ndarray
    train_loss: np.ndarray
    net_influence: np.ndarray | None


def final_adapter_signals(
    method: str,
    model: Any,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    checkpoints: Sequence[Any],
    options: InfluenceOptions,
    batch_size: int,
    progress: Callable[[float], None] | None = None,
    gathered: FinalGradientFeatures | None = None,
    eval_gradients: torch.Tensor | None = None,
) -> FinalSignals:
    """Self-influence, mean answer loss and (for methods with
    :attr:`~gpu_core.influence_methods.InfluenceMethodEntry.net_from_final_gradients`, given
    ``eval_gradients`` from :func:`eval_gradient_sum`) net influence of every training example
    (see the module docstring): from ``gathered`` when the influence pass filled it, else from
    one pass at ``model``'s current (final) adapter."""
    entry = influence_method(method)
    layers = lora_layers(model)
    if entry.net_from_final_gradients and eval_gradients is None:
        raise ValueError(f"{method}: the summary's net influence needs the eval set's summed gradient")
    features = gathered
    # A tap filled without the eval gradients has no net influence to give: take the own pass.
    if (
        features is None
        or not features.complete
        or (entry.net_from_final_gradients and features.direction is None)
    ):
        features = FinalGradientFeatures(method, model, len(train), checkpoints, eval_gradients)
        was_training = model.training
        model.eval()
        done = 0
        try:
            with lora_grad_enabled(layers):
                for indices, _ in sorted_gradients(model, layers, train, pad_token_id, batch_size, features):
                    done += len(indices)
                    if progress is not None:
                        progress(done / len(train))
        finally:
            model.train(was_training)
    n_layers = len(layers)
    # Per layer <step, g>: for DataInf and Kronfluence the squared gradient norms.
    per_layer, losses = features.rows[:, :n_layers], features.rows[:, n_layers]
    inner = features.rows[:, n_layers + 1]
    if entry.name == "tracin":
        learning_rates = sum(float(c.learning_rate) for c in checkpoints) or 1.0
        return FinalSignals(learning_rates * per_layer.sum(axis=1), losses, learning_rates * inner)
    if entry.name == "trackstar":
        return FinalSignals(per_layer.sum(axis=1), losses, inner)
    # DataInf's damped per-layer inverse Hessian, own rank-one term only (see the docstring).
    lambdas = datainf_lambdas(torch.from_numpy(per_layer), layers, options.damping).numpy()
    n = len(train)
    own = per_layer - per_layer**2 / (n * (lambdas + per_layer))
    return FinalSignals((own / lambdas).sum(axis=1), losses, None)


def summarize(
    train_ids: Sequence[str],
    scores: np.ndarray,
    self_influence: np.ndarray,
    train_loss: np.ndarray,
    net_influence: np.ndarray | None = None,
) -> TrainingSetSummary:
    """The summary from the ``[n_eval, n_train]`` score matrix (positive = helpful) and the pass's
    self-influence, losses and, where the method takes it from the final adapter, net influence
    (else the matrix's column sum)."""
    scores = np.asarray(scores)
    if scores.shape[1] != len(train_ids):
        raise ValueError(f"scores: {scores.shape[1]} columns for {len(train_ids)} training examples")
    if net_influence is not None:
        net = np.asarray(net_influence, dtype=np.float64)
    else:
        net = np.zeros(len(train_ids), dtype=np.float64)
        for block in _row_blocks(scores):
            net += block.sum(axis=0)
    self_influence = np.asarray(self_influence, dtype=np.float64)
    train_loss = np.asarray(train_loss, dtype=np.float64)
    worst_harm = worst_harm_scores(scores)
    return TrainingSetSummary(
        ids=list(train_ids),
        net_influence=net,
        self_influence=self_influence,
        train_loss=train_loss,
        worst_harm=worst_harm,
        suspicion=suspicion_scores(net, worst_harm, self_influence, train_loss),
    )


def write_summary(directory: Path, summary: TrainingSetSummary, texts: Sequence[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SUMMARY_NAME
    path.write_text(json.dumps(summary.to_json(texts), separators=(",", ":")))
    return path


def page(data: dict[str, Any], sort: str, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
    """One page of the stored summary's examples by ``sort`` (what the API serves)."""
    summary = TrainingSetSummary.from_json(data)
    rows = data["examples"]
    order = summary.order(sort)[offset : offset + limit]
    keys = ("id", "net_influence", "self_influence", "train_loss", "worst_harm", "suspect_rank", "text")
    return [{key: rows[j].get(key, "" if key == "text" else None) for key in keys} for j in order], len(rows)
