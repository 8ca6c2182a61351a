"""Experiment specs for the artifact benchmarks: short texts on the tiny model."""

from __future__ import annotations

from typing import Any


def tracin_spec(n_train: int, n_eval: int) -> dict[str, Any]:
    """TracIn, 1 epoch, max_new_tokens 1, few_shot_k 0, short texts: the issue's 10,000 x 1,000 job
    at those sizes."""
    return {
        "model_id": "local/tiny-llama",
        "training_data": [
            {"id": f"t{i}", "prompt": f"{i % 97} + {i % 89} =", "completion": f" {i % 97 + i % 89}"}
            for i in range(n_train)
        ],
        "eval_data": [
            {"id": f"e{i}", "prompt": f"{i % 83} + {i % 79} =", "expected": f" {i % 83 + i % 79}"}
            for i in range(n_eval)
        ],
        "hyperparams": {"epochs": 1, "max_new_tokens": 1, "max_seq_len": 32},
        "few_shot_k": 0,
        "influence_method": "tracin",
    }
