"""A seeded sparse Johnson-Lindenstrauss projection (CountSketch) of per-example LoRA gradients.

Every coordinate ``j`` of the concatenated LoRA gradient (``d`` entries) is sent to one of ``k``
output coordinates, ``bucket(j)``, with a random sign: ``y[bucket(j)] += sign(j) x[j]``. Then
``E[<P x, P y>] = <x, y>`` with variance ``(|x|^2 |y|^2 + <x,y>^2 - 2 sum_j x_j^2 y_j^2) / k``,
the same as a dense Gaussian projection to ``k`` dimensions up to the last term, and the cost is
one pass over the gradient (``O(batch x d)``) instead of ``O(batch x d x k)``. What is stored is
``d`` bucket indices and signs (one sparse ``k x d_l`` matrix per LoRA matrix, ``d`` non-zeros
in all): the ``d x k`` matrix is never formed. Why this and not LoGra's Kronecker-factored
projection: docs/influence.md, "Choosing the projection" (``benchmarks/projection_choice.py``).

The buckets and signs of LoRA matrix ``l`` come from a CPU generator seeded with
``(seed, l)``, so the projection is the same on every device and run for the same seed and
layer shapes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

PROJECTION_KIND = "countsketch"
# Separates the generator streams of consecutive LoRA matrices of one seed.
_LAYER_STREAM_STRIDE = 1_000_003


class CountSketchProjection:
    """``project(gradients [batch, d]) -> [batch, dim]`` in float32, for layers of the given
    sizes (their slices of ``d`` in order)."""

    def __init__(
        self, layer_sizes: Sequence[int], dim: int, seed: int, device: torch.device | str = "cpu"
    ) -> None:
        if dim < 1:
            raise ValueError(f"projection_dim must be at least 1, got {dim}")
        if not layer_sizes or min(layer_sizes) < 1:
            raise ValueError("a projection needs at least one non-empty layer")
        self.dim = dim
        self.seed = seed
        self.layer_sizes = list(layer_sizes)
        self.input_dim = sum(self.layer_sizes)
        self._matrices = [
            _sketch_matrix(size, dim, seed * _LAYER_STREAM_STRIDE + index).to(device)
            for index, size in enumerate(self.layer_sizes)
        ]

    def project(self, gradients: torch.Tensor) -> torch.Tensor:
        if gradients.dim() != 2 or gradients.shape[1] != self.input_dim:
            raise ValueError(
                f"gradients have shape {tuple(gradients.shape)}; expected (batch, {self.input_dim})"
            )
        gradients = gradients.to(torch.float32)
        out = gradients.new_zeros(self.dim, gradients.shape[0])
        start = 0
        for size, matrix in zip(self.layer_sizes, self._matrices, strict=True):
            # [dim, d_l] sparse @ [d_l, batch] dense: a CSR SpMM, deterministic on CPU and CUDA.
            out += torch.sparse.mm(matrix, gradients[:, start : start + size].T.contiguous())
            start += size
        return out.T.contiguous()


def _sketch_matrix(size: int, dim: int, stream: int) -> torch.Tensor:
    """``[dim, size]`` CSR matrix with one +-1 per column, at a seeded random row."""
    generator = torch.Generator(device="cpu").manual_seed(stream % (2**63))
    buckets = torch.randint(0, dim, (size,), generator=generator)
    signs = torch.randint(0, 2, (size,), generator=generator).to(torch.float32).mul_(2).sub_(1)
    order = torch.argsort(buckets, stable=True)
    row_starts = torch.zeros(dim + 1, dtype=torch.int64)
    row_starts[1:] = torch.cumsum(torch.bincount(buckets, minlength=dim), dim=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # Built from sorted buckets, so the invariants hold by construction.
        return torch.sparse_csr_tensor(
            row_starts, order, signs[order], size=(dim, size), check_invariants=False
        )
