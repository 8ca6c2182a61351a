"""DataInf (Kwon et al., ICLR 2024), vectorised, in memory up to a budget, spilled beyond it.

Per LoRA weight matrix l (lora_A and lora_B separately) with train gradients ``G [n, d_l]`` and
query gradients ``Q [m, d_l]``, the reference's Sherman-Morrison average
``hvp_l(q) = 1/(n lambda_l) sum_i [q - (q.g_i)/(lambda_l + |g_i|^2) g_i]`` is, for all queries
at once: ``K = Q G^T``, ``c = K / (lambda_l + rowsum(G^2))^T``, ``H^-1 Q = (Q - c G / n) / lambda_l``,
and the scores ``sum_l (H^-1 Q)_l G_l^T``. The damping follows the reference:
``lambda_l = 0.1 * mean squared gradient entry`` of layer l over the training set.

The reference stores ``-sum_l hvp_l . g_il`` (positive = harmful); we return ``+sum_l``
(positive = helpful), same magnitude and scale (no 1/n beyond the formula's).

The training gradients are needed three times: for lambda (which needs the whole set before
``c`` can be formed), for ``c G`` (pass 1), and for the scores (pass 2, which needs the finished
``c G``). When they fit ``gradient_memory_bytes`` (the usual case for LoRA) they are computed once
and kept in memory, and each product is one large matmul per layer. Beyond the budget nothing is
kept and nothing is written to disk: each pass recomputes them batch by batch (one
forward+backward pass over the training set per use; lambda's pass is skipped when ``damping``
is given), so memory is one batch of gradients plus the query side, whatever the number of
training examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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
# Training gradients kept in memory (on the model's device); beyond it they are recomputed per pass.
DEFAULT_GRADIENT_MEMORY_BYTES = 1 << 30


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
    progress: Callable[[float], None],
    gradient_memory_bytes: int = DEFAULT_GRADIENT_MEMORY_BYTES,
) -> torch.Tensor:
    """``[n_queries, n_train]`` float64, positive = helpful; ``damping`` overrides every lambda_l.

    ``gradient_memory_bytes``: the most training-gradient bytes kept in memory; a training set
    whose gradients exceed it is recomputed batch by batch in each pass instead."""
    if gradient_memory_bytes < 0:
        raise ValueError(f"gradient_memory_bytes must be >= 0, got {gradient_memory_bytes}")
    layers = lora_layers(model)
    slices = layer_slices(layers)
    n_train, n_queries = len(train), len(queries)
    width = slices[-1].stop
    kept = n_train * width * layers[0].module.weight.element_size() <= gradient_memory_bytes
    train_passes = 1 if kept else (2 if damping is not None else 3)
    n_steps = -(-n_queries // batch_size) + train_passes * -(-n_train // batch_size)
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        progress(done / n_steps)

    def train_gradients() -> Iterator[tuple[int, torch.Tensor]]:
        """One pass over the training set: ``(first row, [batch, width] gradients)``."""
        with lora_grad_enabled(layers):
            for start, grads in batched_gradients(model, layers, train, pad_token_id, batch_size):
                yield start, grads.detach()
                advance()

    with lora_grad_enabled(layers):
        query_parts = []
        for _, grads in batched_gradients(model, layers, queries, pad_token_id, batch_size):
            query_parts.append(grads.detach())
            advance()
    query_grads = torch.cat(query_parts)
    del query_parts
    # Matrix products in the gradients' dtype (float32 for a float32 model: half the time of
    # float64, and each dot product is over one layer's few hundred entries); lambdas, norms and
    # scores in float64.
    corrections = [query_grads.new_zeros(n_queries, s.stop - s.start) for s in slices]
    scores = torch.empty(n_queries, n_train, dtype=torch.float64)
    if kept:
        gradients = query_grads.new_empty(n_train, width)
        # |g_il|^2 per example and layer: [n_train, n_layers], O(n).
        squared_norms = torch.empty(n_train, len(layers), dtype=torch.float64)
        for start, grads in train_gradients():
            gradients[start : start + grads.shape[0]] = grads
            squared_norms[start : start + grads.shape[0]] = layer_squared_norms(grads, slices)
        lambdas = datainf_lambdas(squared_norms, layers, damping)
        add_corrections(corrections, query_grads, gradients, lambdas, squared_norms, slices)
        preconditioned = precondition(query_grads, corrections, lambdas, n_train, slices)
        scores[:] = (preconditioned @ gradients.T).cpu()
        return scores

    if damping is None:
        squared_norms = torch.empty(n_train, len(layers), dtype=torch.float64)
        for start, grads in train_gradients():
            squared_norms[start : start + grads.shape[0]] = layer_squared_norms(grads, slices)
        lambdas = datainf_lambdas(squared_norms, layers, damping)
    else:
        lambdas = datainf_lambdas(torch.empty(0, len(layers), dtype=torch.float64), layers, damping)
    # Pass 1: sum_i c_qi g_i per layer.
    for _start, grads in train_gradients():
        norms = layer_squared_norms(grads, slices)
        add_corrections(corrections, query_grads, grads, lambdas, norms, slices)
    preconditioned = precondition(query_grads, corrections, lambdas, n_train, slices)
    del corrections, query_grads
    # Pass 2: the scores, one matmul per batch over all layers.
    for start, grads in train_gradients():
        scores[:, start : start + grads.shape[0]] = (preconditioned @ grads.T).cpu()
    return scores


@dataclass(frozen=True)
class DataInfTrainSide:
    """The training side of DataInf's scores, kept in memory so that repeated queries only need
    their own gradients (``gpu_core.query`` keeps one per warm session): the training gradients
    in memory, their per-layer squared norms and the lambdas."""

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
        training gradients are kept in memory."""
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
