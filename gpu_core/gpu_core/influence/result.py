"""Scores matrix -> ``InfluenceResult``: the top helpful / harmful training ids per eval id, the
heatmap submatrix of the largest magnitudes, and the whole matrix inline only when it is small
(the full matrix travels as the ``scores.npy`` artifact).

Everything works on numpy arrays, never on Python lists of the whole matrix: 1,000 x 10,000 takes
well under a second (gpu_core/tests/test_influence.py times nothing; docs/gpu_core.md has figures).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpu_core.schemas import Heatmap, InfluenceMethod, InfluenceResult, ScoredExample, TopInfluences

# n_eval x n_train at or under this travel inline in the result JSON as ``scores`` (about 0.4 MB of
# JSON at the limit, measured in docs/gpu_core.md); above it only scores.npy holds the matrix.
INLINE_SCORES_MAX_CELLS = 20_000
HEATMAP_MAX_EVAL = 50
HEATMAP_MAX_TRAIN = 200


def as_score_matrix(scores: Any, n_eval: int, n_train: int, method: str) -> np.ndarray:
    """``scores`` as a C-ordered float64 [n_eval, n_train] array; ValueError when it is not one."""
    if hasattr(scores, "detach"):  # a torch tensor
        scores = scores.detach().cpu().double().numpy()
    matrix = np.ascontiguousarray(np.asarray(scores, dtype=np.float64))
    expected = (n_eval, n_train)
    if matrix.ndim != 2 or matrix.shape != expected:
        raise ValueError(
            f"influence scores have shape {tuple(matrix.shape)}; expected (n_eval, n_train) = {expected}"
        )
    if not np.isfinite(matrix).all():
        raise ValueError(f"{method} influence scores contain NaN or infinite values")
    return matrix


def build_influence_result(
    method: InfluenceMethod, scores: Any, train_ids: list[str], eval_ids: list[str], top_k: int
) -> InfluenceResult:
    """``scores[i][j]``: influence of ``train_ids[j]`` on ``eval_ids[i]``, positive = helpful.

    Helpful lists the up to ``top_k`` largest strictly positive scores, harmful the up to
    ``top_k`` most negative ones (a zero score is neither); ties keep training order."""
    matrix = as_score_matrix(scores, len(eval_ids), len(train_ids), method)
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    top = {
        eval_id: TopInfluences(
            helpful=_ranked(matrix[i], train_ids, top_k, sign=1.0),
            harmful=_ranked(matrix[i], train_ids, top_k, sign=-1.0),
        )
        for i, eval_id in enumerate(eval_ids)
    }
    inline = matrix.tolist() if matrix.size <= INLINE_SCORES_MAX_CELLS else None
    return InfluenceResult(
        method=method,
        train_ids=train_ids,
        eval_ids=eval_ids,
        scores=inline,
        top_k=top,
        heatmap=build_heatmap(matrix, train_ids, eval_ids),
    )


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``values``, largest first, ties by lower index."""
    if k >= values.size:
        candidates = np.arange(values.size)
    else:
        kth = np.partition(values, values.size - k)[values.size - k]
        candidates = np.flatnonzero(values >= kth)
    order = np.lexsort((candidates, -values[candidates]))
    return candidates[order][:k]


def _ranked(row: np.ndarray, train_ids: list[str], top_k: int, sign: float) -> list[ScoredExample]:
    signed = row * sign
    return [
        ScoredExample(id=train_ids[j], score=float(row[j])) for j in _largest(signed, top_k) if signed[j] > 0
    ]


def build_heatmap(matrix: np.ndarray, train_ids: list[str], eval_ids: list[str]) -> Heatmap:
    """The submatrix of the at most 50 eval rows and 200 training columns with the largest
    absolute scores, each kept in input order."""
    magnitude = np.abs(matrix)
    rows = np.sort(_largest(magnitude.max(axis=1), HEATMAP_MAX_EVAL)) if matrix.size else np.arange(0)
    cols = np.sort(_largest(magnitude.max(axis=0), HEATMAP_MAX_TRAIN)) if matrix.size else np.arange(0)
    return Heatmap(
        eval_ids=[eval_ids[i] for i in rows],
        train_ids=[train_ids[j] for j in cols],
        scores=matrix[np.ix_(rows, cols)].tolist(),
    )
