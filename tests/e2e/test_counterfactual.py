"""End to end: a counterfactual check of a planted-duplicate experiment through the whole stack
(gateway -> scheduler -> compute-local -> gpu_core), its estimate, progress, result and errors."""

from __future__ import annotations

import pytest

from benchmarks.planted import duplicate_of, planted_duplicate_spec
from devstack.client import GatewayClient
from devstack.stack import Stack

pytestmark = pytest.mark.e2e

# Small enough to take seconds: DataInf ranks every planted duplicate first at this size.
N_TRAIN, N_EVAL, EPOCHS = 16, 4, 30
DUPLICATES = [f"t{duplicate_of(i, N_TRAIN, N_EVAL)}" for i in range(N_EVAL)]
CHECK = {"k": 1, "remove": "helpful", "controls": 2}


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
def experiment(alice: GatewayClient) -> str:
    job_id = alice.submit(planted_duplicate_spec("datainf", N_TRAIN, N_EVAL, EPOCHS))["job_id"]
    assert list(alice.events(job_id))[-1]["state"] == "completed"
    return job_id


def test_the_check_runs_on_the_experiments_backend_and_beats_the_controls(
    alice: GatewayClient, experiment: str
) -> None:
    base = f"/api/jobs/{experiment}/counterfactual"
    estimate = alice.request("POST", f"{base}/estimate", json=CHECK)
    assert estimate.status_code == 200, estimate.text
    figures = estimate.json()
    assert figures["backend"] == "hosted" and figures["retrainings"] == 3
    assert figures["estimates"][0]["provider"] == "local"
    assert figures["estimates"][0]["estimated_time_s"] > 0
    assert "3 retrainings" in figures["estimates"][0]["notes"][0]

    submitted = alice.request("POST", base, json=CHECK, headers={"Idempotency-Key": "check-1"})
    assert submitted.status_code == 202, submitted.text
    check_id = submitted.json()["counterfactual_job_id"]
    assert submitted.headers["Location"] == f"{base}/{check_id}"
    assert submitted.json()["estimated_time_s"] == pytest.approx(figures["estimates"][0]["estimated_time_s"])
    again = alice.request("POST", base, json=CHECK, headers={"Idempotency-Key": "check-1"})
    assert again.json()["counterfactual_job_id"] == check_id

    # The same progress stream as an experiment's, ending in the terminal status.
    events = list(alice.events(check_id))
    progress = [e for e in events if e.get("type") == "progress"]
    assert progress and {e["stage"] for e in progress} == {"counterfactual"}
    assert any("retraining 3/3" in e["message"] for e in progress)
    assert events[-1]["state"] == "completed"

    check = alice.request("GET", f"{base}/{check_id}").json()
    assert check["status"] == "completed" and check["parent_job_id"] == experiment
    assert check["request"]["k"] == 1 and check["request"]["controls"] == 2
    result = check["result"]
    assert result["method"] == "datainf" and result["removed_ids"] == DUPLICATES
    assert len(result["control_removed_ids"]) == 2
    assert all(not set(ids) & set(DUPLICATES) for ids in result["control_removed_ids"])
    assert [example["id"] for example in result["examples"]] == [f"e{i}" for i in range(N_EVAL)]
    assert result["beats_controls_rate"] >= 0.75
    for example in result["examples"]:
        assert example["without_top_k_loss"] > example["original_loss"]
        assert len(example["without_random_k_losses"]) == 2
        assert {"original_output", "without_top_k_output"} <= set(example)

    listed = alice.request("GET", base).json()["counterfactual_jobs"]
    assert [job["counterfactual_job_id"] for job in listed] == [check_id]
    # A check is not an experiment: the jobs list shows experiments only.
    assert check_id not in {job["job_id"] for job in alice.request("GET", "/api/jobs").json()["jobs"]}


def test_another_user_gets_404_on_every_counterfactual_route(
    stack: Stack, alice: GatewayClient, experiment: str
) -> None:
    base = f"/api/jobs/{experiment}/counterfactual"
    check_id = alice.request("POST", base, json={**CHECK, "controls": 0, "eval_ids": ["e0"]}).json()[
        "counterfactual_job_id"
    ]
    bob = GatewayClient(stack.gateway_url)
    bob.sign_in_locally("bob")
    for method, path, body in [
        ("POST", f"{base}/estimate", CHECK),
        ("POST", base, CHECK),
        ("GET", base, None),
        ("GET", f"{base}/{check_id}", None),
        ("GET", f"/api/jobs/{check_id}", None),
        ("GET", f"/api/jobs/{check_id}/events", None),
        ("POST", f"/api/jobs/{check_id}/cancel", None),
    ]:
        reply = bob.request(method, path, json=body)
        assert reply.status_code == 404, (path, reply.text)
    # A check id under another experiment is not found either.
    other = alice.submit(planted_duplicate_spec("datainf", 4, 1, 1))["job_id"]
    assert alice.request("GET", f"/api/jobs/{other}/counterfactual/{check_id}").status_code == 404
    assert list(alice.events(check_id))[-1]["state"] == "completed"
    list(alice.events(other))


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ({"k": 0}, 422, "k"),
        ({"remove": "both"}, 422, "remove"),
        ({"controls": 99}, 422, "controls"),
        ({"k": 1, "surprise": 1}, 422, "surprise"),
        ({"eval_ids": ["nope"]}, 422, "eval_ids: not in this experiment: 'nope'"),
        ({"k": 16}, 422, "k: must be less than the 16 training examples"),
    ],
)
def test_bad_requests_name_the_field(
    alice: GatewayClient, experiment: str, body: dict, status: int, names: str
) -> None:
    for path in ("", "/estimate"):
        reply = alice.request("POST", f"/api/jobs/{experiment}/counterfactual{path}", json=body)
        assert reply.status_code == status, reply.text
        assert names in reply.text


def test_a_check_needs_a_completed_experiment(alice: GatewayClient) -> None:
    running = alice.submit(planted_duplicate_spec("datainf", 16, 2, 40))["job_id"]
    reply = alice.request("POST", f"/api/jobs/{running}/counterfactual", json=CHECK)
    assert reply.status_code == 409, reply.text
    assert "a counterfactual job needs a completed experiment" in reply.json()["detail"]
    alice.request("POST", f"/api/jobs/{running}/cancel")
