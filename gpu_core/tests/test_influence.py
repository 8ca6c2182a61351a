"""Influence methods against direct, unvectorised computations on the tiny model (float64)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from benchmarks.toy import ToySetup, build_toy_setup
from gpu_core.data import IGNORE_INDEX, EncodedPair, collate
from gpu_core.influence import AdapterCheckpoint, build_influence_result, compute_influence
from gpu_core.influence.datainf import datainf_scores
from gpu_core.influence.ekfac import kronfluence_scores
from gpu_core.influence.gradients import load_lora_state, lora_grad_enabled, lora_layers, lora_state
from gpu_core.schemas import InfluenceOptions

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy() -> ToySetup:
    """12 train x 5 queries, LoRA r=4 on q/v, 2 checkpoints, float64."""
    return build_toy_setup(12, 5, dtype=torch.float64, lora_r=4, epochs=2, steps_per_epoch=3)


def explicit_gradients(model, tokenizer, pairs: list[EncodedPair]) -> list[list[torch.Tensor]]:
    """One backward per example: its summed completion-token loss w.r.t. each LoRA matrix."""
    layers = lora_layers(model)
    gradients = []
    with lora_grad_enabled(layers):
        for pair in pairs:
            batch = collate([pair], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
            loss = F.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
            grads = torch.autograd.grad(loss, [layer.module.weight for layer in layers])
            gradients.append([g.flatten() for g in grads])
    return gradients


def flat(gradients: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.cat(per_layer) for per_layer in gradients])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def test_tracin_equals_per_example_backward(toy: ToySetup, tmp_path: Path) -> None:
    layers = lora_layers(toy.model)
    final = lora_state(layers)
    expected = torch.zeros(len(toy.queries), len(toy.train), dtype=torch.float64)
    for checkpoint in toy.checkpoints:
        load_lora_state(layers, checkpoint.state)
        train_grads = flat(explicit_gradients(toy.model, toy.tokenizer, toy.train))
        query_grads = flat(explicit_gradients(toy.model, toy.tokenizer, toy.queries))
        expected += checkpoint.learning_rate * query_grads @ train_grads.T
    load_lora_state(layers, final)

    fractions: list[float] = []
    scores = compute_influence(
        "tracin",
        toy.model,
        toy.tokenizer,
        toy.train,
        toy.queries,
        toy.checkpoints,
        InfluenceOptions(),
        batch_size=5,
        work_dir=tmp_path,
        progress=fractions.append,
    )
    assert scores.shape == (5, 12)
    assert relative_error(scores, expected) < 1e-5
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    for layer in layers:  # the final adapter is back in place
        assert torch.equal(layer.module.weight, final[layer.param_name])


def reference_datainf(train_grads, query_grads, damping: float | None) -> torch.Tensor:
    """DataInf's IFEngineGeneration.compute_hvp_proposed + compute_IF, loop for loop, with its
    harmful-positive sign."""
    n_layers = len(train_grads[0])
    n_train = len(train_grads)
    influence = torch.zeros(len(query_grads), n_train, dtype=torch.float64)
    for layer in range(n_layers):
        if damping is None:
            mean_squares = sum(torch.mean(g[layer] ** 2) for g in train_grads) / n_train
            lambda_const = float(mean_squares) / 10
        else:
            lambda_const = damping
        for q, query in enumerate(query_grads):
            hvp = torch.zeros_like(query[layer])
            for train in train_grads:
                coefficient = torch.sum(query[layer] * train[layer]) / (
                    lambda_const + torch.sum(train[layer] ** 2)
                )
                hvp += (query[layer] - coefficient * train[layer]) / (n_train * lambda_const)
            for i, train in enumerate(train_grads):
                influence[q, i] += -torch.sum(hvp * train[layer])
    return influence


@pytest.mark.parametrize("damping", [None, 1e-3])
def test_datainf_equals_reference_loop(toy: ToySetup, tmp_path: Path, damping: float | None) -> None:
    train_grads = explicit_gradients(toy.model, toy.tokenizer, toy.train)
    query_grads = explicit_gradients(toy.model, toy.tokenizer, toy.queries)
    harmful_positive = reference_datainf(train_grads, query_grads, damping)

    scores = compute_influence(
        "datainf",
        toy.model,
        toy.tokenizer,
        toy.train,
        toy.queries,
        toy.checkpoints,
        InfluenceOptions(damping=damping),
        batch_size=5,
        work_dir=tmp_path,
    )
    assert relative_error(scores, -harmful_positive) < 1e-5
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("memory_bytes", "damping"), [(0, None), (4096, None), (0, 1e-3)])
def test_datainf_recomputing_gradients_gives_the_same_scores(
    toy: ToySetup, memory_bytes: int, damping: float | None
) -> None:
    """A memory budget smaller than the gradients: each pass recomputes them batch by batch."""
    train_grads = explicit_gradients(toy.model, toy.tokenizer, toy.train)
    query_grads = explicit_gradients(toy.model, toy.tokenizer, toy.queries)
    expected = -reference_datainf(train_grads, query_grads, damping)
    fractions: list[float] = []
    scores = datainf_scores(
        toy.model,
        toy.tokenizer.pad_token_id,
        toy.train,
        toy.queries,
        damping,
        batch_size=3,
        progress=fractions.append,
        gradient_memory_bytes=memory_bytes,
    )
    assert relative_error(scores, expected) < 1e-5
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_kronfluence_identity_equals_gradient_dot(toy: ToySetup, tmp_path: Path) -> None:
    train_grads = flat(explicit_gradients(toy.model, toy.tokenizer, toy.train))
    query_grads = flat(explicit_gradients(toy.model, toy.tokenizer, toy.queries))
    scores = kronfluence_scores(
        toy.model,
        toy.tokenizer.pad_token_id,
        toy.train,
        toy.queries,
        None,
        5,
        tmp_path,
        lambda _fraction: None,
        strategy="identity",
    )
    assert relative_error(scores * len(toy.train), query_grads @ train_grads.T) < 1e-6
    assert list(tmp_path.iterdir()) == []  # fresh output directory, removed afterwards


def test_tracin_one_checkpoint_equals_kronfluence_identity(toy: ToySetup, tmp_path: Path) -> None:
    final = AdapterCheckpoint(lora_state(lora_layers(toy.model)), learning_rate=1.0, epoch=2)
    tracin = compute_influence(
        "tracin",
        toy.model,
        toy.tokenizer,
        toy.train,
        toy.queries,
        [final],
        InfluenceOptions(),
        batch_size=4,
        work_dir=tmp_path,
    )
    identity = kronfluence_scores(
        toy.model,
        toy.tokenizer.pad_token_id,
        toy.train,
        toy.queries,
        None,
        4,
        tmp_path,
        lambda _fraction: None,
        strategy="identity",
    )
    assert relative_error(tracin, identity * len(toy.train)) < 1e-6


def test_planted_duplicates_rank_top_one(tmp_path: Path) -> None:
    n_train, n_queries = 64, 16
    setup = build_toy_setup(n_train, n_queries, duplicate_queries=True)
    duplicates = torch.tensor([i * n_train // n_queries for i in range(n_queries)])
    rates = {}
    for method in ("tracin", "datainf", "kronfluence", "trackstar"):
        scores = compute_influence(
            method,
            setup.model,
            setup.tokenizer,
            setup.train,
            setup.queries,
            setup.checkpoints,
            InfluenceOptions(),
            batch_size=16,
            work_dir=tmp_path,
        )
        rates[method] = float((scores.argmax(dim=1) == duplicates).double().mean())
    print(f"\nplanted duplicates, top-1 helpful rate: {rates}")
    assert rates["kronfluence"] >= 0.95
    assert rates["trackstar"] >= 0.95


def test_kronfluence_tracks_the_exact_damped_fisher(tmp_path: Path) -> None:
    """LoRA r=2 on v_proj: blocks of 128 and 64 parameters, 512 training examples, so each
    block's damped empirical Fisher (F_l + lambda_l I, lambda_l = 0.1 tr(F_l)/d_l, the damping
    kronfluence's heuristic and DataInf's rule both give) is solved exactly."""
    setup = build_toy_setup(
        512, 32, dtype=torch.float64, lora_r=2, target_modules=["v_proj"], steps_per_epoch=4
    )
    final = setup.checkpoints[-1:]
    pad = setup.tokenizer.pad_token_id
    layers = lora_layers(setup.model)
    train_grads = explicit_gradients_batched(setup, setup.train)
    query_grads = explicit_gradients_batched(setup, setup.queries)
    exact = torch.zeros(len(setup.queries), len(setup.train), dtype=torch.float64)
    start = 0
    for layer in layers:
        block = slice(start, start + layer.numel)
        start += layer.numel
        fisher = train_grads[:, block].T @ train_grads[:, block] / len(setup.train)
        damping = 0.1 * fisher.trace() / fisher.shape[0]
        damped = fisher + damping * torch.eye(fisher.shape[0], dtype=torch.float64)
        exact += torch.linalg.solve(damped, query_grads[:, block].T).T @ train_grads[:, block].T

    def spearman(scores: torch.Tensor) -> float:
        per_query = [spearmanr(scores[i].numpy(), exact[i].numpy()).statistic for i in range(len(exact))]
        return float(sum(per_query) / len(per_query))

    options = InfluenceOptions()
    correlations = {
        method: spearman(
            compute_influence(
                method, setup.model, setup.tokenizer, setup.train, setup.queries, final, options, 64, tmp_path
            )
        )
        for method in ("tracin", "datainf", "kronfluence")
    }
    correlations["kronfluence (empirical Fisher)"] = spearman(
        kronfluence_scores(
            setup.model,
            pad,
            setup.train,
            setup.queries,
            None,
            64,
            tmp_path,
            lambda _f: None,
            use_empirical_fisher=True,
        )
    )
    print(f"\nmean per-query Spearman vs exact damped empirical-Fisher influence: {correlations}")
    assert correlations["kronfluence (empirical Fisher)"] >= 0.85


def explicit_gradients_batched(setup: ToySetup, pairs: list[EncodedPair]) -> torch.Tensor:
    return flat(explicit_gradients(setup.model, setup.tokenizer, pairs))


@pytest.mark.parametrize("method", ["tracin", "datainf", "kronfluence"])
def test_two_runs_give_identical_scores(method: str, tmp_path: Path) -> None:
    runs = []
    for _ in range(2):
        setup = build_toy_setup(16, 4, epochs=2, steps_per_epoch=2)
        runs.append(
            compute_influence(
                method,
                setup.model,
                setup.tokenizer,
                setup.train,
                setup.queries,
                setup.checkpoints,
                InfluenceOptions(),
                batch_size=8,
                work_dir=tmp_path,
            )
        )
    assert torch.equal(runs[0], runs[1])
    assert bool(runs[0].abs().sum() > 0)


def test_unknown_method_is_named(toy: ToySetup, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown influence method 'lissa'"):
        compute_influence(
            "lissa",
            toy.model,
            toy.tokenizer,
            toy.train,
            toy.queries,
            toy.checkpoints,
            InfluenceOptions(),
            batch_size=4,
            work_dir=tmp_path,
        )


def test_tracin_needs_a_checkpoint(toy: ToySetup, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one adapter checkpoint"):
        compute_influence(
            "tracin",
            toy.model,
            toy.tokenizer,
            toy.train,
            toy.queries,
            [],
            InfluenceOptions(),
            batch_size=4,
            work_dir=tmp_path,
        )


def test_build_influence_result_ranks_helpful_and_harmful() -> None:
    scores = torch.tensor([[0.5, -1.0, 0.0, 2.0], [-0.1, -0.2, -0.3, -0.4]])
    result = build_influence_result("datainf", scores, ["a", "b", "c", "d"], ["e1", "e2"], top_k=2)
    assert result.scores == scores.double().tolist()
    first, second = result.top_k["e1"], result.top_k["e2"]
    assert [(s.id, s.score) for s in first.helpful] == [("d", 2.0), ("a", 0.5)]
    assert [s.id for s in first.harmful] == ["b"]  # a zero score is neither helpful nor harmful
    assert second.helpful == []
    assert [s.id for s in second.harmful] == ["d", "c"]


def _reference_top(row: list[float], ids: list[str], k: int) -> tuple[list[str], list[str]]:
    """The ranking rule written the slow, obvious way."""
    helpful = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
    harmful = sorted(range(len(row)), key=lambda j: (row[j], j))[:k]
    return [ids[j] for j in helpful if row[j] > 0], [ids[j] for j in harmful if row[j] < 0]


def test_top_k_matches_the_reference_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    # Few distinct values: many ties, including at the k-th place.
    scores = torch.randint(-3, 4, (30, 40), generator=generator).double()
    train_ids, eval_ids = [f"t{j}" for j in range(40)], [f"e{i}" for i in range(30)]
    result = build_influence_result("tracin", scores, train_ids, eval_ids, top_k=7)
    for i, eval_id in enumerate(eval_ids):
        helpful, harmful = _reference_top(scores[i].tolist(), train_ids, 7)
        assert [s.id for s in result.top_k[eval_id].helpful] == helpful
        assert [s.id for s in result.top_k[eval_id].harmful] == harmful


def test_a_large_matrix_leaves_the_json_but_keeps_heatmap_and_top_k() -> None:
    import numpy as np

    from gpu_core.influence.result import HEATMAP_MAX_EVAL, HEATMAP_MAX_TRAIN, INLINE_SCORES_MAX_CELLS

    rng = np.random.default_rng(0)
    n_eval, n_train = 120, 400
    assert n_eval * n_train > INLINE_SCORES_MAX_CELLS
    scores = rng.normal(size=(n_eval, n_train)) * 0.01
    scores[7, 123], scores[99, 5] = 50.0, -80.0  # the two largest magnitudes
    train_ids, eval_ids = [f"t{j}" for j in range(n_train)], [f"e{i}" for i in range(n_eval)]
    result = build_influence_result("tracin", scores, train_ids, eval_ids, top_k=3)
    assert result.scores is None
    heatmap = result.heatmap
    assert len(heatmap.eval_ids) == HEATMAP_MAX_EVAL and len(heatmap.train_ids) == HEATMAP_MAX_TRAIN
    assert heatmap.eval_ids == sorted(heatmap.eval_ids, key=lambda e: int(e[1:]))  # input order
    assert {"e7", "e99"} <= set(heatmap.eval_ids) and {"t123", "t5"} <= set(heatmap.train_ids)
    row, col = heatmap.eval_ids.index("e99"), heatmap.train_ids.index("t5")
    assert heatmap.scores[row][col] == -80.0
    # Every kept row's largest magnitude is at least every dropped row's.
    row_max = np.abs(scores).max(axis=1)
    kept = [int(e[1:]) for e in heatmap.eval_ids]
    assert row_max[kept].min() >= np.delete(row_max, kept).max()
    assert result.top_k["e7"].helpful[0].id == "t123" and result.top_k["e99"].harmful[0].id == "t5"
    small = build_influence_result("tracin", scores[:10, :20], train_ids[:20], eval_ids[:10], top_k=3)
    assert small.scores == scores[:10, :20].tolist() and len(small.heatmap.train_ids) == 20


def test_build_influence_result_rejects_a_mismatched_matrix() -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 3\); expected \(n_eval, n_train\) = \(2, 4\)"):
        build_influence_result("tracin", torch.zeros(2, 3), ["a", "b", "c", "d"], ["e1", "e2"], top_k=1)
    with pytest.raises(ValueError, match="kronfluence influence scores contain NaN"):
        build_influence_result("kronfluence", [[float("nan")]], ["a"], ["e1"], top_k=1)
