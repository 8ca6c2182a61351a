"""Influence methods without extra copies: Kronfluence on the live model (restored exactly),
DataInf recomputing gradients instead of spilling them to disk."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.toy import ToySetup, build_toy_setup
from gpu_core.influence.datainf import datainf_scores
from gpu_core.influence.ekfac import LoraLanguageModelingTask, kronfluence_scores

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy() -> ToySetup:
    return build_toy_setup(10, 4, dtype=torch.float64, lora_r=4, epochs=1, steps_per_epoch=2)


def _snapshot(model: Any) -> dict[str, Any]:
    return {
        "modules": [(name, type(module), id(module)) for name, module in model.named_modules()],
        "parameters": [
            (name, id(p), p.requires_grad, p.grad, p.detach().clone()) for name, p in model.named_parameters()
        ],
        "training": [(name, module.training) for name, module in model.named_modules()],
    }


def test_kronfluence_fits_on_the_live_model_and_restores_it(
    toy: ToySetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No copy of the base weights: the model kronfluence runs is the very object passed in,
    sharing its embedding storage; afterwards every module, parameter, requires_grad, .grad and
    train flag is as before."""
    live = toy.model
    live.train()  # a mode kronfluence's prepare_model changes
    marker = torch.zeros_like(next(p for p in live.parameters() if p.requires_grad))
    next(p for p in live.parameters() if p.requires_grad).grad = marker
    before = _snapshot(live)
    embedding_storage = live.get_input_embeddings().weight.data_ptr()
    seen: list[tuple[int, int]] = []
    original = LoraLanguageModelingTask.compute_train_loss

    def recording(self: Any, batch: Any, model: Any, sample: bool = False) -> torch.Tensor:
        seen.append((id(model), model.get_input_embeddings().weight.data_ptr()))
        return original(self, batch, model, sample)

    monkeypatch.setattr(LoraLanguageModelingTask, "compute_train_loss", recording)
    scores = kronfluence_scores(
        live, toy.tokenizer.pad_token_id, toy.train, toy.queries, None, 5, tmp_path, lambda _f: None
    )
    assert scores.shape == (len(toy.queries), len(toy.train))
    assert seen and set(seen) == {(id(live), embedding_storage)}
    after = _snapshot(live)
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    for (name, pid, flag, grad, value), (name2, pid2, flag2, grad2, value2) in zip(
        before["parameters"], after["parameters"], strict=True
    ):
        assert (name, pid, flag) == (name2, pid2, flag2)
        assert grad is grad2
        assert torch.equal(value, value2)
    live.eval()


def test_kronfluence_restores_the_model_after_an_error(toy: ToySetup, tmp_path: Path) -> None:
    before = _snapshot(toy.model)
    with pytest.raises(ValueError):
        # kronfluence refuses a negative batch size after the model was prepared
        kronfluence_scores(
            toy.model, toy.tokenizer.pad_token_id, toy.train, toy.queries, None, -1, tmp_path, lambda _f: None
        )
    after = _snapshot(toy.model)
    assert after["modules"] == before["modules"]
    assert [p[:3] for p in after["parameters"]] == [p[:3] for p in before["parameters"]]
    assert list(tmp_path.iterdir()) == []


def test_datainf_with_a_tiny_memory_budget_writes_nothing_to_disk(
    toy: ToySetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the budget the gradients are recomputed, never spilled: no file appears in the
    working directory or the temp directory, torch.save is never called, and the scores are the
    unbudgeted ones."""
    pad = toy.tokenizer.pad_token_id
    unbudgeted = datainf_scores(toy.model, pad, toy.train, toy.queries, None, 3, lambda _f: None)
    watched = tmp_path / "watched"
    watched.mkdir()
    monkeypatch.chdir(watched)
    monkeypatch.setattr(tempfile, "tempdir", str(watched))
    monkeypatch.setenv("TMPDIR", str(watched))

    def no_save(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("DataInf wrote a tensor to disk")

    monkeypatch.setattr(torch, "save", no_save)
    budgeted = datainf_scores(
        toy.model, pad, toy.train, toy.queries, None, 3, lambda _f: None, gradient_memory_bytes=1
    )
    assert list(watched.iterdir()) == []
    assert float((budgeted - unbudgeted).abs().max() / unbudgeted.abs().max()) < 1e-5
