"""Shared fixtures: the copy task (``x>`` -> ``x`` over ten letters) that the tiny model learns in
a few seconds, as a spec the tests shrink or change."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

COPY_TASK_SPEC = Path(__file__).parent / "data" / "copy_task_64x16.json"


@pytest.fixture(scope="session")
def copy_task() -> dict[str, Any]:
    return json.loads(COPY_TASK_SPEC.read_text())


@pytest.fixture
def make_spec(copy_task: dict[str, Any]) -> Callable[..., Any]:
    """``make_spec(n_train=64, n_eval=16, method="tracin", **hyperparams)`` -> ExperimentSpec."""
    from gpu_core.schemas import ExperimentSpec

    def make(n_train: int = 64, n_eval: int = 16, method: str = "tracin", **hyperparams: Any) -> Any:
        raw = copy.deepcopy(copy_task)
        raw["training_data"] = raw["training_data"][:n_train]
        raw["eval_data"] = raw["eval_data"][:n_eval]
        raw["influence_method"] = method
        raw["hyperparams"].update(hyperparams)
        return ExperimentSpec.model_validate(raw)

    return make
