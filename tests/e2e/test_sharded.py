"""End to end: a sharded experiment (``influence.shards`` 2) through the whole stack (gateway ->
scheduler's job graph -> compute-local children -> gpu_core's training, index-shard and merge
jobs) on the tiny model: equal to the unsharded run of the same spec (scores and top-k), parts
shown on the job, children hidden from the jobs list, a shard whose worker is killed run again
alone, a cancel that reaches every part, and a follow-up query on the sharded index that ranks a
planted copy first."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.planted import planted_duplicate_spec
from devstack.client import GatewayClient
from devstack.stack import Stack

pytestmark = pytest.mark.e2e

N_TRAIN, N_EVAL = 16, 2
COPIED = 11  # the training example the planted query copies (as tests/e2e/test_queries.py)
SHARDS = 2


def method_spec(
    method: str, epochs: int, shards: int = 1, projection_dim: int | None = None
) -> dict[str, Any]:
    spec = planted_duplicate_spec(method, N_TRAIN, N_EVAL, epochs)
    spec["influence"] = {"top_k": 3, "projection_seed": 7, "shards": shards}
    if projection_dim is not None:
        spec["influence"]["projection_dim"] = projection_dim
    return spec


def tracin_spec(shards: int = 1) -> dict[str, Any]:
    """Projected TracIn over a few epochs (one checkpoint each)."""
    return method_spec("tracin", 2, shards, projection_dim=32)


def trackstar_spec(shards: int = 1) -> dict[str, Any]:
    """TrackStar (its default projection) trained long enough that the planted copy ranks first
    (as test_queries.py)."""
    return method_spec("trackstar", 60, shards)


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
    client = GatewayClient(stack.gateway_url, timeout_s=60.0)
    client.sign_in_locally("alice")
    return client


def run(alice: GatewayClient, spec: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    job_id = alice.submit(spec)["job_id"]
    events = list(alice.events(job_id))
    assert events[-1]["state"] == "completed", events[-3:]
    return job_id, events


def scores(alice: GatewayClient, job_id: str) -> np.ndarray:
    reply = alice.request("GET", f"/api/jobs/{job_id}/artifacts/scores.npy", follow_redirects=True)
    assert reply.status_code == 200, reply.text
    return np.load(io.BytesIO(reply.content))


def artifact_names(alice: GatewayClient, job_id: str) -> set[str]:
    reply = alice.request("GET", f"/api/jobs/{job_id}/artifacts")
    assert reply.status_code == 200, reply.text
    return {artifact["name"] for artifact in reply.json()["artifacts"]}


def top_ids(result: dict[str, Any]) -> dict[str, Any]:
    return {
        eval_id: ([e["id"] for e in top["helpful"]], [e["id"] for e in top["harmful"]])
        for eval_id, top in result["influence"]["top_k"].items()
    }


def assert_same_result(alice: GatewayClient, sharded: str, unsharded: str) -> None:
    got, want = scores(alice, sharded), scores(alice, unsharded)
    assert got.shape == want.shape == (N_EVAL, N_TRAIN)
    relative = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert relative < 1e-5, relative
    assert top_ids(alice.results(sharded)) == top_ids(alice.results(unsharded))


@pytest.fixture(scope="module")
def trackstar(alice: GatewayClient) -> dict[str, Any]:
    """The unsharded TrackStar run and its sharded twin, with the sharded run's events."""
    unsharded, _ = run(alice, trackstar_spec())
    sharded, events = run(alice, trackstar_spec(SHARDS))
    return {"unsharded": unsharded, "sharded": sharded, "events": events}


def test_sharded_trackstar_equals_unsharded_and_shows_its_parts(
    alice: GatewayClient, trackstar: dict[str, Any]
) -> None:
    sharded = trackstar["sharded"]
    assert_same_result(alice, sharded, trackstar["unsharded"])
    job = alice.job(sharded)
    assert job["shards"] == SHARDS and job["status"] == "completed" and job["progress"] == 1.0
    parts = job["parts"]
    assert [(p["kind"], p["shard"]) for p in parts] == [
        ("training", None),
        ("index_shard", 0),
        ("index_shard", 1),
        ("shard_merge", None),
    ]
    assert all(p["status"] == "completed" and p["attempts"] == 1 and p["job_id"] for p in parts)
    # Progress named what ran, with the parts in each event (the SSE stream carries them).
    messages = [e.get("message", "") for e in trackstar["events"] if e.get("type") == "progress"]
    assert any(m.startswith("influence: 1 of 2 shards done") for m in messages), messages
    assert any(e.get("parts") for e in trackstar["events"])
    # The parts are not experiments: the list shows the experiment only, and no part is listed.
    listed = {j["job_id"] for j in alice.request("GET", "/api/jobs").json()["jobs"]}
    assert sharded in listed and not listed & {p["job_id"] for p in parts}
    # Its files are an unsharded experiment's (the shards' score columns were merge inputs only).
    names, reference = (artifact_names(alice, job_id) for job_id in (sharded, trackstar["unsharded"]))
    assert {"scores.npy", "adapter/adapter_config.json", "gradient_index/manifest.json"} <= names
    assert not any(name.startswith("shards/") for name in names)
    assert {n for n in reference if not n.startswith("gradient_index/")} <= names
    ranked = alice.request("GET", f"/api/jobs/{sharded}/training-examples", params={"sort": "helpful"})
    assert ranked.status_code == 200 and ranked.json()["total"] == N_TRAIN


def test_a_follow_up_query_on_the_sharded_index_ranks_a_planted_copy_first(
    alice: GatewayClient, trackstar: dict[str, Any]
) -> None:
    copied = trackstar_spec()["training_data"][COPIED]
    body = {"queries": [{"id": "copy", "prompt": copied["prompt"]}], "top_k": 3}
    answers = {}
    for name in ("sharded", "unsharded"):
        experiment = trackstar[name]
        submitted = alice.request("POST", f"/api/jobs/{experiment}/queries", json=body)
        assert submitted.status_code == 202, submitted.text
        query_id = submitted.json()["query_job_id"]
        assert list(alice.events(query_id))[-1]["state"] == "completed"
        answers[name] = alice.request("GET", f"/api/jobs/{experiment}/queries/{query_id}").json()["result"]
    # The sharded experiment's own index (its shards' rows under one manifest), read as one.
    assert answers["sharded"]["source"] == "index"
    helpful = [[e["id"] for e in answers[name]["results"][0]["helpful"]] for name in ("sharded", "unsharded")]
    assert helpful[0][0] == f"t{COPIED}" and helpful[0] == helpful[1]


def test_sharded_projected_tracin_equals_unsharded_inline_and_on_a_stored_dataset(
    alice: GatewayClient,
) -> None:
    unsharded, _ = run(alice, tracin_spec())
    sharded, _ = run(alice, tracin_spec(SHARDS))
    assert_same_result(alice, sharded, unsharded)
    # The same examples uploaded once (POST /api/datasets) and named by the spec: every part
    # reads them from the store; the shards' slices come from the dataset's count.
    spec = tracin_spec(SHARDS)
    rows = spec.pop("training_data")
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    params = {"kind": "train", "filename": "planted.jsonl"}
    stored = alice.request("POST", "/api/datasets", params=params, content=body)
    assert stored.status_code == 201, stored.text
    from_dataset, _ = run(alice, {**spec, "training_dataset_id": stored.json()["dataset_id"]})
    assert alice.job(from_dataset)["n_train"] == N_TRAIN
    assert_same_result(alice, from_dataset, unsharded)


def children(kind: str) -> list[tuple[int, dict[str, Any]]]:
    """(pid, job.json) of every compute-local child process running a job of ``kind``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"compute_local.child" not in argv or b"--job-dir" not in argv:
            continue
        job_dir = Path(argv[argv.index(b"--job-dir") + 1].decode())
        try:
            record = json.loads((job_dir / "job.json").read_text())
        except (OSError, ValueError):
            continue
        if record.get("kind") == kind:
            found.append((int(entry.name), record))
    return found


def wait_for(condition: Any, timeout_s: float = 600.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_shard_whose_worker_is_killed_runs_again_alone(
    alice: GatewayClient, trackstar: dict[str, Any]
) -> None:
    job_id = alice.submit(trackstar_spec(SHARDS), idempotency_key="killed-shard")["job_id"]
    pid, record = wait_for(lambda: next(iter(children("index_shard")), None))
    os.kill(pid, signal.SIGKILL)
    events = list(alice.events(job_id))
    assert events[-1]["state"] == "completed", events[-3:]
    parts = {(p["kind"], p["shard"]): p for p in alice.job(job_id)["parts"]}
    killed = next(p for p in parts.values() if p["kind"] == "index_shard" and p["attempts"] == 2)
    other = next(p for p in parts.values() if p["kind"] == "index_shard" and p is not killed)
    assert other["attempts"] == 1  # the finished (or waiting) shard ran once
    assert parts[("training", None)]["attempts"] == 1 and parts[("shard_merge", None)]["attempts"] == 1
    assert record["job_id"] != killed["job_id"]  # the new attempt is a new job
    assert_same_result(alice, job_id, trackstar["unsharded"])


def test_cancelling_a_sharded_experiment_cancels_its_parts(alice: GatewayClient) -> None:
    job_id = alice.submit(tracin_spec(SHARDS), idempotency_key="cancelled-graph")["job_id"]
    wait_for(lambda: children("training"))
    reply = alice.request("POST", f"/api/jobs/{job_id}/cancel")
    assert reply.status_code == 200, reply.text
    assert list(alice.events(job_id))[-1]["state"] == "cancelled"
    wait_for(lambda: not children("training"), timeout_s=60)
    job = alice.job(job_id)
    training = job["parts"][0]
    assert alice.job(training["job_id"])["status"] == "cancelled"
    deleted = alice.request("DELETE", f"/api/jobs/{job_id}")
    assert deleted.status_code in (200, 204), deleted.text
    assert alice.request("GET", f"/api/jobs/{training['job_id']}").status_code == 404
