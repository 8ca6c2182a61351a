"""DataInf (Kwon et al., ICLR 2024), vectorised, in memory up to a budget, spilled beyond it.

Per LoRA weight matrix l (lora_A and lora_B separately) with train gradients ``G [n, d_l]`` and
query gradients ``Q [m, d_l]``, the reference's Sherman-Morrison average
``hvp_l(q) = 1/(n lambda_l) sum_i [q - (q.g_i)/(lambda_l + |g_i|^2) g_i]`` is, for all queries
at once: ``K = Q G^T``, ``c = K / (lambda_l + rowsum(G^2))^T``, ``H^-1 Q = (Q - c G / n) / lambda_l``,
and the scores ``sum_l (H^-1 Q)_l G_l^T``. The damping follows the reference:
``lambda_l = 0.1 * mean squared gradient entry`` of layer l over the training set.

The reference stores ``-sum_l hvp_l . g_il`` (positive = harmful); we return ``+sum_l``
(positive = helpful), same magnitude and scale (no 1/n beyond the formula's).

The training gradients are computed once (one batched forward+backward pass over the training
set) into blocks of up to ``gradient_memory_bytes``. lambda needs the whole set before ``c`` can
be formed, and the scores need the finished ``c G``, so the blocks are used twice. When the
whole set fits one block (the usual case for LoRA) it stays in memory and each product is one
large matmul per layer; beyond the budget, every full block but the last is written to
``work_dir`` and read back in each pass, so memory stays at one block plus the query side.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gpu_core.data import EncodedPair
from gpu_core.influence.gradients import (
    LoraLayer,
    batched_gradients,
    layer_slices,
    lora_grad_enabled,
    lora_layers,
    stacked_gradients,
)

# The reference's lambda rule: (1 / lambda_const_param) x mean squared entry, lambda_const_param=10.
REFERENCE_DAMPING_SCALE = 0.1
# Training gradients held in memory (on the model's device) at once; beyond it they spill to disk.
DEFAULT_GRADIENT_MEMORY_BYTES = 1 << 30


class _GradientBlocks:
    """Training-gradient blocks ``0 .. count-1``, one held in memory at a time: a block is
    written to ``directory`` (created on the first spill) only when another one takes its
    place, so a single block never touches the disk and the last one is read back once less."""

    def __init__(self, directory: Path, count: int) -> None:
        self.directory = directory
        self.count = count
        self.held_index = -1
        self.held: torch.Tensor | None = None
        self.on_disk: set[int] = set()

    def _path(self, index: int) -> Path:
        return self.directory / f"block-{index:06d}.pt"

    def release(self) -> None:
        """Drops the block in memory, writing it out first unless it is on disk already."""
        if self.held is not None and self.held_index not in self.on_disk:
            self.directory.mkdir(parents=True, exist_ok=True)
            torch.save(self.held, self._path(self.held_index))
            self.on_disk.add(self.held_index)
        self.held = None

    def store(self, index: int, block: torch.Tensor) -> None:
        self.release()
        self.held_index, self.held = index, block

    def get(self, index: int) -> torch.Tensor:
        if index != self.held_index or self.held is None:
            self.release()
            self.held = torch.load(self._path(index), weights_only=True)
            self.held_index = index
        return self.held


def block_rows(gradient_memory_bytes: int, row_bytes: int, batch_size: int, n_train: int) -> int:
    """Examples per block: as many as the budget holds, a whole number of batches (so a batch
    never straddles two blocks), at least one batch."""
    rows = max(batch_size, gradient_memory_bytes // row_bytes // batch_size * batch_size)
    return min(rows, n_train)


def layer_squared_norms(gradients: torch.Tensor, slices: Sequence[slice]) -> torch.Tensor:
    """``|g_il|^2`` per example and layer of a ``[batch, width]`` block: ``[batch, n_layers]``
    float64, on the CPU."""
    squares = gradients.square()
    norms = torch.empty(gradients.shape[0], len(slices), dtype=torch.float64)
    for layer_index, s in enumerate(slices):
        norms[:, layer_index] = squares[:, s].sum(dim=1).cpu()
    return norms


def datainf_lambdas(
    squared_norms: torch.Tensor, layers: Sequence[LoraLayer], damping: float | None
) -> torch.Tensor:
    """lambda_l per layer (float64): ``damping`` for every layer, else the reference's rule over
    the training set's ``[n_train, n_layers]`` squared norms."""
    if damping is not None:
        lambdas = torch.full((len(layers),), float(damping), dtype=torch.float64)
    else:
        sizes = torch.tensor([layer.numel for layer in layers], dtype=torch.float64)
        lambdas = REFERENCE_DAMPING_SCALE * squared_norms.sum(dim=0) / (squared_norms.shape[0] * sizes)
    if bool((lambdas <= 0).any()):
        raise ValueError("DataInf damping is zero: a LoRA layer has all-zero training gradients")
    return lambdas


def add_corrections(
    corrections: Sequence[torch.Tensor],
    query_grads: torch.Tensor,
    block: torch.Tensor,
    lambdas: torch.Tensor,
    squared_norms: torch.Tensor,
    slices: Sequence[slice],
) -> None:
    """Pass 1 over one block of training gradients (its rows' ``squared_norms``): adds
    ``sum_i c_qi g_il`` to each layer's ``corrections[l]``, in the gradients' dtype."""
    denominators = (lambdas + squared_norms).to(block)
    for layer_index, s in enumerate(slices):
        layer_block = block[:, s]
        coefficients = (query_grads[:, s] @ layer_block.T).div_(denominators[:, layer_index])
        corrections[layer_index].addmm_(coefficients, layer_block)


def precondition(
    query_grads: torch.Tensor,
    corrections: Sequence[torch.Tensor],
    lambdas: torch.Tensor,
    n_train: int,
    slices: Sequence[slice],
) -> torch.Tensor:
    """``H^-1 Q`` per layer, concatenated: ``(Q_l - corrections_l / n) / lambda_l``."""
    return torch.cat(
        [
            (query_grads[:, s] - correction / n_train) / float(lambdas[layer_index])
            for layer_index, (s, correction) in enumerate(zip(slices, corrections, strict=True))
        ],
        dim=1,
    )


def datainf_scores(
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    queries: Sequence[EncodedPair],
    damping: float | None,
    batch_size: int,
    work_dir: Path,
    progress: Callable[[float], None],
    gradient_memory_bytes: int = DEFAULT_GRADIENT_MEMORY_BYTES,
) -> torch.Tensor:
    """``[n_queries, n_train]`` float64, positive = helpful; ``damping`` overrides every lambda_l.

    ``gradient_memory_bytes``: training gradients kept in memory at once (0: one batch)."""
    if gradient_memory_bytes < 0:
        raise ValueError(f"gradient_memory_bytes must be >= 0, got {gradient_memory_bytes}")
    layers = lora_layers(model)
    slices = layer_slices(layers)
    n_train, n_queries = len(train), len(queries)
    width = slices[-1].stop
    row_bytes = width * layers[0].module.weight.element_size()
    rows = block_rows(gradient_memory_bytes, row_bytes, batch_size, n_train)
    blocks = _GradientBlocks(work_dir / f"datainf-{uuid.uuid4().hex}", -(-n_train // rows))
    n_steps = -(-n_queries // batch_size) + -(-n_train // batch_size) + 2 * blocks.count
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        progress(done / n_steps)

    try:
        with lora_grad_enabled(layers):
            query_parts = []
            for _, grads in batched_gradients(model, layers, queries, pad_token_id, batch_size):
                query_parts.append(grads.detach())
                advance()
            query_grads = torch.cat(query_parts)
            del query_parts
            # |g_il|^2 per example and layer: [n_train, n_layers], O(n), reused by pass 1.
            squared_norms = torch.empty(n_train, len(layers), dtype=torch.float64)
            for start, grads in batched_gradients(model, layers, train, pad_token_id, batch_size):
                index, offset = divmod(start, rows)
                if offset == 0:  # a new block: the previous one leaves memory first
                    blocks.release()
                    block = grads.new_empty(min(rows, n_train - start), width)
                count = grads.shape[0]
                block[offset : offset + count] = grads.detach()
                squared_norms[start : start + count] = layer_squared_norms(grads.detach(), slices)
                if offset + count == block.shape[0]:
                    blocks.store(index, block)
                advance()
        lambdas = datainf_lambdas(squared_norms, layers, damping)

        # Matrix products in the gradients' dtype (float32 for a float32 model: half the time
        # of float64, and each dot product is over one layer's few hundred entries); lambdas,
        # norms and scores in float64. Pass 1 (last block first: it is the one in memory):
        # sum_i c_qi g_i per layer.
        corrections = [query_grads.new_zeros(n_queries, s.stop - s.start) for s in slices]
        for index in reversed(range(blocks.count)):
            block = blocks.get(index)
            first = index * rows
            norms = squared_norms[first : first + block.shape[0]]
            add_corrections(corrections, query_grads, block, lambdas, norms, slices)
            del block  # only ``blocks`` holds it: one block in memory
            advance()
        preconditioned = precondition(query_grads, corrections, lambdas, n_train, slices)
        del corrections, query_grads

        # Pass 2 (first block first: pass 1 ended on it): the scores, one matmul per block
        # over all layers.
        scores = torch.empty(n_queries, n_train, dtype=torch.float64)
        for index in range(blocks.count):
            block = blocks.get(index)
            first = index * rows
            scores[:, first : first + block.shape[0]] = (preconditioned @ block.T).cpu()
            del block
            advance()
        return scores
    finally:
        shutil.rmtree(blocks.directory, ignore_errors=True)


@dataclass(frozen=True)
class DataInfTrainSide:
    """The training side of DataInf's scores, kept in memory so that repeated queries only need
    their own gradients (``gpu_core.query`` keeps one per warm session): the training gradients
    in one block, their per-layer squared norms and the lambdas."""

    gradients: torch.Tensor  # [n_train, width], the model's device and dtype
    squared_norms: torch.Tensor  # [n_train, n_layers] float64
    lambdas: torch.Tensor  # [n_layers] float64

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gradients, self.squared_norms, self.lambdas))

    def scores(
        self, model: nn.Module, pad_token_id: int, queries: Sequence[EncodedPair], batch_size: int
    ) -> torch.Tensor:
        """``[n_queries, n_train]`` float64, as :func:`datainf_scores` gives them when the
        training gradients fit one block."""
        layers = lora_layers(model)
        slices = layer_slices(layers)
        query_grads = stacked_gradients(model, layers, queries, pad_token_id, batch_size)
        corrections = [query_grads.new_zeros(len(queries), s.stop - s.start) for s in slices]
        add_corrections(corrections, query_grads, self.gradients, self.lambdas, self.squared_norms, slices)
        preconditioned = precondition(query_grads, corrections, self.lambdas, self.gradients.shape[0], slices)
        return (preconditioned @ self.gradients.T).cpu().to(torch.float64)


def datainf_train_side(
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    damping: float | None,
    batch_size: int,
    progress: Callable[[float], None],
) -> DataInfTrainSide:
    """One pass over the training set: its gradients in memory (``len(train) x width`` in the
    model's dtype; the caller bounds it), their squared norms and lambda_l as
    :func:`datainf_scores` computes them."""
    layers = lora_layers(model)
    slices = layer_slices(layers)
    gradients = stacked_gradients(model, layers, train, pad_token_id, batch_size, progress)
    # Batch by batch, as datainf_scores sums them.
    squared_norms = torch.cat(
        [
            layer_squared_norms(gradients[start : start + batch_size], slices)
            for start in range(0, len(train), batch_size)
        ]
    )
    return DataInfTrainSide(gradients, squared_norms, datainf_lambdas(squared_norms, layers, damping))
