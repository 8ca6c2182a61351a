"""Follow-up queries (gpu_core.query) on real planted-duplicate experiments on the tiny model: a
query copying a training example ranks it first for every method; a span restricts the loss to
its tokens; warm answers equal cold ones; the stored index, a recomputed index and a retrained
adapter agree; bad requests are refused naming the field; a stop ends an answer and leaves the
session usable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import planted
from gpu_core.counterfactual import spearman
from gpu_core.data import IGNORE_INDEX, EncodedPair
from gpu_core.evaluation import target_losses
from gpu_core.jobs import QUERY, JobInputError, make_payload, parse_payload, run_job
from gpu_core.pipeline import ExperimentCancelled, experiment_encoder, run_experiment
from gpu_core.query import QuerySession, needed_parent_artifacts
from gpu_core.schemas import ExperimentResult, ExperimentSpec, QueryRequest, QueryResult, parse_spec

N_TRAIN, N_EVAL = 24, 4
METHODS = ("tracin", "datainf", "kronfluence", "trackstar")
# Training examples the duplicate queries copy.
COPIED = (2, 11, 19)


def run_to_result(spec: ExperimentSpec, artifacts_dir: Path) -> ExperimentResult:
    for event in run_experiment(spec, artifacts_dir):
        if event["type"] == "result":
            return ExperimentResult.model_validate(event["result"])
    raise AssertionError("the experiment ended without a result")


Experiment = tuple[dict[str, Any], ExperimentSpec, ExperimentResult, Path]


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Experiment]:
    """One finished planted-duplicate experiment per method, with its artifacts directory."""
    runs = {}
    for method in METHODS:
        raw = planted.planted_duplicate_spec(method, N_TRAIN, N_EVAL)
        spec = parse_spec(raw)
        directory = tmp_path_factory.mktemp(f"parent-{method}")
        runs[method] = (raw, spec, run_to_result(spec, directory), directory)
    return runs


def answer(session: QuerySession, request: QueryRequest, **kwargs: Any) -> QueryResult:
    events = list(session.answer(request, **kwargs))
    assert events[-1]["type"] == "result"
    progress = [event["progress"] for event in events[:-1]]
    assert progress == sorted(progress) and all(event["stage"] == "query" for event in events[:-1])
    return QueryResult.model_validate(events[-1]["result"])


def duplicate_queries(raw: dict[str, Any], **extra: Any) -> QueryRequest:
    train = raw["training_data"]
    return QueryRequest.model_validate(
        {
            "queries": [
                {"id": f"copy-{j}", "prompt": train[j]["prompt"], "expected": train[j]["completion"]}
                for j in COPIED
            ],
            **extra,
        }
    )


def score_vector(outcome: Any) -> dict[str, float]:
    return {scored.id: scored.score for scored in (*outcome.helpful, *outcome.harmful)}


@pytest.mark.parametrize("method", METHODS)
def test_a_query_copying_a_training_example_ranks_it_first(
    experiments: dict[str, Experiment], method: str
) -> None:
    raw, spec, result, directory = experiments[method]
    session = QuerySession(spec, result, directory, device=torch.device("cpu"))
    try:
        answered = answer(session, duplicate_queries(raw, top_k=3))
    finally:
        session.close()
    assert answered.method == method
    assert answered.source == ("index" if method == "trackstar" else "recomputed")
    for j, outcome in zip(COPIED, answered.results, strict=True):
        assert outcome.helpful[0].id == f"t{j}", (method, outcome.helpful)
        assert outcome.target == raw["training_data"][j]["completion"]
        assert len(outcome.helpful) <= 3 and outcome.loss > 0


def test_a_span_restricts_the_loss_to_its_tokens(experiments: dict[str, Experiment]) -> None:
    raw, spec, result, directory = experiments["trackstar"]
    prompt, completion = (
        raw["training_data"][COPIED[0]]["prompt"],
        raw["training_data"][COPIED[0]]["completion"],
    )
    request = QueryRequest.model_validate(
        {
            "queries": [
                {"id": "full", "prompt": prompt, "expected": completion},
                {"id": "span", "prompt": prompt, "expected": completion, "span": [1, 3]},
            ],
            "top_k": N_TRAIN,
        }
    )
    session = QuerySession(spec, result, directory, device=torch.device("cpu"))
    try:
        full, part = answer(session, request).results
        # The loss on just those tokens, computed here from the plain encoding: the tiny
        # tokenizer is byte-level, one token per letter, so characters 1..2 are the 2nd and 3rd
        # labelled tokens.
        assert session._loaded is not None
        encoder = experiment_encoder(spec, session._loaded.tokenizer)
        pair = encoder.encode([("user", prompt), ("assistant", completion)], last_only=True)
        first = pair.prompt_length
        labels = [
            label if first + 1 <= position < first + 3 else IGNORE_INDEX
            for position, label in enumerate(pair.labels)
        ]
        expected_loss = target_losses(
            session._model,
            [EncodedPair(pair.input_ids, labels)],
            encoder.tokenizer.pad_token_id,
            torch.device("cpu"),
        )[0]
    finally:
        session.close()
    assert part.span == (1, 3) and part.span_tokens == 2
    assert full.span is None and full.span_tokens == len(completion) + 1  # the answer and eos
    assert part.loss == pytest.approx(expected_loss, rel=1e-6)
    assert part.loss != pytest.approx(full.loss, rel=1e-3)
    assert score_vector(part) != pytest.approx(score_vector(full), rel=1e-3)


def test_warm_answers_equal_cold_ones_and_a_stop_leaves_the_session_usable(
    experiments: dict[str, Experiment],
) -> None:
    raw, spec, result, directory = experiments["tracin"]
    request = duplicate_queries(raw, top_k=5)
    session = QuerySession(spec, result, directory, device=torch.device("cpu"))
    try:
        cold = answer(session, request)
        assert session.ready and session.resident_bytes() > 0
        with pytest.raises(ExperimentCancelled):
            list(session.answer(request, should_stop=lambda: True))
        warm = answer(session, request)
    finally:
        session.close()
    assert "loading_model" in cold.timings and "loading_model" not in warm.timings
    assert cold.timings["total"] >= cold.timings["loading_model"] + cold.timings["scoring"]
    assert [o.model_dump() for o in warm.results] == [o.model_dump() for o in cold.results]


def test_the_index_a_recomputed_index_and_a_retrained_adapter_agree(
    experiments: dict[str, Experiment], tmp_path: Path
) -> None:
    raw, spec, result, directory = experiments["trackstar"]
    request = duplicate_queries(raw, top_k=N_TRAIN)
    without_index = tmp_path / "without-index"
    shutil.copytree(directory, without_index, ignore=shutil.ignore_patterns("gradient_index"))
    only_index = tmp_path / "only-index"
    shutil.copytree(directory / "gradient_index", only_index / "gradient_index")
    answers = {}
    for name, parent_dir in (("index", directory), ("recomputed", without_index), ("retrained", only_index)):
        session = QuerySession(spec, result, parent_dir, device=torch.device("cpu"))
        try:
            answers[name] = answer(session, request)
        finally:
            session.close()
    assert [answers[name].source for name in answers] == ["index", "recomputed", "retrained"]
    for stored, recomputed, retrained in zip(*(answers[name].results for name in answers), strict=True):
        ids = sorted(score_vector(stored))
        a, b = (np.array([score_vector(o).get(i, 0.0) for i in ids]) for o in (stored, recomputed))
        assert spearman(a, b) > 0.99
        # Retraining with the experiment's seed reproduced the adapter: the stored index fits it.
        assert retrained.model_dump() == stored.model_dump()


def test_needed_artifacts_are_the_methods_own(experiments: dict[str, Experiment]) -> None:
    # The scheduler names them with the base install: no torch behind the import.
    probe = "import sys; from gpu_core.uploads import needed_parent_artifacts; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "False"
    )
    for method in METHODS:
        names = needed_parent_artifacts(experiments[method][2])
        assert "adapter/adapter_model.safetensors" in names and "scores.npy" not in names
        assert any(n.startswith("checkpoints/") for n in names) == (method in ("tracin", "trackstar"))
        assert any(n.startswith("gradient_index/") for n in names) == (method == "trackstar")


def test_the_job_runs_from_a_payload_with_the_parents_artifacts(experiments: dict[str, Experiment]) -> None:
    raw, spec, result, directory = experiments["datainf"]
    payload = make_payload(QUERY, raw, duplicate_queries(raw).model_dump(), result.model_dump())
    events = list(run_job(parse_payload(json.loads(json.dumps(payload))), parent_artifacts_dir=directory))
    answered = QueryResult.model_validate(events[-1]["result"])
    assert [o.helpful[0].id for o in answered.results] == [f"t{j}" for j in COPIED]


@pytest.mark.parametrize(
    ("request_json", "message"),
    [
        ({"queries": []}, "^queries: List should have at least 1 item"),
        ({"queries": [{"prompt": "a:"}] * 33}, "^queries: List should have at most 32 items"),
        ({"queries": [{"prompt": "x" * 8001}]}, r"^queries\.0\.prompt: String should have at most 8000"),
        ({"queries": [{"prompt": "a:", "expected": "x" * 8001}]}, r"^queries\.0\.expected: String should"),
        (
            {"queries": [{"prompt": "a:", "expected": "abc", "span": [1, 5]}]},
            "span: ends at 5 but expected has 3",
        ),
        ({"queries": [{"prompt": "a:", "span": [3, 3]}]}, r"^queries\.0\.span: .*needs 0 <= start < end"),
        (
            {"queries": [{"id": "a", "prompt": "a:"}, {"id": "a", "prompt": "b:"}]},
            r"queries\[1\]\.id: duplicate id",
        ),
        ({"queries": [{"prompt": "a:"}], "top_k": 0}, "^top_k: Input should be greater than or equal to 1"),
        ({"queries": [{"prompt": "a:", "text": "?"}]}, r"^queries\.0\.text: Extra inputs are not permitted"),
    ],
)
def test_bad_requests_name_the_field(
    experiments: dict[str, Experiment], request_json: dict[str, Any], message: str
) -> None:
    raw, _, result, _ = experiments["datainf"]
    with pytest.raises(JobInputError, match=message):
        parse_payload(make_payload(QUERY, raw, request_json, result.model_dump()))


def test_a_parent_of_another_spec_or_a_span_past_the_answer_is_refused(
    experiments: dict[str, Experiment],
) -> None:
    raw, spec, result, directory = experiments["datainf"]
    request = {"queries": [{"prompt": "a:"}]}
    with pytest.raises(JobInputError, match="parent_result: a query job needs"):
        parse_payload(make_payload(QUERY, raw, request, None))
    other = experiments["tracin"][2].model_dump()
    with pytest.raises(JobInputError, match="parent_result: its influence method 'tracin'"):
        parse_payload(make_payload(QUERY, raw, request, other))
    fewer = {**raw, "training_data": raw["training_data"][:-1]}
    with pytest.raises(JobInputError, match="parent_result: its training ids are not the spec's"):
        parse_payload(make_payload(QUERY, fewer, request, result.model_dump()))
    session = QuerySession(spec, result, directory, device=torch.device("cpu"))
    try:
        too_far = QueryRequest.model_validate({"queries": [{"prompt": "a:", "span": [0, 999]}]})
        with pytest.raises(JobInputError, match=r"queries\[0\]\.span: ends at 999 but the answer has"):
            answer(session, too_far)
    finally:
        session.close()


@pytest.mark.parametrize("template", ["raw", "chat"])
def test_span_tokens_are_the_spans_characters_under_either_template(template: str) -> None:
    from gpu_core.data import Encoder
    from gpu_core.query import span_pair
    from gpu_core.runtime import load_model

    tokenizer = load_model("local/tiny-llama", device=torch.device("cpu")).tokenizer
    encoder = Encoder(tokenizer, template, 128)
    target = "the capital is Paris"
    pair = span_pair(encoder, "Where is it?", target, (15, 20), "queries[0].span")
    kept = [token for token, label in zip(pair.input_ids, pair.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "Paris"
    whole = span_pair(encoder, "Where is it?", target, None, "queries[0].span")
    labelled = [
        token for token, label in zip(whole.input_ids, whole.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(labelled, skip_special_tokens=True).strip() == target
    with pytest.raises(JobInputError, match=r"^queries\[0\]\.span: ends at 21 but the answer has 20"):
        span_pair(encoder, "Where is it?", target, (0, 21), "queries[0].span")


@pytest.mark.parametrize("method", METHODS)
def test_an_eval_example_asked_again_scores_as_in_the_experiment(
    experiments: dict[str, Experiment], method: str
) -> None:
    raw, spec, result, directory = experiments[method]
    evals = raw["eval_data"]
    request = QueryRequest.model_validate(
        {"queries": [{"prompt": e["prompt"], "expected": e["expected"]} for e in evals], "top_k": N_TRAIN}
    )
    session = QuerySession(spec, result, directory, device=torch.device("cpu"))
    try:
        answered = answer(session, request)
    finally:
        session.close()
    assert result.influence.scores is not None
    for row, outcome in zip(result.influence.scores, answered.results, strict=True):
        scores = score_vector(outcome)
        # The experiment stored float64 scores; the query's are the same computation.
        assert [scores.get(f"t{j}", 0.0) for j in range(N_TRAIN)] == pytest.approx(row, rel=1e-4, abs=1e-6)
    finetuned = {o.id: o for o in result.eval_results.finetuned.examples}
    assert [o.loss for o in answered.results] == pytest.approx(
        [finetuned[e["id"]].loss for e in evals], rel=1e-5
    )
    assert [o.output for o in answered.results] == [finetuned[e["id"]].output for e in evals]


@pytest.mark.parametrize("method", ("datainf", "kronfluence"))
def test_a_cached_training_side_scores_as_the_uncached_path(
    experiments: dict[str, Experiment], method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, spec, result, directory = experiments[method]
    request = duplicate_queries(raw, top_k=N_TRAIN)
    answers, resident = {}, {}
    for name, budget in (("cached", 1 << 30), ("uncached", 0)):
        # A budget of 0 bytes: the training side never fits, every answer recomputes it.
        monkeypatch.setattr("gpu_core.query.TRAIN_GRADIENT_CACHE_BYTES", budget)
        session = QuerySession(spec, result, directory, device=torch.device("cpu"))
        try:
            cold = answer(session, request)
            answers[name] = answer(session, request)
            resident[name] = session.resident_bytes()
            assert session._train_side is None if name == "uncached" else session._train_side is not None
        finally:
            session.close()
        assert [o.model_dump() for o in answers[name].results] == [o.model_dump() for o in cold.results]
    # The cache holds at least the training gradients: n_train x the LoRA width, float32.
    assert resident["cached"] - resident["uncached"] >= N_TRAIN * 4
    for cached, uncached in zip(answers["cached"].results, answers["uncached"].results, strict=True):
        a, b = score_vector(cached), score_vector(uncached)
        assert sorted(a) == sorted(b)
        ids, scale = sorted(b), max(abs(v) for v in b.values())
        assert [a[i] for i in ids] == pytest.approx([b[i] for i in ids], rel=1e-5, abs=1e-6 * scale)
        assert cached.helpful[0].id == uncached.helpful[0].id
