"""Planted-duplicate data sets, where the right influence answer is known: each eval example is an
exact copy of one training example (random letter strings the tiny model memorises), so that
example should rank first and removing it should hurt its copy most. Used by the counterfactual
tests, ``make bench-counterfactual`` and the end-to-end check through the stack."""

from __future__ import annotations

from typing import Any

from gpu_core.influence.toy import random_pairs


def duplicate_of(eval_index: int, n_train: int, n_eval: int) -> int:
    """The training example that eval example ``eval_index`` copies."""
    return eval_index * n_train // n_eval


def planted_duplicate_spec(
    method: str, n_train: int, n_eval: int, epochs: int = 40, seed: int = 0
) -> dict[str, Any]:
    """The experiment spec as JSON: train ids ``t0..``, eval ids ``e0..`` (``e{i}`` copies
    ``t{duplicate_of(i)}``), no few-shot, lr 0.01, top 3 kept per eval example."""
    train = [
        {"id": f"t{i}", "prompt": prompt, "completion": completion}
        for i, (prompt, completion) in enumerate(random_pairs(n_train, seed=seed))
    ]
    evals = [
        {
            "id": f"e{i}",
            "prompt": train[duplicate_of(i, n_train, n_eval)]["prompt"],
            "expected": train[duplicate_of(i, n_train, n_eval)]["completion"],
        }
        for i in range(n_eval)
    ]
    return {
        "training_data": train,
        "eval_data": evals,
        "few_shot_k": 0,
        "influence_method": method,
        "hyperparams": {
            "epochs": epochs,
            "learning_rate": 0.01,
            "batch_size": 8,
            "max_seq_len": 32,
            "max_new_tokens": 6,
            "seed": seed,
        },
        "influence": {"top_k": 3},
    }
