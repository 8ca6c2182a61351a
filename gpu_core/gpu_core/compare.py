"""Two to four experiments side by side: what differs in their specs, their metrics, loss curves
and answers, and, for runs on the same data, how far their influence scores agree.

Pure functions of stored specs and results (plain JSON objects as the scheduler keeps them), so
the gateway answers ``GET /api/compare`` without loading a model.
"""

from __future__ import annotations

import hashlib
import json
from itertools import combinations
from typing import Any

import numpy as np

# Labels name an experiment; they are not part of what makes runs differ.
_LABELS = ("name", "tags", "note")
_DATA = ("training_data", "eval_data")
EVALUATIONS = ("base", "few_shot", "finetuned")


def data_fingerprint(examples: list[dict[str, Any]]) -> str:
    """A short digest of a list of examples (ids and texts): equal lists, equal digests."""
    text = json.dumps(examples, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key in sorted(value):
            _flatten(value[key], f"{prefix}.{key}" if prefix else key, out)
    else:
        out[prefix] = value


def _config(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as dotted fields, each data list as its size and digest."""
    flat: dict[str, Any] = {}
    _flatten({k: v for k, v in spec.items() if k not in _LABELS + _DATA}, "", flat)
    for field in _DATA:
        examples = spec.get(field) or []
        flat[field] = f"{len(examples)} examples ({data_fingerprint(examples)})"
    return flat


def config_diff(specs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each field whose value is not the same in every spec, with its value per spec (None
    where a spec lacks it)."""
    configs = [_config(spec) for spec in specs]
    fields = sorted({field for config in configs for field in config})
    diff = {}
    for field in fields:
        values = [config.get(field) for config in configs]
        if any(value != values[0] for value in values[1:]):
            diff[field] = values
    return diff


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their mean rank (as Spearman's coefficient needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation; None when it is undefined (under 2 values, or a constant)."""
    if len(a) != len(b) or len(a) < 2:
        return None
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def net_influence(influence: dict[str, Any]) -> dict[str, float] | None:
    """Each training example's influence summed over the eval examples; None without the
    inline score matrix."""
    scores = influence.get("scores")
    if scores is None:
        return None
    totals = np.asarray(scores, dtype=np.float64).sum(axis=0)
    return dict(zip(influence["train_ids"], totals.tolist(), strict=True))


def top_k_overlap(first: dict[str, Any], second: dict[str, Any]) -> dict[str, float]:
    """Per eval example, the share of the most helpful training examples the two runs have in
    common (of the shorter of the two lists)."""
    overlap = {}
    for eval_id, top in first.get("top_k", {}).items():
        other = second.get("top_k", {}).get(eval_id)
        if other is None:
            continue
        a = [item["id"] for item in top["helpful"]]
        b = [item["id"] for item in other["helpful"]]
        k = min(len(a), len(b))
        if k:
            overlap[eval_id] = len(set(a[:k]) & set(b[:k])) / k
    return overlap


def influence_agreement(
    ids: list[str], specs: list[dict[str, Any]], results: list[dict[str, Any] | None]
) -> dict[str, Any]:
    """Per pair of runs: top-k overlap per eval example and the Spearman correlation of net
    influence per training example. ``available`` False, with the reason, where the runs
    cannot be compared (different data, a run without a result)."""
    if any(result is None for result in results):
        return {
            "available": False,
            "reason": "every run needs a result (not all have completed)",
            "pairs": [],
        }
    for field in _DATA:
        if len({data_fingerprint(spec.get(field) or []) for spec in specs}) > 1:
            words = field.replace("_", " ")
            return {"available": False, "reason": f"the runs used different {words}", "pairs": []}
    pairs = []
    for i, j in combinations(range(len(ids)), 2):
        first, second = results[i]["influence"], results[j]["influence"]  # type: ignore[index]
        overlap = top_k_overlap(first, second)
        net_a, net_b = net_influence(first), net_influence(second)
        rho = None
        if net_a is not None and net_b is not None:
            train_ids = [train_id for train_id in net_a if train_id in net_b]
            rho = spearman([net_a[t] for t in train_ids], [net_b[t] for t in train_ids])
        pairs.append(
            {
                "runs": [ids[i], ids[j]],
                "methods": [first["method"], second["method"]],
                "top_k_overlap": overlap,
                "mean_top_k_overlap": float(np.mean(list(overlap.values()))) if overlap else None,
                "net_influence_spearman": rho,
            }
        )
    return {"available": True, "reason": None, "pairs": pairs}


def _answers(eval_id: str, result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    answers: dict[str, Any] = {}
    for evaluation in EVALUATIONS:
        for outcome in result["eval_results"][evaluation]["examples"]:
            if outcome["id"] == eval_id:
                answers[evaluation] = {key: outcome[key] for key in ("output", "exact_match", "loss")}
    return answers


def _eval_texts(spec: dict[str, Any]) -> dict[str, dict[str, str]]:
    texts = {}
    for example in spec.get("eval_data") or []:
        if example.get("messages"):
            turns = example["messages"]
            prompt = "\n".join(turn["content"] for turn in turns[:-1])
            expected = turns[-1]["content"]
        else:
            prompt, expected = example.get("prompt", ""), example.get("expected", "")
        texts[example["id"]] = {"prompt": prompt, "expected": expected}
    return texts


def compare_experiments(
    ids: list[str], specs: list[dict[str, Any]], results: list[dict[str, Any] | None]
) -> dict[str, Any]:
    """The comparison of runs ``ids`` (in that order) from their stored specs and results
    (None: the run has not completed)."""
    texts = [_eval_texts(spec) for spec in specs]
    eval_ids = list(dict.fromkeys(eval_id for run in texts for eval_id in run))
    examples = []
    for eval_id in eval_ids:
        known = next(run[eval_id] for run in texts if eval_id in run)
        examples.append(
            {
                "id": eval_id,
                "prompt": known["prompt"],
                "expected": known["expected"],
                "answers": [
                    _answers(eval_id, result) if eval_id in run else None
                    for run, result in zip(texts, results, strict=True)
                ],
            }
        )
    return {
        "ids": ids,
        "config_diff": config_diff(specs),
        "metrics": {
            evaluation: [
                result["eval_results"][evaluation]["metrics"] if result is not None else None
                for result in results
            ]
            for evaluation in EVALUATIONS
        },
        "loss_curves": [
            [{"step": p["step"], "loss": p["loss"]} for p in result["training"]["loss_curve"]]
            if result is not None
            else []
            for result in results
        ],
        "examples": examples,
        "influence_agreement": influence_agreement(ids, specs, results),
    }
