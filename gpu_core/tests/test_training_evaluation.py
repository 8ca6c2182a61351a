"""The deterministic pieces of training and evaluation: schedule, data order, few-shot prompts."""

from __future__ import annotations

import pytest

from gpu_core.data import Encoder, few_shot_demonstrations
from gpu_core.schemas import TrainingExample
from gpu_core.tiny import build_tokenizer
from gpu_core.training import epoch_order, lr_factor


def test_schedule_warms_up_then_decays_without_a_zero_step() -> None:
    factor = lr_factor(20)
    factors = [factor(step) for step in range(20)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[2:] == sorted(factors[2:], reverse=True)
    assert min(factors) > 0


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    assert sorted(epoch_order(10, seed=0, epoch=1)) == list(range(10))
    assert epoch_order(10, seed=0, epoch=1) == epoch_order(10, seed=0, epoch=1)
    assert epoch_order(10, seed=0, epoch=1) != epoch_order(10, seed=0, epoch=2)


def test_raw_few_shot_is_k_seeded_demonstrations_one_per_line_before_the_prompt() -> None:
    data = [TrainingExample(id=f"t{i}", prompt=f"p{i}=", completion=f"c{i}") for i in range(10)]
    demos = few_shot_demonstrations(data, k=3, seed=0)
    encoder = Encoder(build_tokenizer(), "raw", 256)
    (role, prompt), answer = encoder.eval_turns([("user", "q="), ("assistant", "a")], demos)
    lines = prompt.split("\n")
    assert role == "user" and answer == ("assistant", "a")
    assert len(lines) == 4 and lines[-1] == "q="
    assert all(line in {f"p{i}=c{i}" for i in range(10)} for line in lines[:3])
    assert few_shot_demonstrations(data, k=3, seed=0) == demos
    assert few_shot_demonstrations(data, k=0, seed=0) == []
    assert len(few_shot_demonstrations(data, k=50, seed=0)) == 10
