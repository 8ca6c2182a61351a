"""Planted-duplicate data sets, where the right influence answer is known: each eval example is an
exact copy of one training example (random letter strings the tiny model memorises), so that
example should rank first and removing it should hurt its copy most. Used by the counterfactual
tests, ``make bench-counterfactual`` and the end-to-end check through the stack."""

from __future__ import annotations

from typing import Any

from benchmarks.toy import random_pairs


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


def stand_in_result(spec: dict[str, Any], method: str = "tracin") -> dict[str, Any]:
    """An ExperimentResult (JSON) for ``spec`` that ranks each eval example's planted duplicate
    first, as a correct method would, without running the experiment: lets tests of the
    services and workers run a counterfactual check (which retrains from scratch) quickly. Its
    fine-tuned losses and answers are placeholders."""
    train_ids = [example["id"] for example in spec["training_data"]]
    eval_ids = [example["id"] for example in spec["eval_data"]]
    n_train, n_eval = len(train_ids), len(eval_ids)
    scores = [
        [1.0 if j == duplicate_of(i, n_train, n_eval) else -0.1 for j in range(n_train)]
        for i in range(n_eval)
    ]
    top_k = {
        eval_id: {
            "helpful": [{"id": train_ids[duplicate_of(i, n_train, n_eval)], "score": 1.0}],
            "harmful": [
                {"id": train_ids[j], "score": -0.1}
                for j in range(n_train)
                if j != duplicate_of(i, n_train, n_eval)
            ][:1],
        }
        for i, eval_id in enumerate(eval_ids)
    }
    run = {
        "metrics": {"exact_match_rate": 0.0, "mean_loss": 1.0, "n": n_eval},
        "examples": [
            {"id": eval_id, "output": "", "exact_match": False, "loss": 1.0} for eval_id in eval_ids
        ],
    }
    return {
        "eval_results": {"base": run, "few_shot": run, "finetuned": run},
        "influence": {
            "method": method,
            "train_ids": train_ids,
            "eval_ids": eval_ids,
            "scores": scores,
            "top_k": top_k,
        },
        "training": {"loss_curve": []},
        "timings": {},
        "environment": {},
    }
