"""End to end: follow-up queries to a planted-duplicate experiment through the whole stack
(gateway -> scheduler -> compute-local's warm query worker -> gpu_core.query), reading the
experiment's adapter and gradient index from compute-local's folder of it; span queries, the
training texts in the answer, idempotency, ownership and errors. The same experiment's merged
weights (gpu_core.merge, compute-local's child) through ``influence merge``."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.planted import planted_duplicate_spec
from devstack.client import GatewayClient
from devstack.stack import Stack
from influence_client import cli

pytestmark = pytest.mark.e2e

# TrackStar builds a gradient index the queries read; at this size it ranks a copied prompt's
# training example first.
N_TRAIN, N_EVAL, EPOCHS = 16, 2, 60
COPIED = 11


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with Stack(
        data_dir=tmp_path_factory.mktemp("stack"),
        extra_env={"SCHEDULER_POLL_INTERVAL_S": "0.2", "COMPUTE_LOCAL_TORCH_THREADS": "1"},
        services=("keyvault", "compute-local", "scheduler", "gateway"),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def alice(stack: Stack) -> GatewayClient:
    client = GatewayClient(stack.gateway_url)
    client.sign_in_locally("alice")
    return client


@pytest.fixture(scope="module")
def spec() -> dict:
    return planted_duplicate_spec("trackstar", N_TRAIN, N_EVAL, EPOCHS)


@pytest.fixture(scope="module")
def experiment(alice: GatewayClient, spec: dict) -> str:
    job_id = alice.submit(spec)["job_id"]
    assert list(alice.events(job_id))[-1]["state"] == "completed"
    return job_id


def ask(alice: GatewayClient, experiment: str, body: dict, key: str | None = None) -> dict:
    """Submit, follow the progress stream to the end, and read the query back."""
    headers = {"Idempotency-Key": key} if key else {}
    submitted = alice.request("POST", f"/api/jobs/{experiment}/queries", json=body, headers=headers)
    assert submitted.status_code == 202, submitted.text
    query_id = submitted.json()["query_job_id"]
    assert submitted.headers["Location"] == f"/api/jobs/{experiment}/queries/{query_id}"
    events = list(alice.events(query_id))
    assert events[-1]["state"] == "completed", events[-3:]
    assert any(e.get("stage") == "query" for e in events if e.get("type") == "progress")
    reply = alice.request("GET", f"/api/jobs/{experiment}/queries/{query_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_copied_prompt_ranks_its_training_example_first_and_a_span_query_works(
    alice: GatewayClient, experiment: str, spec: dict
) -> None:
    copied = spec["training_data"][COPIED]
    body = {"queries": [{"id": "copy", "prompt": copied["prompt"]}], "top_k": 3}
    query = ask(alice, experiment, body, key="ask-1")
    assert query["status"] == "completed" and query["parent_job_id"] == experiment
    assert query["request"]["queries"][0]["prompt"] == copied["prompt"]
    result = query["result"]
    assert result["method"] == "trackstar"
    # The experiment's own index, read from compute-local's folder of it.
    assert result["source"] == "index"
    answer = result["results"][0]
    assert answer["id"] == "copy" and answer["target"] == answer["output"] and answer["output"]
    top = answer["helpful"][0]
    assert top["id"] == f"t{COPIED}" and top["score"] > 0
    assert top["text"] == {"prompt": copied["prompt"], "answer": copied["completion"]}
    assert len(answer["helpful"]) == 3 and all(e["text"] for e in answer["helpful"] + answer["harmful"])
    assert all(e["score"] < 0 for e in answer["harmful"])

    again = alice.request(
        "POST", f"/api/jobs/{experiment}/queries", json=body, headers={"Idempotency-Key": "ask-1"}
    )
    assert again.json()["query_job_id"] == query["query_job_id"]

    # A span over the first characters of that answer: the loss counts only their tokens.
    end = max(1, len(answer["output"]) // 2)
    spanned = ask(alice, experiment, {"queries": [{"prompt": copied["prompt"], "span": [0, end]}]})
    outcome = spanned["result"]["results"][0]
    assert outcome["span"] == [0, end] and outcome["output"] == answer["output"]
    assert 0 < outcome["span_tokens"] and outcome["loss"] != answer["loss"]
    assert outcome["helpful"][0]["id"] == f"t{COPIED}"

    listed = alice.request("GET", f"/api/jobs/{experiment}/queries").json()["queries"]
    assert [q["query_job_id"] for q in listed] == [spanned["query_job_id"], query["query_job_id"]]
    assert all(q["status"] == "completed" and q["request"] for q in listed)
    # A query is not an experiment: the jobs list shows experiments only.
    experiments = alice.request("GET", "/api/jobs").json()["jobs"]
    assert query["query_job_id"] not in {job["job_id"] for job in experiments}


def test_another_user_gets_404_on_every_query_route(
    stack: Stack, alice: GatewayClient, experiment: str, spec: dict
) -> None:
    base = f"/api/jobs/{experiment}/queries"
    body = {"queries": [{"prompt": spec["training_data"][0]["prompt"], "expected": "x"}], "top_k": 1}
    query_id = alice.request("POST", base, json=body).json()["query_job_id"]
    bob = GatewayClient(stack.gateway_url)
    bob.sign_in_locally("bob")
    for method, path, payload in [
        ("POST", base, body),
        ("GET", base, None),
        ("GET", f"{base}/{query_id}", None),
        ("GET", f"/api/jobs/{query_id}", None),
        ("GET", f"/api/jobs/{query_id}/events", None),
        ("POST", f"/api/jobs/{query_id}/cancel", None),
    ]:
        reply = bob.request(method, path, json=payload)
        assert reply.status_code == 404, (path, reply.text)
    # A query id under another of alice's jobs is not found either.
    assert alice.request("GET", f"/api/jobs/{query_id}/queries/{query_id}").status_code == 404
    assert list(alice.events(query_id))[-1]["state"] == "completed"


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"queries": []}, "queries"),
        ({"queries": [{"prompt": "a", "span": [3, 1]}]}, "span"),
        ({"queries": [{"prompt": "a", "expected": "ab", "span": [0, 9]}]}, "span"),
        ({"queries": [{"prompt": "a"}], "top_k": 0}, "top_k"),
        ({"queries": [{"prompt": "a", "surprise": 1}]}, "surprise"),
        ({"queries": [{"prompt": ""}]}, "prompt"),
    ],
)
def test_bad_requests_name_the_field(alice: GatewayClient, experiment: str, body: dict, names: str) -> None:
    reply = alice.request("POST", f"/api/jobs/{experiment}/queries", json=body)
    assert reply.status_code == 422, reply.text
    assert names in reply.text


def test_a_query_or_merge_needs_a_completed_experiment(alice: GatewayClient) -> None:
    running = alice.submit(planted_duplicate_spec("trackstar", 16, 2, 100))["job_id"]
    reply = alice.request("POST", f"/api/jobs/{running}/queries", json={"queries": [{"prompt": "a"}]})
    assert reply.status_code == 409, reply.text
    assert "a query job needs a completed experiment" in reply.json()["detail"]
    for path in ("merges", "merges/estimate"):
        reply = alice.request("POST", f"/api/jobs/{running}/{path}", json={})
        assert reply.status_code == 409, reply.text
        assert "a merge job needs a completed experiment" in reply.json()["detail"]
    alice.request("POST", f"/api/jobs/{running}/cancel")


def test_influence_merge_writes_weights_that_load_with_from_pretrained_and_reproduce_the_losses(
    stack: Stack,
    alice: GatewayClient,
    experiment: str,
    spec: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpu_core.data import batches
    from gpu_core.evaluation import target_losses
    from gpu_core.pipeline import experiment_encoder
    from gpu_core.schemas import parse_spec

    estimate = alice.request("POST", f"/api/jobs/{experiment}/merges/estimate", json={"shard_size_mb": 0.1})
    assert estimate.status_code == 200, estimate.text
    (local,) = estimate.json()["estimates"]
    assert "of merged weights (16-bit)" in " ".join(local["notes"]) and local["estimated_time_s"] > 0
    bad = alice.request("POST", f"/api/jobs/{experiment}/merges", json={"shard_size_mb": 0})
    assert bad.status_code == 422 and "shard_size_mb" in bad.text

    monkeypatch.setenv("INFLUENCE_TOKEN", alice.token)
    args = [
        "--api",
        stack.gateway_url,
        "merge",
        experiment,
        "--shard-size-mb",
        "0.1",
        "--download",
        str(tmp_path),
    ]
    code = cli.main(args)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "check: eval losses reproduced to" in printed and "(tolerance 0.0001): passed" in printed
    assert "merged/model.safetensors.index.json" in printed

    (merge,) = alice.request("GET", f"/api/jobs/{experiment}/merges").json()["merges"]
    assert merge["status"] == "completed" and merge["parent_job_id"] == experiment
    result = alice.request("GET", f"/api/jobs/{experiment}/merges/{merge['merge_job_id']}").json()["result"]
    assert result["shards"] >= 3 and result["check"]["passed"] is True
    # The files came through the scheduler's store and the gateway, checked against their sha256.
    folder = tmp_path / "merged"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    parsed = parse_spec(spec)
    encoder = experiment_encoder(parsed, tokenizer)
    losses: list[float] = []
    for chunk in batches(parsed.eval_data, parsed.hyperparams.batch_size):
        pairs = [encoder.encode(example.turns, last_only=True) for example in chunk]
        losses += target_losses(model, pairs, tokenizer.pad_token_id, model.device)
    finetuned = alice.results(experiment)["eval_results"]["finetuned"]["examples"]
    assert losses == pytest.approx([example["loss"] for example in finetuned], rel=1e-4)

    bob = GatewayClient(stack.gateway_url)
    bob.sign_in_locally("bob")
    base = f"/api/jobs/{experiment}/merges"
    for method, path in [
        ("POST", base),
        ("POST", f"{base}/estimate"),
        ("GET", base),
        ("GET", f"{base}/{merge['merge_job_id']}"),
        ("GET", f"/api/jobs/{merge['merge_job_id']}/artifacts"),
    ]:
        assert bob.request(method, path, json={}).status_code == 404, path


def test_a_merge_can_be_cancelled(alice: GatewayClient, experiment: str) -> None:
    submitted = alice.request("POST", f"/api/jobs/{experiment}/merges", json={})
    assert submitted.status_code == 202, submitted.text
    merge_id = submitted.json()["merge_job_id"]
    assert alice.request("POST", f"/api/jobs/{merge_id}/cancel").status_code == 200
    assert list(alice.events(merge_id))[-1]["state"] == "cancelled"
    assert alice.request("GET", f"/api/jobs/{merge_id}/artifacts").json()["artifacts"] == []


def test_influence_ask_prints_the_answer_and_the_training_texts(
    stack: Stack,
    alice: GatewayClient,
    experiment: str,
    spec: dict,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFLUENCE_TOKEN", alice.token)
    copied = spec["training_data"][COPIED]
    code = cli.main(["--api", stack.gateway_url, "ask", experiment, copied["prompt"], "--top-k", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    helpful = printed.split("helpful:\n", 1)[1].splitlines()[0]
    assert f"t{COPIED}  {copied['prompt']!r} -> {copied['completion']!r}" in helpful
    assert f"prompt: {copied['prompt']}" in printed and "harmful:" in printed
