"""A sharded experiment (``influence.shards`` 2) on the backends far from the dashboard, end to
end through the gateway with the artifact store on the S3 test server: the fake RunPod (the real
worker handler under the runpod SDK's loop) and the in-process Modal adapter (the Modal app's
function body). Each part is its own provider job (the fake counts one ``/run`` per part), uploads
its files to its own presigned URLs and downloads what it reads through presigned GETs. On RunPod
the sharded result equals the unsharded run of the same spec; on the in-process Modal adapter
only completion is asserted (see that test)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.planted import planted_duplicate_spec
from devstack.client import GatewayClient
from devstack.s3_server import S3TestServer
from devstack.stack import FakeRunPodProcess, Stack

pytestmark = pytest.mark.e2e

RUNPOD_KEY = "rpa_SHARDEDREMOTE0123456789ABCDEFGH"
N_TRAIN, N_EVAL = 16, 2


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRunPodProcess]:
    process = FakeRunPodProcess.start()
    process.control("POST", "keys", key=RUNPOD_KEY, balance=500.0)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeRunPodProcess, s3_server: S3TestServer
) -> Iterator[Stack]:
    with Stack(
        data_dir=tmp_path_factory.mktemp("sharded-remote"),
        extra_env={
            **fake.settings_env(),
            **s3_server.store_env(prefix="sharded-remote"),
            "HOSTED_PROVIDER": "modal",
            "COMPUTE_MODAL_BACKEND": "inprocess",
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
            "RUNPOD_STREAM_WAIT_MS": "1000",
        },
        services=("keyvault", "compute-runpod", "compute-modal", "scheduler", "gateway"),
    ) as running:
        yield running


def spec(shards: int = 1) -> dict[str, Any]:
    planted = planted_duplicate_spec("trackstar", N_TRAIN, N_EVAL, 2)
    planted["influence"] = {"top_k": 3, "shards": shards}
    return planted


def run(client: GatewayClient, body: dict[str, Any]) -> str:
    job_id = client.submit(body)["job_id"]
    events = list(client.events(job_id))
    assert events[-1]["state"] == "completed", events[-3:]
    return job_id


def scores(client: GatewayClient, job_id: str) -> np.ndarray:
    reply = client.request("GET", f"/api/jobs/{job_id}/artifacts/scores.npy")
    assert reply.status_code == 307, reply.text
    fetched = httpx.get(reply.headers["location"], timeout=60)
    assert fetched.status_code == 200
    return np.load(io.BytesIO(fetched.content))


def assert_sharded_equals_unsharded(client: GatewayClient) -> str:
    unsharded = run(client, spec())
    sharded = assert_sharded_completes(client)
    got, want = scores(client, sharded), scores(client, unsharded)
    assert np.abs(got - want).max() / max(np.abs(want).max(), 1e-30) < 1e-5, (got, want)
    tops = [client.results(job_id)["influence"]["top_k"] for job_id in (sharded, unsharded)]
    assert tops[0] == tops[1]
    return sharded


def assert_sharded_completes(client: GatewayClient) -> str:
    """A sharded experiment completes, each part once, with an unsharded experiment's files."""
    sharded = run(client, spec(2))
    assert scores(client, sharded).shape == (N_EVAL, N_TRAIN)
    job = client.job(sharded)
    assert [(p["kind"], p["status"], p["attempts"]) for p in job["parts"]] == [
        ("training", "completed", 1),
        ("index_shard", "completed", 1),
        ("index_shard", "completed", 1),
        ("shard_merge", "completed", 1),
    ]
    names = {a["name"] for a in client.request("GET", f"/api/jobs/{sharded}/artifacts").json()["artifacts"]}
    assert {"scores.npy", "adapter/adapter_config.json", "gradient_index/manifest.json"} <= names
    return sharded


def test_a_sharded_experiment_on_runpod_runs_one_job_per_part(stack: Stack, fake: FakeRunPodProcess) -> None:
    client = GatewayClient(stack.gateway_url, timeout_s=120)
    client.sign_in_locally("rhea")
    assert client.request("POST", "/api/settings/runpod-key", json={"api_key": RUNPOD_KEY}).status_code == 200
    runs_before = len([r for r in fake.requests("job.run") if r["status"] == 200])
    assert_sharded_equals_unsharded(client)
    runs = len([r for r in fake.requests("job.run") if r["status"] == 200]) - runs_before
    assert runs == 1 + 4  # the unsharded experiment, then training, 2 shards and the merge


def test_a_sharded_experiment_on_modal_completes_one_call_per_part(stack: Stack) -> None:
    """Equality with the unsharded run is not asserted here: the in-process adapter runs every call
    as a thread of compute-modal's one process, so the two shards run as threads side by side, and
    two gpu_core jobs in one process are not isolated from each other (reproduced with gpu_core
    alone: two index shards as threads under CPU load gave other columns in 1 of 3 runs; docs/
    services.md). Modal itself runs each call in its own container."""
    client = GatewayClient(stack.gateway_url, timeout_s=120)
    client.sign_in_locally("mona")
    assert_sharded_completes(client)
