"""The training-set summary and curation on the real pipeline: the artifact every experiment
writes, self-influence against gradients taken independently, the suspicion rank finding planted
noise, the paired statistics, and a curation run with a control."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.curate import noisy_cipher_task, ranking_recalls, task_spec
from gpu_core.curation import CurationRequest, paired_difference, run_curation
from gpu_core.influence import compute_influence
from gpu_core.influence.gradients import lora_grad_enabled, lora_layers, model_device, stacked_gradients
from gpu_core.influence.projected import second_moment_denominators
from gpu_core.jobs import CURATION, JobInputError, job_kind, make_payload, parse_payload
from gpu_core.pipeline import experiment_encoder, run_experiment_to_result
from gpu_core.runtime import attach_lora, load_model
from gpu_core.schemas import ExperimentResult, ExperimentSpec
from gpu_core.training import train_lora
from gpu_core.training_summary import (
    SUMMARY_NAME,
    FinalGradientFeatures,
    TrainingSetSummary,
    eval_gradient_sum,
    final_adapter_signals,
    page,
    percentile_ranks,
    summarize,
    suspicion_scores,
    worst_harm_scores,
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
    # Example 0 is harmful overall and to one eval example, hard to fit and self-influential.
    suspicion = suspicion_scores(
        np.array([-5.0, 1.0, 2.0]),
        np.array([-3.0, 0.5, -1.0]),
        np.array([9.0, 1.0, 2.0]),
        np.array([3.0, 0.1, 0.2]),
    )
    assert int(np.argmax(suspicion)) == 0
    assert suspicion[0] == pytest.approx(1.0)


def test_suspicion_is_the_mean_of_four_percentile_ranks() -> None:
    """The rule in force: -net influence and -worst harm beside self-influence and loss. A hard
    clean example with a large gradient (0) has the largest raw harm; a wrong answer (1) whose
    net influence is positive (cross-talk) still harms one eval example most; 2 is its helpful
    right copy, 3 and 4 fitted examples."""
    net = np.array([-10.0, 6.0, 8.0, -0.01, -0.02])
    worst = np.array([-1.0, -4.0, 0.5, -0.2, -0.1])
    self_influence = np.array([10_000.0, 4.0, 16.0, 1e-4, 1e-4])
    loss = np.array([1.8, 2.0, 1.5, 0.1, 0.2])
    suspicion = suspicion_scores(net, worst, self_influence, loss)
    expected = [
        1.0 + 0.8 + 1.0 + 0.8,
        0.4 + 1.0 + 0.6 + 1.0,
        0.2 + 0.2 + 0.8 + 0.6,
        0.6 + 0.6 + 0.3 + 0.2,
        0.8 + 0.4 + 0.3 + 0.4,
    ]
    assert suspicion * 4 == pytest.approx(expected)
    summary = TrainingSetSummary(list("abcde"), net, self_influence, loss, worst, suspicion)
    assert summary.suspect_rank.tolist() == [1, 2, 4, 5, 3]
    recalls = ranking_recalls(summary, {"b"})
    # The top 10% of five examples is one (at least one): worst harm alone finds it, net does not.
    assert recalls["worst_harm"] == 1.0 and recalls["harmful"] == 0.0 and recalls["loss"] == 1.0
    assert recalls["suspicion"] == 0.0 and recalls["without worst"] == 0.0


def test_a_summary_stored_before_worst_harm_still_pages_and_says_so() -> None:
    rows = [
        {"id": f"t{j}", "net_influence": -j, "self_influence": 1.0, "train_loss": 0.5}
        | {"suspicion": j / 3, "suspect_rank": 3 - j, "text": "x"}
        for j in range(3)
    ]
    data = {"version": 1, "examples": rows}
    summary = TrainingSetSummary.from_json(data)
    assert not summary.has_worst_harm and np.isnan(summary.worst_harm).all()
    examples, total = page(data, "suspect", 3, 0)
    assert total == 3 and [row["id"] for row in examples] == ["t2", "t1", "t0"]
    assert all(row["worst_harm"] is None for row in examples)
    assert summary.to_json()["examples"][0]["worst_harm"] is None
    fresh = summarize(["a", "b"], np.array([[1.0, -1.0]]), np.ones(2), np.ones(2))
    assert fresh.has_worst_harm


def test_worst_harm_is_the_lowest_standardised_score_read_block_by_block(tmp_path, monkeypatch) -> None:
    """Each eval row standardised over the training set, then the lowest per training example;
    the same from a memory-mapped matrix read in blocks of rows as from the whole matrix."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(7, 50))
    scores[3, 11] = -40.0  # one strong harm to one eval example
    scores[:, 12] = -7.0  # some harm to every eval example: the lowest sum, no single outlier
    expected = ((scores - scores.mean(axis=1, keepdims=True)) / scores.std(axis=1, keepdims=True)).min(axis=0)
    assert worst_harm_scores(scores) == pytest.approx(expected)
    assert int(np.argmin(scores.sum(axis=0))) == 12  # net influence's most harmful
    assert int(np.argmin(worst_harm_scores(scores))) == 11
    path = tmp_path / "scores.npy"
    np.save(path, scores.astype(np.float32))
    mapped = np.load(path, mmap_mode="r")
    monkeypatch.setattr("gpu_core.training_summary.BLOCK_VALUES", 100)  # two rows per block
    assert worst_harm_scores(mapped) == pytest.approx(expected, rel=1e-5)
    monkeypatch.undo()
    # An eval example every training example scores alike adds nothing (no division by zero).
    flat = np.vstack([scores, np.full((1, 50), 3.0)])
    assert worst_harm_scores(flat) == pytest.approx(np.minimum(expected, 0.0))
    assert worst_harm_scores(np.zeros((0, 4))).tolist() == [0.0] * 4


def test_every_experiment_writes_its_summary_artifact(experiment) -> None:
    spec, result, data, _ = experiment
    rows = data["examples"]
    assert [row["id"] for row in rows] == [example.id for example in spec.training_data]
    assert SUMMARY_NAME in {artifact.name for artifact in result.artifacts}
    assert sorted(row["suspect_rank"] for row in rows) == list(range(1, N_TRAIN + 1))
    # TracIn's net influence is taken at the final adapter (below), not the matrix's column sum.
    scores = np.asarray(result.influence.scores)
    assert [row["net_influence"] for row in rows] != pytest.approx(scores.sum(axis=0).tolist(), rel=1e-3)
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


def test_net_influence_is_the_score_matrix_column_sum_unless_given() -> None:
    scores = np.array([[1.0, -2.0, 0.5], [3.0, 1.0, -0.5]])
    ones = np.ones(3)
    assert summarize(["a", "b", "c"], scores, ones, ones).net_influence.tolist() == [4.0, -1.0, 0.0]
    given = np.array([-1.0, 2.0, 3.0])
    summary = summarize(["a", "b", "c"], scores, ones, ones, net_influence=given)
    assert summary.net_influence.tolist() == given.tolist()
    # Self-influence and loss tie: a is the only harmful one overall, b the one eval example 0
    # finds most harmful (1.40 of its standard deviations below its mean), and both count.
    assert summary.worst_harm == pytest.approx([0.8890, -1.3970, -1.1625], abs=1e-4)
    assert summary.suspect_rank.tolist() == [2, 1, 3]


@pytest.mark.parametrize("method", ["tracin", "trackstar"])
def test_tracin_and_trackstar_signals_are_final_adapter_inner_products(method: str) -> None:
    """Self-influence ``<s, g>`` and net influence ``<s, sum_e g_e>`` at the final adapter, where
    s is the example's Adam step ``g / (sqrt(v) + eps)``, times the summed learning rate for
    TracIn; between Adam-corrected gradients on both sides (no unit normalisation) for TrackStar;
    against gradients taken one example at a time."""
    spec = task_spec(method, n_train=12, n_eval=4)
    spec.hyperparams.epochs = 3
    loaded = load_model(spec.model_id, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = attach_lora(loaded, spec.hyperparams)
    encoder = experiment_encoder(spec, loaded.tokenizer)
    pairs = [encoder.train_pair(example) for example in spec.training_data]
    queries = [encoder.encode(example.turns, last_only=True) for example in spec.eval_data]
    pad = loaded.tokenizer.pad_token_id
    training = train_lora(model, pairs, spec.hyperparams, pad, loaded.device)
    args = (method, model, pad, pairs, training.checkpoints, spec.influence, 4)
    with pytest.raises(ValueError, match="summed gradient"):
        final_adapter_signals(*args)
    signals = final_adapter_signals(*args, eval_gradients=eval_gradient_sum(model, pad, queries, 3))
    layers = lora_layers(model)
    with lora_grad_enabled(layers):
        grads = stacked_gradients(model, layers, pairs, pad, 1).double()
        eval_sum = stacked_gradients(model, layers, queries, pad, 1).double().sum(dim=0)
    moments = training.checkpoints[-1].second_moment
    denominators = second_moment_denominators(layers, moments, model_device(model)).double()
    steps = grads / denominators
    if method == "tracin":
        scale = sum(c.learning_rate for c in training.checkpoints)
    else:
        scale = 1.0
        grads, eval_sum = steps, eval_sum / denominators
    assert signals.self_influence == pytest.approx((scale * (steps * grads).sum(dim=1)).numpy(), rel=1e-4)
    assert signals.net_influence is not None
    expected = (scale * steps @ eval_sum).numpy()
    assert signals.net_influence == pytest.approx(expected, rel=1e-3, abs=1e-6 * np.abs(expected).max())
    assert (signals.train_loss > 0).all()
    if method == "tracin":
        # Checkpoints without Adam state (an SGD-trained adapter): SGD's step is g itself.
        training.checkpoints[-1].second_moment = None
        sgd = final_adapter_signals(*args, eval_gradients=eval_gradient_sum(model, pad, queries, 3))
        assert sgd.self_influence == pytest.approx((scale * grads.square().sum(dim=1)).numpy(), rel=1e-4)


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
    eval_gradients = eval_gradient_sum(model, pad, queries, 4)
    gathered = FinalGradientFeatures(method, model, len(pairs), training.checkpoints, eval_gradients)
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
    tapped = final_adapter_signals(*args, gathered=gathered, eval_gradients=eval_gradients)
    own = final_adapter_signals(*args, eval_gradients=eval_gradients)
    assert tapped.self_influence == pytest.approx(own.self_influence, rel=1e-4)
    assert tapped.train_loss == pytest.approx(own.train_loss, rel=1e-5)
    assert tapped.net_influence == pytest.approx(own.net_influence, rel=1e-4)
    # A tap filled without the eval gradients cannot give net influence: the own pass runs.
    blind = FinalGradientFeatures(method, model, len(pairs), training.checkpoints)
    blind.rows[:] = 0.0
    again = final_adapter_signals(*args, gathered=blind, eval_gradients=eval_gradients)
    assert again.net_influence == pytest.approx(own.net_influence, rel=1e-4)
    assert again.self_influence == pytest.approx(own.self_influence, rel=1e-4)


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
