"""Per-model hyperparameter presets in the catalog: the tiny model's are the ones it learns with
(examples/sample.json), every preset is a valid gpu_core Hyperparams."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from cost_model import catalog, lookup_model, model_cards
from cost_model.model_catalog import ModelCard
from gpu_core.schemas import Hyperparams

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sample.json"


def test_tiny_model_presets_are_the_sample_experiments_hyperparameters() -> None:
    sample = json.loads(SAMPLE.read_text())["hyperparams"]
    preset = lookup_model("local/tiny-llama").preset_hyperparams()
    assert preset.model_dump() == Hyperparams.model_validate(sample).model_dump()
    assert preset.epochs == 100 and preset.learning_rate == 0.004
    # The sample runs on the pretrained tiny model, whose presets are the same.
    assert json.loads(SAMPLE.read_text())["model_id"] == "local/tiny-chat"
    assert lookup_model("local/tiny-chat").preset_hyperparams() == preset


def test_every_catalog_model_has_full_presets_in_its_default_quantization() -> None:
    infos = {info.id: info for info in catalog("local")}
    for card in model_cards():
        presets = infos[card.id].presets
        assert set(presets) == set(Hyperparams.model_fields)
        assert presets["quantization"] == card.default_quantization
    # Pretrained models keep gpu_core's defaults; only the random-initialised one needs many epochs.
    assert infos["Qwen/Qwen2.5-7B"].presets["epochs"] == Hyperparams().epochs


def test_a_preset_outside_the_spec_bounds_is_refused_when_the_catalog_loads() -> None:
    card = lookup_model("local/tiny-llama").model_dump()
    with pytest.raises(ValidationError, match="learning_rate"):
        ModelCard.model_validate({**card, "presets": {"learning_rate": 0}})
