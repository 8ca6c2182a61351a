"""Scores matrix -> ``InfluenceResult`` with the top helpful / harmful training ids per eval id."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gpu_core.schemas import InfluenceResult, ScoredExample, TopInfluences


def build_influence_result(
    method: str, scores: Any, train_ids: list[str], eval_ids: list[str], top_k: int
) -> InfluenceResult:
    """``scores[i][j]``: influence of ``train_ids[j]`` on ``eval_ids[i]``, positive = helpful.

    Helpful lists the up to ``top_k`` largest strictly positive scores, harmful the up to
    ``top_k`` most negative ones (a zero score is neither); ties keep training order."""
    matrix = torch.as_tensor(scores, dtype=torch.float64)
    expected = (len(eval_ids), len(train_ids))
    if matrix.dim() != 2 or tuple(matrix.shape) != expected:
        raise ValueError(
            f"influence scores have shape {tuple(matrix.shape)}; expected (n_eval, n_train) = {expected}"
        )
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{method} influence scores contain NaN or infinite values")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    rows = matrix.tolist()
    top = {
        eval_id: _top_influences(row, train_ids, top_k) for eval_id, row in zip(eval_ids, rows, strict=True)
    }
    return InfluenceResult(method=method, train_ids=train_ids, eval_ids=eval_ids, scores=rows, top_k=top)


def _top_influences(row: Sequence[float], train_ids: Sequence[str], top_k: int) -> TopInfluences:
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    helpful = [ScoredExample(id=train_ids[j], score=row[j]) for j in order[:top_k] if row[j] > 0]
    harmful_order = sorted(range(len(row)), key=lambda j: (row[j], j))
    harmful = [ScoredExample(id=train_ids[j], score=row[j]) for j in harmful_order[:top_k] if row[j] < 0]
    return TopInfluences(helpful=helpful, harmful=harmful)
