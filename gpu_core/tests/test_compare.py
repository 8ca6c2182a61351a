"""gpu_core.compare on specs and results shaped as the scheduler stores them."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gpu_core.compare import compare_experiments, config_diff, spearman, top_k_overlap
from gpu_core.schemas import SpecError, parse_labels, parse_spec


def _spec(learning_rate: float, **extra: Any) -> dict[str, Any]:
    raw = {
        "training_data": [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(4)],
        "eval_data": [{"prompt": "q1", "expected": "a1"}, {"prompt": "q2", "expected": "a2"}],
        "hyperparams": {"learning_rate": learning_rate},
        **extra,
    }
    return parse_spec(raw).model_dump(mode="json")


def _result(scores: list[list[float]], outputs: list[str], losses: list[float]) -> dict[str, Any]:
    train_ids = ["t1", "t2", "t3", "t4"]
    eval_ids = ["e1", "e2"]

    def top(row: list[float]) -> dict[str, Any]:
        order = sorted(range(4), key=lambda j: -row[j])
        return {"helpful": [{"id": train_ids[j], "score": row[j]} for j in order[:2]], "harmful": []}

    def run(answers: list[str]) -> dict[str, Any]:
        examples = [
            {"id": e, "output": out, "exact_match": out == f"a{i + 1}", "loss": loss}
            for i, (e, out, loss) in enumerate(zip(eval_ids, answers, losses, strict=True))
        ]
        rate = sum(x["exact_match"] for x in examples) / 2
        return {
            "metrics": {"exact_match_rate": rate, "mean_loss": sum(losses) / 2, "n": 2},
            "examples": examples,
        }

    return {
        "eval_results": {"base": run(["x", "y"]), "few_shot": run(["x", "y"]), "finetuned": run(outputs)},
        "influence": {
            "method": "tracin",
            "train_ids": train_ids,
            "eval_ids": eval_ids,
            "scores": scores,
            "top_k": {e: top(row) for e, row in zip(eval_ids, scores, strict=True)},
        },
        "training": {"loss_curve": [{"step": 1, "epoch": 1.0, "loss": losses[0], "learning_rate": 0.1}]},
    }


def test_config_diff_names_only_what_differs_and_ignores_labels() -> None:
    first = _spec(1e-3, name="low", tags=["sweep"])
    second = _spec(4e-3, name="high", tags=["sweep", "x"], note="n")
    assert config_diff([first, second]) == {"hyperparams.learning_rate": [1e-3, 4e-3]}
    other_data = copy.deepcopy(second)
    other_data["training_data"][0]["completion"] = " changed"
    diff = config_diff([first, other_data])
    assert set(diff) == {"hyperparams.learning_rate", "training_data"}
    assert diff["training_data"][0] != diff["training_data"][1]
    assert all(value.startswith("4 examples (") for value in diff["training_data"])


def test_spearman_matches_known_values_and_handles_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take their mean rank: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4).
    assert spearman([5, 5, 6, 7], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1], [1]) is None


def test_top_k_overlap_per_eval_example() -> None:
    a = _result([[4, 3, 2, 1], [1, 2, 3, 4]], ["a1", "a2"], [0.1, 0.2])["influence"]
    b = _result([[4, 1, 3, 2], [4, 3, 2, 1]], ["a1", "a2"], [0.1, 0.2])["influence"]
    # e1: {t1, t2} vs {t1, t3}; e2: {t4, t3} vs {t1, t2}.
    assert top_k_overlap(a, b) == {"e1": 0.5, "e2": 0.0}


def test_compare_two_runs_on_the_same_data() -> None:
    specs = [_spec(1e-3, name="low"), _spec(4e-3, name="high")]
    scores = [[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]
    results = [
        _result(scores, ["a1", "no"], [0.5, 0.7]),
        _result([[2 * v for v in row] for row in scores], ["a1", "a2"], [0.2, 0.3]),
    ]
    comparison = compare_experiments(["A", "B"], specs, results)
    assert comparison["config_diff"] == {"hyperparams.learning_rate": [1e-3, 4e-3]}
    assert [m["exact_match_rate"] for m in comparison["metrics"]["finetuned"]] == [0.5, 1.0]
    assert comparison["loss_curves"] == [[{"step": 1, "loss": 0.5}], [{"step": 1, "loss": 0.2}]]
    second = comparison["examples"][1]
    assert (second["id"], second["prompt"], second["expected"]) == ("e2", "q2", "a2")
    assert [answers["finetuned"]["output"] for answers in second["answers"]] == ["no", "a2"]
    agreement = comparison["influence_agreement"]
    assert agreement["available"]
    (pair,) = agreement["pairs"]
    # Scaled scores: the same rankings, so full overlap and a rank correlation of 1.
    assert pair["runs"] == ["A", "B"] and pair["mean_top_k_overlap"] == 1.0
    # Net influence is 5 for every training example: constant, so no correlation exists.
    assert pair["net_influence_spearman"] is None

    skewed = _result([[4.0, 3.0, 2.0, 0.0], [1.0, 2.0, 3.0, 1.0]], ["a1", "a2"], [0.2, 0.3])
    pair = compare_experiments(["A", "B"], specs, [results[0], skewed])["influence_agreement"]["pairs"][0]
    # Net influence: (5, 5, 5, 5) vs (5, 5, 5, 1): constant on one side.
    assert pair["net_influence_spearman"] is None
    varied = _result([[4.0, 3.0, 2.0, 1.0], [3.0, 2.0, 3.0, 4.0]], ["a1", "a2"], [0.2, 0.3])
    reversed_ = _result([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]], ["a1", "a2"], [0.2, 0.3])
    reversed_["influence"]["scores"] = [[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 2.0, 1.0]]
    pair = compare_experiments(["A", "B"], specs, [varied, reversed_])["influence_agreement"]["pairs"][0]
    # Net (7, 5, 5, 5) vs (3, 5, 5, 5): opposite order.
    assert pair["net_influence_spearman"] == pytest.approx(-1.0)


def test_agreement_is_unavailable_on_different_data_or_without_a_result() -> None:
    base = _spec(1e-3)
    other = copy.deepcopy(base)
    other["eval_data"][0]["expected"] = "changed"
    result = _result([[1, 2, 3, 4], [4, 3, 2, 1]], ["a1", "a2"], [0.1, 0.1])
    different = compare_experiments(["A", "B"], [base, other], [result, result])["influence_agreement"]
    assert not different["available"] and "different eval data" in different["reason"]
    pending = compare_experiments(["A", "B"], [base, base], [result, None])
    assert not pending["influence_agreement"]["available"]
    assert pending["metrics"]["finetuned"][1] is None and pending["loss_curves"][1] == []
    assert pending["examples"][0]["answers"][1] is None


def test_labels_are_validated_at_submit_and_when_changed() -> None:
    spec = parse_spec({**_spec(1e-3), "name": "  lr sweep  ", "tags": ["a", "b", "a"], "note": "why"})
    assert (spec.name, spec.tags, spec.note) == ("lr sweep", ["a", "b"], "why")
    with pytest.raises(SpecError) as refused:
        parse_spec({**_spec(1e-3), "tags": ["two words"]})
    assert refused.value.problems[0].startswith("tags.0:")
    with pytest.raises(SpecError) as refused:
        parse_labels({"name": "x" * 201})
    assert refused.value.problems[0].startswith("name:")
    with pytest.raises(SpecError) as refused:
        parse_labels({"colour": "red"})
    assert refused.value.problems[0].startswith("colour:")
    assert parse_labels({"tags": ["x", "x"]}).tags == ["x"]
