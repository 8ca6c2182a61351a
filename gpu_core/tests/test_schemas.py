"""Every validation rule of the spec gives an error naming the field and the rule."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gpu_core.schemas import ExperimentSpec, SpecLimits


def minimal() -> dict[str, Any]:
    return {
        "training_data": [{"prompt": "a>", "completion": "a"}, {"prompt": "b>", "completion": "b"}],
        "eval_data": [{"prompt": "a>", "expected": "a"}],
    }


def rejection(raw: dict[str, Any], limits: SpecLimits | None = None) -> str:
    context = {"limits": limits} if limits is not None else None
    with pytest.raises(ValidationError) as caught:
        ExperimentSpec.model_validate(raw, context=context)
    return str(caught.value)


def test_defaults_and_generated_ids() -> None:
    spec = ExperimentSpec.model_validate(minimal())
    assert [e.id for e in spec.training_data] == ["t1", "t2"]
    assert [e.id for e in spec.eval_data] == ["e1"]
    assert spec.hyperparams.epochs == 3 and spec.hyperparams.target_modules == ["q_proj", "v_proj"]
    assert spec.influence_method == "tracin" and spec.few_shot_k == 3


def test_generated_ids_avoid_given_ones() -> None:
    raw = minimal()
    raw["training_data"][1]["id"] = "t1"
    spec = ExperimentSpec.model_validate(raw)
    ids = [e.id for e in spec.training_data]
    assert ids[1] == "t1" and len(set(ids)) == 2


@pytest.mark.parametrize("field", ["training_data", "eval_data"])
def test_empty_data(field: str) -> None:
    raw = minimal()
    raw[field] = []
    message = rejection(raw)
    assert field in message and "at least one" in message


def test_duplicate_ids() -> None:
    raw = minimal()
    raw["training_data"][0]["id"] = raw["training_data"][1]["id"] = "same"
    message = rejection(raw)
    assert "training_data[1].id" in message and "duplicate id 'same'" in message


def test_duplicate_eval_ids() -> None:
    raw = minimal()
    raw["eval_data"] = [{"id": "q", "prompt": "a", "expected": "a"}] * 2
    assert "eval_data[1].id" in rejection(raw)


def test_unknown_method() -> None:
    raw = minimal()
    raw["influence_method"] = "shapley"
    message = rejection(raw)
    assert "influence_method" in message and "'tracin', 'datainf', 'kronfluence' or 'trackstar'" in message


def test_trackstar_and_projection_dim() -> None:
    raw = minimal()
    raw["influence_method"] = "trackstar"
    raw["influence"] = {"projection_dim": 4096, "projection_seed": 3}
    spec = ExperimentSpec.model_validate(raw)
    assert spec.influence_method == "trackstar" and spec.influence.projection_dim == 4096
    assert ExperimentSpec.model_validate(minimal()).influence.projection_dim is None
    raw["influence"] = {"projection_dim": 8}
    message = rejection(raw)
    assert "influence.projection_dim" in message and "greater than or equal to 16" in message


def test_text_longer_than_the_limit() -> None:
    raw = minimal()
    raw["training_data"][1]["prompt"] = "x" * 11
    message = rejection(raw, SpecLimits(max_text_chars=10))
    assert "training_data.1.prompt" in message and "the limit is 10" in message


def test_negative_epochs() -> None:
    raw = minimal()
    raw["hyperparams"] = {"epochs": -1}
    message = rejection(raw)
    assert "hyperparams.epochs" in message and "greater than or equal to 1" in message


@pytest.mark.parametrize(
    ("field", "limits"),
    [
        ("training_data", SpecLimits(max_train_examples=1)),
        ("eval_data", SpecLimits(max_eval_examples=1)),
    ],
)
def test_more_than_the_maximum_examples(field: str, limits: SpecLimits) -> None:
    raw = minimal()
    raw["eval_data"].append({"prompt": "b>", "expected": "b"})
    message = rejection(raw, limits)
    assert field in message and "has 2 examples; the limit is 1" in message


def test_unknown_field_is_named() -> None:
    raw = minimal()
    raw["hyperparams"] = {"learning_rat": 0.1}
    assert "hyperparams.learning_rat" in rejection(raw)


def test_parse_spec_names_every_problem_and_services_can_lift_size_limits() -> None:
    from gpu_core.schemas import NO_SIZE_LIMITS, SpecError, parse_spec

    long_text = "x" * 25_000
    raw = {
        "training_data": [{"prompt": long_text, "completion": "y"}],
        "eval_data": [{"prompt": "p", "expected": "e"}],
    }
    with pytest.raises(SpecError) as refused:
        parse_spec(raw)
    assert refused.value.problems == ["training_data.0.prompt: text is 25000 characters; the limit is 20000"]
    assert parse_spec(raw, NO_SIZE_LIMITS).training_data[0].id == "t1"
    with pytest.raises(SpecError, match="hyperparams.epochs"):
        parse_spec(b'{"training_data": [], "eval_data": [], "hyperparams": {"epochs": 0}}')


def test_null_texts_are_validation_errors_not_crashes() -> None:
    import pydantic

    from gpu_core.schemas import ExperimentSpec

    body = (
        b'{"training_data": [{"prompt": null, "messages": null, "completion": null, "id": null}, {}],'
        b' "eval_data": [{"expected": null}]}'
    )
    with pytest.raises(pydantic.ValidationError):
        ExperimentSpec.model_validate_json(body)


@pytest.mark.parametrize("name", ["q_proj,v_proj", ".*proj", "vision_tower.q_proj", ""])
def test_target_modules_must_be_module_names(name: str) -> None:
    raw = minimal()
    raw["hyperparams"] = {"target_modules": ["q_proj", name]}
    message = rejection(raw)
    assert "hyperparams.target_modules" in message and "is not a module name" in message
