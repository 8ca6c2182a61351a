"""The model size the scheduler routes by is the cost model's: the same card the estimate prices."""

from __future__ import annotations

import pytest

from cost_model import ModelCard, model_cards
from scheduler.providers import model_params_b


@pytest.mark.parametrize("card", model_cards(), ids=lambda card: card.id)
def test_every_catalog_model_and_alias_routes_by_its_catalog_size(card: ModelCard) -> None:
    for model_id in (card.id, *card.aliases, f"{card.id}@main"):
        assert model_params_b(model_id) == card.params_b


def test_a_model_outside_the_catalog() -> None:
    assert model_params_b("someone/their-model-13B-chat") == 13.0
    assert model_params_b("someone/small-270m") == pytest.approx(0.27)
    # No size anywhere: 0 lets the provider pick its default GPU pool.
    assert model_params_b("someone/their-model") == 0.0
