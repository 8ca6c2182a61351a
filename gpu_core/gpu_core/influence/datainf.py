"""DataInf (Kwon et al., ICLR 2024), vectorised and streamed.

Per LoRA weight matrix l (lora_A and lora_B separately) with train gradients ``G [n, d_l]`` and
query gradients ``Q [m, d_l]``, the reference's Sherman-Morrison average
``hvp_l(q) = 1/(n lambda_l) sum_i [q - (q.g_i)/(lambda_l + |g_i|^2) g_i]`` is, for all queries
at once: ``K = Q G^T``, ``c = K / (lambda_l + rowsum(G^2))^T``, ``H^-1 Q = (Q - c G / n) / lambda_l``,
and the scores ``sum_l (H^-1 Q)_l G_l^T``. The damping follows the reference:
``lambda_l = 0.1 * mean squared gradient entry`` of layer l over the training set.

The reference stores ``-sum_l hvp_l . g_il`` (positive = harmful); we return ``+sum_l``
(positive = helpful), same magnitude and scale (no 1/n beyond the formula's).

The training gradients are computed once (one batched forward+backward pass over the training
set), written chunk by chunk to ``work_dir``, and streamed from there twice: once for ``c G``,
once for the scores. Memory: the query gradients and their ``c G`` accumulator plus one chunk.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from gpu_core.data import EncodedPair
from gpu_core.influence.gradients import (
    batched_gradients,
    layer_slices,
    lora_grad_enabled,
    lora_layers,
)

# The reference's lambda rule: (1 / lambda_const_param) x mean squared entry, lambda_const_param=10.
REFERENCE_DAMPING_SCALE = 0.1


class _GradientChunks:
    """Training-gradient chunks on disk under ``directory``, read back in order."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True)
        self.count = 0

    def append(self, grads: torch.Tensor) -> None:
        torch.save(grads, self.directory / f"chunk-{self.count:06d}.pt")
        self.count += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(self.count):
            yield torch.load(self.directory / f"chunk-{index:06d}.pt", weights_only=True)


def datainf_scores(
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    queries: Sequence[EncodedPair],
    damping: float | None,
    batch_size: int,
    work_dir: Path,
    progress: Callable[[float], None],
) -> torch.Tensor:
    """``[n_queries, n_train]`` float64, positive = helpful; ``damping`` overrides every lambda_l."""
    layers = lora_layers(model)
    slices = layer_slices(layers)
    n_train = len(train)
    n_batches = -(-len(queries) // batch_size) + 3 * -(-n_train // batch_size)
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        progress(done / n_batches)

    chunks = _GradientChunks(work_dir / f"datainf-{uuid.uuid4().hex}")
    try:
        with lora_grad_enabled(layers):
            query_parts = []
            for _, grads in batched_gradients(model, layers, queries, pad_token_id, batch_size):
                query_parts.append(grads.detach())
                advance()
            query_grads = torch.cat(query_parts)
            del query_parts
            # |g_il|^2 per example and layer: [n_train, n_layers], O(n) and reused by pass 1.
            squared_norms_parts = []
            for _, grads in batched_gradients(model, layers, train, pad_token_id, batch_size):
                grads = grads.detach()
                squares = grads.square()
                norms = torch.stack([squares[:, s].sum(dim=1) for s in slices], dim=1)
                squared_norms_parts.append(norms.to(device="cpu", dtype=torch.float64))
                chunks.append(grads)
                advance()
            squared_norms = torch.cat(squared_norms_parts)
            del squared_norms_parts
        if damping is not None:
            lambdas = torch.full((len(layers),), float(damping), dtype=torch.float64)
        else:
            sizes = torch.tensor([layer.numel for layer in layers], dtype=torch.float64)
            lambdas = REFERENCE_DAMPING_SCALE * squared_norms.sum(dim=0) / (n_train * sizes)
        if bool((lambdas <= 0).any()):
            raise ValueError("DataInf damping is zero: a LoRA layer has all-zero training gradients")

        # Matrix products in the gradients' dtype (float32 for a float32 model: half the time
        # of float64); lambdas and scores in float64.
        # Pass 1: sum_i c_qi g_i per layer, all layers in one [m, d] accumulator.
        correction = torch.zeros_like(query_grads)
        start = 0
        for grads in chunks:
            denominators = lambdas + squared_norms[start : start + grads.shape[0]]
            denominators = denominators.to(device=grads.device, dtype=grads.dtype)
            start += grads.shape[0]
            for index, s in enumerate(slices):
                layer_grads = grads[:, s]
                coefficients = (query_grads[:, s] @ layer_grads.T) / denominators[:, index]
                correction[:, s] += coefficients @ layer_grads
            advance()
        preconditioned = query_grads - correction / n_train
        for index, s in enumerate(slices):
            preconditioned[:, s] /= float(lambdas[index])
        del correction, query_grads

        # Pass 2: the scores, one matmul per chunk over all layers.
        scores = torch.empty(len(queries), n_train, dtype=torch.float64)
        start = 0
        for grads in chunks:
            scores[:, start : start + grads.shape[0]] = (preconditioned @ grads.T).cpu()
            start += grads.shape[0]
            advance()
        return scores
    finally:
        shutil.rmtree(chunks.directory, ignore_errors=True)
