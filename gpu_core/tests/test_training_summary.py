"""The training-set summary and curation on the real pipeline: the artifact every experiment
writes, self-influence against gradients taken independently, the suspicion rank finding planted
noise, the paired statistics, and a curation run with a control."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.curate import noisy_cipher_task, task_spec
from gpu_core.curation import CurationRequest, paired_difference, run_curation
from gpu_core.influence import compute_influence
from gpu_core.influence.gradients import lora_grad_enabled, lora_layers, stacked_gradients
from gpu_core.jobs import CURATION, JobInputError, job_kind, make_payload, parse_payload
from gpu_core.pipeline import experiment_encoder, run_experiment_to_result
from gpu_core.runtime import attach_lora, load_model
from gpu_core.schemas import ExperimentResult, ExperimentSpec
from gpu_core.training import train_lora
from gpu_core.training_summary import (
    SUMMARY_NAME,
    FinalGradientFeatures,
    TrainingSetSummary,
    page,
    percentile_ranks,
    self_influence_and_loss,
    suspicion_scores,
)

N_TRAIN = 60
N_EVAL = N_TRAIN // 2  # every key of the cipher task once


@pytest.fixture(scope="module")
def experiment(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ExperimentSpec, ExperimentResult, dict, set[str]]:
    directory = tmp_path_factory.mktemp("summary")
    spec = task_spec("tracin", n_train=N_TRAIN)
    result = run_experiment_to_result(spec, directory)
    _, _, noisy = noisy_cipher_task(N_TRAIN, 0.10)
    return spec, result, json.loads((directory / SUMMARY_NAME).read_text()), noisy


def test_percentile_ranks_share_ties_and_suspicion_orients_each_signal() -> None:
    assert percentile_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [0.875, 0.25, 0.875, 0.5]
    # Example 0 is harmful, hard to fit and self-influential: the most suspect.
    suspicion = suspicion_scores(
        np.array([-5.0, 1.0, 2.0]), np.array([9.0, 1.0, 2.0]), np.array([3.0, 0.1, 0.2])
    )
    assert int(np.argmax(suspicion)) == 0
    assert suspicion[0] == pytest.approx(1.0)


def test_every_experiment_writes_its_summary_artifact(experiment) -> None:
    spec, result, data, _ = experiment
    rows = data["examples"]
    assert [row["id"] for row in rows] == [example.id for example in spec.training_data]
    assert SUMMARY_NAME in {artifact.name for artifact in result.artifacts}
    assert sorted(row["suspect_rank"] for row in rows) == list(range(1, N_TRAIN + 1))
    # Net influence is the score matrix's column sum (the matrix is inline at this size).
    scores = np.asarray(result.influence.scores)
    assert [row["net_influence"] for row in rows] == pytest.approx(scores.sum(axis=0).tolist(), rel=1e-5)
    assert rows[0]["text"] == f"{spec.training_data[0].prompt}\n{spec.training_data[0].completion}"
    assert "training_summary" in result.timings


def test_the_fine_tuned_model_learned_the_task_and_the_noise_is_flagged(experiment) -> None:
    _, result, data, noisy = experiment
    assert result.eval_results.finetuned.metrics.exact_match_rate >= 0.5
    summary = TrainingSetSummary.from_json(data)
    top = {summary.ids[j] for j in summary.order("suspect")[: len(noisy)]}
    assert len(top & noisy) / len(noisy) >= 0.5
    losses = dict(zip(summary.ids, summary.train_loss, strict=True))
    assert np.mean([losses[i] for i in noisy]) > np.mean([v for k, v in losses.items() if k not in noisy])


def test_pages_sort_by_each_signal(experiment) -> None:
    _, _, data, _ = experiment
    harmful, total = page(data, "harmful", 5, 0)
    assert total == N_TRAIN
    nets = [row["net_influence"] for row in harmful]
    assert nets == sorted(nets) and nets[0] == min(row["net_influence"] for row in data["examples"])
    suspects, _ = page(data, "suspect", 3, 2)
    assert [row["suspect_rank"] for row in suspects] == [3, 4, 5]
    with pytest.raises(ValueError, match="sort"):
        page(data, "newest", 5, 0)


def test_tracin_self_influence_is_the_summed_learning_rate_times_the_squared_gradient() -> None:
    spec = task_spec("tracin", n_train=12)
    loaded = load_model(spec.model_id, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded, spec.hyperparams)
    encoder = experiment_encoder(spec, loaded.tokenizer)
    pairs = [encoder.train_pair(example) for example in spec.training_data]
    training = train_lora(model, pairs, spec.hyperparams, loaded.tokenizer.pad_token_id, loaded.device)
    self_influence, losses = self_influence_and_loss(
        "tracin", model, loaded.tokenizer.pad_token_id, pairs, training.checkpoints, spec.influence, 4
    )
    layers = lora_layers(model)
    with lora_grad_enabled(layers):
        grads = stacked_gradients(model, layers, pairs, loaded.tokenizer.pad_token_id, 1).double()
    rate = sum(c.learning_rate for c in training.checkpoints)
    assert self_influence == pytest.approx((rate * grads.square().sum(dim=1)).numpy(), rel=1e-4)
    assert (losses > 0).all()


@pytest.mark.parametrize(
    ("method", "projection_dim"), [("tracin", None), ("tracin", 64), ("trackstar", None)]
)
def test_the_influence_pass_hands_the_summary_what_its_own_pass_computes(
    method: str, projection_dim: int | None, tmp_path
) -> None:
    """TracIn (exact and projected) and TrackStar take the final adapter's training gradients
    anyway; the summary's figures from their tap equal those of its own extra pass."""
    spec = task_spec(method, n_train=12, n_eval=2, projection_dim=projection_dim)
    spec.hyperparams.epochs = 2
    loaded = load_model(spec.model_id, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded, spec.hyperparams)
    encoder = experiment_encoder(spec, loaded.tokenizer)
    pairs = [encoder.train_pair(example) for example in spec.training_data]
    queries = [encoder.encode(example.turns, last_only=True) for example in spec.eval_data]
    pad = loaded.tokenizer.pad_token_id
    training = train_lora(model, pairs, spec.hyperparams, pad, loaded.device)
    gathered = FinalGradientFeatures(method, model, len(pairs), training.checkpoints)
    compute_influence(
        method,
        model,
        loaded.tokenizer,
        pairs,
        queries,
        training.checkpoints,
        spec.influence,
        4,
        tmp_path,
        final_tap=gathered,
    )
    assert gathered.complete
    args = (method, model, pad, pairs, training.checkpoints, spec.influence, 4)
    tapped_self, tapped_loss = self_influence_and_loss(*args, gathered=gathered)
    own_self, own_loss = self_influence_and_loss(*args)
    assert tapped_self == pytest.approx(own_self, rel=1e-4)
    assert tapped_loss == pytest.approx(own_loss, rel=1e-5)


def test_paired_difference_interval_and_p_value() -> None:
    clear = paired_difference(np.full(20, -0.5) + np.linspace(-0.05, 0.05, 20))
    assert clear.mean == pytest.approx(-0.5) and clear.ci_high < 0 and clear.p_value < 0.001
    noise = paired_difference(np.array([0.1, -0.1, 0.2, -0.2, 0.05, -0.05]))
    assert noise.ci_low < 0 < noise.ci_high and noise.p_value > 0.5


def test_a_curation_request_must_fit_the_experiment(experiment) -> None:
    spec, result, _, _ = experiment
    payload = make_payload(CURATION, spec.model_dump(), {"drop_ids": ["t0", "nope"]}, result.model_dump())
    with pytest.raises(JobInputError, match="drop_ids: not training examples of this experiment: 'nope'"):
        parse_payload(payload)
    with pytest.raises(JobInputError, match="keep_ids"):
        parse_payload({**payload, "request": {"keep_ids": ["t0"], "drop_ids": ["t1"]}})
    assert job_kind(CURATION).needs_parent


@pytest.mark.slow
def test_dropping_the_noise_beats_dropping_at_random(experiment) -> None:
    spec, result, data, noisy = experiment
    loaded = load_model(spec.model_id, device=torch.device("cpu"))
    request = CurationRequest(drop_ids=sorted(noisy), controls=1, seeds=[0, 1])
    curated = run_curation(spec, result, request, loaded=loaded)
    assert [run.selection for run in curated.runs] == ["curated", "control-1"] * 2
    assert curated.selected_ids == sorted(noisy) and curated.kept == N_TRAIN - len(noisy)
    assert len(curated.control_selected_ids[0]) == len(noisy)
    assert curated.loss is not None and curated.loss.mean < 0
    assert curated.loss.n_pairs == N_EVAL
