"""The influence method table: every method the spec accepts is registered once, with the
capabilities the artifact plan and the cost model read; the table needs no torch."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest

from gpu_core.influence_methods import DEFAULT_TRACKSTAR_DIM, INFLUENCE_METHODS, influence_method
from gpu_core.schemas import InfluenceMethod


def test_every_method_the_spec_accepts_is_registered_once() -> None:
    assert tuple(INFLUENCE_METHODS) == get_args(InfluenceMethod)
    assert all(name == entry.name for name, entry in INFLUENCE_METHODS.items())


def test_unknown_method_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown influence method 'lissa'; expected one of tracin, datainf"):
        influence_method("lissa")


def test_gradient_index_and_checkpoints_per_method() -> None:
    tracin, datainf, kronfluence, trackstar = (influence_method(n) for n in get_args(InfluenceMethod))
    assert (tracin.index_dim(None), tracin.index_dim(256)) == (None, 256)
    assert (trackstar.index_dim(None), trackstar.index_dim(256)) == (DEFAULT_TRACKSTAR_DIM, 256)
    assert datainf.index_dim(256) is None and kronfluence.index_dim(256) is None
    assert [m.checkpoints_scored(3) for m in (tracin, datainf, kronfluence, trackstar)] == [3, 1, 1, 1]
    assert [m.name for m in INFLUENCE_METHODS.values() if m.adam_normalised] == ["trackstar"]
    assert [m.name for m in INFLUENCE_METHODS.values() if m.uses_damping] == ["datainf", "kronfluence"]


def test_the_table_imports_no_torch() -> None:
    probe = "import sys, gpu_core.influence_methods; assert not {'numpy', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", probe], check=True)
