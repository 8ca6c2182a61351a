"""Influence from a projected gradient index: TracIn with ``projection_dim`` and TrackStar.

Per training example and checkpoint the index holds ``k``-dimensional rows (``index.py``):

- **TracIn** (projected TracInCP): ``P g_c(z)``, scored ``sum_c lr_c <P g_c(eval), P g_c(z)>``,
  an unbiased estimate of TracIn's ``sum_c lr_c <g_c(eval), g_c(z)>``.
- **TrackStar** (Chang et al. 2024, arXiv 2410.17413): on the final checkpoint,
  ``G(z) = P (g(z) / (sqrt(v) + eps))`` with ``v`` the training's own Adam second moment of each
  LoRA weight (bias-corrected, kept by ``training.train_lora`` per checkpoint) and ``eps`` Adam's
  1e-8 outside the square root (bergson's ``AdamNormalizer``), then unit-normalised:
  ``score = <G(eval)/|G(eval)|, G(z)/|G(z)|>``, a cosine in [-1, 1], positive = helpful. Both
  sides get the same correction and normalisation (the paper's G for train and eval examples).
  The paper's task-specific Hessian term ``R^-1/2`` is not applied (see docs/influence.md).

Building streams the training set in batches (one forward+backward per batch and checkpoint,
rows appended to the index); scoring streams the index in blocks against the eval rows held in
memory (``n_eval x k`` per checkpoint), so memory is flat in ``n_train`` apart from what the
caller keeps of the scores: a running exact top-k (:class:`RunningTopK`) and, when asked, the
full matrix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from gpu_core.data import EncodedPair
from gpu_core.influence.gradients import (
    GradientTap,
    LoraLayer,
    batched_gradients,
    load_lora_state,
    lora_grad_enabled,
    lora_layers,
    lora_state,
    lora_state_restored,
    sorted_gradients,
)
from gpu_core.influence.index import GradientIndex, GradientIndexWriter, fingerprint, open_npy
from gpu_core.influence.projection import PROJECTION_KIND, CountSketchProjection

ADAM_EPSILON = 1e-8
# Index rows scored at once: 8,192 x n_eval float64 scores per block.
SCORE_BLOCK_ROWS = 8192


class MethodFlags(Protocol):
    """What the index needs of a method: ``gpu_core.influence_methods.InfluenceMethodEntry``
    has these fields (passed in, so this module does not look methods up by name)."""

    @property
    def name(self) -> str: ...

    @property
    def checkpoints(self) -> Literal["every", "final"]: ...

    @property
    def adam_normalised(self) -> bool: ...


@dataclass(frozen=True)
class CheckpointPlan:
    """One checkpoint of the index: LoRA state, score weight and the gradient transform."""

    epoch: int
    state: dict[str, torch.Tensor]
    weight: float
    # sqrt(v) + eps per concatenated LoRA entry (TrackStar), or None (TracIn).
    denominators: torch.Tensor | None


def second_moment_denominators(
    layers: Sequence[LoraLayer], second_moment: dict[str, torch.Tensor] | None, device: torch.device
) -> torch.Tensor:
    """``sqrt(v) + eps`` flattened in ``layers`` order; raises when the optimizer state is missing."""
    if not second_moment:
        raise ValueError(
            "trackstar needs the training's Adam second moments (exp_avg_sq) in the final checkpoint; "
            "this adapter checkpoint has none"
        )
    missing = [layer.param_name for layer in layers if layer.param_name not in second_moment]
    if missing:
        raise ValueError(f"trackstar: the checkpoint's second moments lack {', '.join(missing[:3])}")
    flat = torch.cat(
        [second_moment[layer.param_name].detach().flatten().to(device, torch.float32) for layer in layers]
    )
    return flat.clamp_min(0).sqrt().add(ADAM_EPSILON)


class _Transform:
    def __init__(self, projection: CountSketchProjection, plan: CheckpointPlan, unit_norm: bool) -> None:
        self.projection = projection
        self.plan = plan
        self.unit_norm = unit_norm

    def __call__(self, gradients: torch.Tensor) -> torch.Tensor:
        gradients = gradients.detach().to(torch.float32)
        if self.plan.denominators is not None:
            gradients = gradients / self.plan.denominators
        rows = self.projection.project(gradients)
        if self.unit_norm:
            rows = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(1e-30)
        return rows


def plan_checkpoints(
    method: MethodFlags, layers: Sequence[LoraLayer], checkpoints: Sequence[Any], device: torch.device
) -> list[CheckpointPlan]:
    """TracIn: every checkpoint, weighted by its learning rate. TrackStar: the final one, weight 1."""
    if not checkpoints:
        raise ValueError(f"{method.name} needs at least one adapter checkpoint")
    if method.checkpoints == "every":
        return [CheckpointPlan(c.epoch, c.state, c.learning_rate, None) for c in checkpoints]
    final = checkpoints[-1]
    denominators = (
        second_moment_denominators(layers, getattr(final, "second_moment", None), device)
        if method.adam_normalised
        else None
    )
    return [CheckpointPlan(final.epoch, final.state, 1.0, denominators)]


def build_gradient_index(
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    train_ids: Sequence[str],
    plans: Sequence[CheckpointPlan],
    method: MethodFlags,
    dim: int,
    seed: int,
    batch_size: int,
    directory: Path,
    progress: Callable[[int], None],
    final_tap: GradientTap | None = None,
) -> GradientIndex:
    """Streams ``train`` once per plan into an index at ``directory``; ``progress(batches)`` after
    every batch; ``final_tap`` sees the raw training gradients of the last plan (the final
    adapter). Leaves the model's LoRA state as it found it."""
    layers = lora_layers(model)
    device = next(model.parameters()).device
    projection = CountSketchProjection([layer.numel for layer in layers], dim, seed, device)
    writer = GradientIndexWriter(
        directory,
        method=method.name,
        ids=train_ids,
        dim=dim,
        projection={
            "kind": PROJECTION_KIND,
            "seed": seed,
            "input_dim": projection.input_dim,
            "layers": [
                {"name": layer.param_name, "shape": list(layer.module.weight.shape)} for layer in layers
            ],
        },
        model_fingerprint=fingerprint(model, [layer.param_name for layer in layers], lora_state(layers)),
        extra={
            "preprocessing": (
                "adam second moment (sqrt(v) + 1e-8), projection, unit norm"
                if method.adam_normalised
                else "projection"
            ),
            "loss": "summed next-token cross-entropy over completion tokens",
        },
    )
    done = 0
    started, started_cpu = time.monotonic(), time.process_time()
    try:
        with lora_state_restored(layers), lora_grad_enabled(layers):
            for number, plan in enumerate(plans, start=1):
                load_lora_state(layers, plan.state)
                tap = final_tap if number == len(plans) else None
                transform = _Transform(projection, plan, unit_norm=method.adam_normalised)
                writer.begin_checkpoint(plan.epoch, plan.weight)
                for _, gradients in batched_gradients(model, layers, train, pad_token_id, batch_size, tap):
                    writer.append(transform(gradients))
                    done += 1
                    progress(done)
                writer.end_checkpoint()
        return writer.finish(
            build_wall_s=time.monotonic() - started,
            build_cpu_s=time.process_time() - started_cpu,
            build_batch_size=batch_size,
        )
    finally:
        writer.close()


def query_rows(
    model: nn.Module,
    pad_token_id: int,
    queries: Sequence[EncodedPair],
    plans: Sequence[CheckpointPlan],
    method: MethodFlags,
    index: GradientIndex,
    batch_size: int,
    progress: Callable[[int], None],
) -> list[torch.Tensor]:
    """Per plan ``[n_eval, dim]`` float32 eval rows, transformed as the index rows were."""
    layers = lora_layers(model)
    spec = index.manifest["projection"]
    device = next(model.parameters()).device
    projection = CountSketchProjection([layer.numel for layer in layers], index.dim, spec["seed"], device)
    rows, done = [], 0
    with lora_state_restored(layers), lora_grad_enabled(layers):
        for plan in plans:
            load_lora_state(layers, plan.state)
            transform = _Transform(projection, plan, unit_norm=method.adam_normalised)
            plan_rows = torch.empty(len(queries), index.dim, dtype=torch.float32)
            for indices, gradients in sorted_gradients(model, layers, queries, pad_token_id, batch_size):
                plan_rows[torch.tensor(indices)] = transform(gradients).cpu()
                done += 1
                progress(done)
            rows.append(plan_rows)
    return rows


def score_blocks(
    index: GradientIndex, eval_rows: Sequence[torch.Tensor], block_rows: int = SCORE_BLOCK_ROWS
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first training row, float64 [n_eval, rows])``: ``sum_c weight_c <eval_c, index_c>``
    over the index in blocks of ``block_rows``; memory is one block per checkpoint."""
    if len(eval_rows) != len(index.checkpoints):
        raise ValueError(f"{len(eval_rows)} sets of eval rows for {len(index.checkpoints)} index checkpoints")
    streams = [index.blocks(c, block_rows) for c in range(len(index.checkpoints))]
    for parts in zip(*streams, strict=True):
        start = parts[0][0]
        scores: torch.Tensor | None = None
        for checkpoint, rows, (_, block) in zip(index.checkpoints, eval_rows, parts, strict=True):
            # Float64 products (exact for float32 inputs), rounded to float32: a score then does
            # not depend on the block's shape (BLAS kernels sum float32 in shape-dependent
            # orders), so an index scored in shards ties, and ranks ties, as one scored whole.
            exact = rows.to(torch.float64) @ block.to(torch.float64).T
            contribution = exact.to(torch.float32).to(torch.float64) * checkpoint.weight
            scores = contribution if scores is None else scores + contribution
        if scores is None:  # a block exists only where a checkpoint does
            raise ValueError("the gradient index has no checkpoints")
        yield start, scores


class RunningTopK:
    """Exact per-eval-row top-k largest and smallest scores over streamed column blocks, ties
    broken by training order (as ``build_influence_result``)."""

    def __init__(self, n_eval: int, k: int) -> None:
        self.k = k
        self.top_values = torch.empty(n_eval, 0, dtype=torch.float64)
        self.top_indices = torch.empty(n_eval, 0, dtype=torch.int64)
        self.bottom_values = torch.empty(n_eval, 0, dtype=torch.float64)
        self.bottom_indices = torch.empty(n_eval, 0, dtype=torch.int64)

    def update(self, start: int, scores: torch.Tensor) -> None:
        columns = torch.arange(start, start + scores.shape[1]).expand(scores.shape[0], -1)
        self.top_values, self.top_indices = self._merge(
            self.top_values, self.top_indices, scores, columns, True
        )
        self.bottom_values, self.bottom_indices = self._merge(
            self.bottom_values, self.bottom_indices, scores, columns, False
        )

    def _merge(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        scores: torch.Tensor,
        columns: torch.Tensor,
        largest: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Kept entries precede the block in training order, so a stable sort keeps ties in order.
        all_values = torch.cat([values, scores], dim=1)
        all_indices = torch.cat([indices, columns], dim=1)
        order = torch.sort(all_values, dim=1, descending=largest, stable=True).indices[:, : self.k]
        return all_values.gather(1, order), all_indices.gather(1, order)


class ScoresFileWriter:
    """``[n_eval, n_train]`` scores as a row-major ``.npy`` file, written column block by column
    block as :func:`score_blocks` yields them (one seek + write per eval row and block), so the
    whole matrix is never in memory."""

    def __init__(self, path: Path, n_eval: int, n_train: int, dtype: str = "<f4") -> None:
        self.n_eval, self.n_train = n_eval, n_train
        self.dtype = np.dtype(dtype)
        self._handle = open_npy(Path(path), self.dtype.str, (n_eval, n_train))
        self._data_start = self._handle.tell()
        self._handle.truncate(self._data_start + n_eval * n_train * self.dtype.itemsize)

    def write(self, start: int, block: torch.Tensor) -> None:
        values = block.detach().cpu().numpy().astype(self.dtype, copy=False)
        for row in range(self.n_eval):
            self._handle.seek(self._data_start + (row * self.n_train + start) * self.dtype.itemsize)
            self._handle.write(values[row].tobytes())

    def close(self) -> None:
        self._handle.close()


@dataclass
class ProjectedScores:
    full: torch.Tensor | None  # [n_eval, n_train] float64, when kept
    top: RunningTopK | None  # exact top-k per eval example, when asked


def projected_scores(
    method: MethodFlags,
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    train_ids: Sequence[str],
    queries: Sequence[EncodedPair],
    checkpoints: Sequence[Any],
    dim: int,
    seed: int,
    batch_size: int,
    index_dir: Path,
    progress: Callable[[float], None],
    *,
    keep_full: bool = True,
    top_k: int | None = None,
    scores_file: Path | None = None,
    final_tap: GradientTap | None = None,
) -> ProjectedScores:
    """Builds the ``dim``-dimensional index at ``index_dir`` (kept), then scores the eval
    examples against it block by block into what is asked for: the full ``[n_eval, n_train]``
    matrix (``keep_full``), a running exact top-``top_k`` per eval example, a ``scores_file``
    (.npy, float32) written block by block. Without the full matrix, memory is flat in ``n_train``."""
    layers = lora_layers(model)
    device = next(model.parameters()).device
    plans = plan_checkpoints(method, layers, checkpoints, device)
    train_batches = -(-len(train) // batch_size) * len(plans)
    query_batches = -(-len(queries) // batch_size) * len(plans)
    score_steps = -(-len(train) // SCORE_BLOCK_ROWS) + 1
    total = train_batches + query_batches + score_steps
    index = build_gradient_index(
        model,
        pad_token_id,
        train,
        train_ids,
        plans,
        method,
        dim,
        seed,
        batch_size,
        index_dir,
        lambda done: progress(done / total),
        final_tap,
    )
    eval_rows = query_rows(
        model,
        pad_token_id,
        queries,
        plans,
        method,
        index,
        batch_size,
        lambda done: progress((train_batches + done) / total),
    )
    full = torch.empty(len(queries), len(train), dtype=torch.float64) if keep_full else None
    top = RunningTopK(len(queries), top_k) if top_k is not None else None
    writer = ScoresFileWriter(scores_file, len(queries), len(train)) if scores_file is not None else None
    try:
        for step, (start, block) in enumerate(score_blocks(index, eval_rows), start=1):
            if full is not None:
                full[:, start : start + block.shape[1]] = block
            if top is not None:
                top.update(start, block)
            if writer is not None:
                writer.write(start, block)
            progress((train_batches + query_batches + step) / total)
    finally:
        if writer is not None:
            writer.close()
    progress(1.0)
    return ProjectedScores(full=full, top=top)
