"""A sharded experiment (``influence.shards`` = 2, projected TracIn) through the remote providers,
end to end through the gateway, with the artifact store on the S3 test server (moto on loopback):

- RunPod: the fake RunPod runs the real worker under the runpod SDK's loop, on an endpoint of
  ``workers.max`` 2 (RUNPOD_WORKERS_MAX), both workers kept on (``workers.min``) so that both are
  warm when the shards queue, and the two shards run at once, one on each.
- Modal: the in-process adapter runs the Modal app's function body, one spawn per part; the two
  shard calls run at once (TracIn, and TrackStar).

Each part (the training job, two index shards, the merge) is one provider job: the fake counts
one ``/run`` per part and the Modal adapter one spawn. Every part's files travel through the
store (presigned PUTs out of the workers, presigned GETs into the shards and the merge), and the
experiment ends with the files of an unsharded one, whose scores and top-k equal those of the
same spec run unsharded by gpu_core on this machine.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import numpy as np
import pytest

from benchmarks.specs import tracin_spec
from devstack.client import GatewayClient
from devstack.s3_server import S3TestServer
from devstack.stack import FakeRunPodProcess, Stack

from .remote_store import download, store_object

pytestmark = pytest.mark.e2e

RUNPOD_KEY = "rpa_SHARDEDPROVIDERS0123456789ABCD"
N_TRAIN, N_EVAL = 96, 4
PARTS = ("training", "index_shard", "index_shard", "shard_merge")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeRunPodProcess, s3_server: S3TestServer
) -> Iterator[Stack]:
    with Stack(
        data_dir=tmp_path_factory.mktemp("sharded-providers"),
        extra_env={
            **fake.settings_env(),
            **s3_server.store_env(prefix="sharded"),
            "HOSTED_PROVIDER": "modal",
            "COMPUTE_MODAL_BACKEND": "inprocess",
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
            "RUNPOD_STREAM_WAIT_MS": "1000",
            "RUNPOD_WORKERS_MAX": "2",
        },
        services=("keyvault", "compute-runpod", "compute-modal", "scheduler", "gateway"),
    ) as running:
        yield running


def sharded_spec(method: str = "tracin") -> dict[str, Any]:
    """``method`` (TracIn with a projection, or TrackStar) over 2 index shards."""
    spec = tracin_spec(N_TRAIN, N_EVAL)
    spec["hyperparams"].update(epochs=2, batch_size=8)
    spec["influence_method"] = method
    spec["influence"] = {"shards": 2, "projection_dim": 32, "projection_seed": 3, "top_k": 5}
    return spec


Unsharded = tuple[np.ndarray, dict[str, Any]]


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Unsharded]:
    """The same spec run unsharded by gpu_core here, once per method: (its score matrix, its
    result)."""
    from gpu_core.pipeline import run_experiment_to_result
    from gpu_core.schemas import parse_spec

    made: dict[str, Unsharded] = {}

    def reference(method: str) -> Unsharded:
        if method not in made:
            spec = copy.deepcopy(sharded_spec(method))
            spec["influence"].pop("shards")
            directory = tmp_path_factory.mktemp(f"unsharded-{method}")
            result = run_experiment_to_result(parse_spec(spec), directory)
            made[method] = (np.load(directory / "scores.npy"), result.model_dump(mode="json"))
        return made[method]

    return reference


def _top_k(result: dict[str, Any]) -> dict[str, tuple[list[str], list[str]]]:
    return {
        eval_id: ([s["id"] for s in top["helpful"]], [s["id"] for s in top["harmful"]])
        for eval_id, top in result["influence"]["top_k"].items()
    }


def parts_of(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    """Every job the experiment's graph created, oldest first (the jobs table: the experiment's
    parts are no page of their own)."""

    async def read() -> list[dict[str, Any]]:
        connection = await asyncpg.connect(stack.database_url)
        try:
            rows = await connection.fetch(
                "SELECT id::text AS id, kind, shard, status, provider_job_id, "
                "extract(epoch FROM started_at)::float8 AS started_at, "
                "extract(epoch FROM finished_at)::float8 AS finished_at FROM jobs "
                "WHERE graph_job_id = $1 ORDER BY created_at",
                job_id,
            )
        finally:
            await connection.close()
        return [dict(row) for row in rows]

    return asyncio.run(read())


def run_sharded(
    stack: Stack,
    client: GatewayClient,
    backend: str,
    method: str = "tracin",
    submitted: Callable[[], None] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Submit the sharded spec (then call ``submitted``); wait for it to complete: (its job id,
    its parts' jobs)."""
    started = time.monotonic()
    job_id = client.submit(sharded_spec(method))["job_id"]
    if submitted is not None:
        submitted()
    events = list(client.events(job_id))
    assert events[-1]["state"] == "completed", events[-3:]
    print(f"\n{backend} {method}: the sharded experiment took {time.monotonic() - started:.1f} s")
    assert client.job(job_id)["provider"] == backend
    parts = parts_of(stack, job_id)
    assert sorted(part["kind"] for part in parts) == sorted(PARTS), parts
    assert {part["status"] for part in parts} == {"completed"}, parts
    assert sorted(part["shard"] for part in parts if part["kind"] == "index_shard") == [0, 1]
    return job_id, parts


def assert_unsharded_result(
    client: GatewayClient,
    s3_server: S3TestServer,
    job_id: str,
    unsharded: Unsharded,
) -> None:
    """The experiment looks unsharded: its files in its own prefix of the store, scores.npy
    downloadable and equal to the unsharded run's, the same top-k, the training-examples route."""
    want, reference = unsharded
    listed = {
        a["name"]: a for a in client.request("GET", f"/api/jobs/{job_id}/artifacts").json()["artifacts"]
    }
    assert {"scores.npy", "adapter/adapter_model.safetensors", "gradient_index/manifest.json"} <= set(listed)
    assert not any(name.startswith("shards/") for name in listed), sorted(listed)
    for name, entry in listed.items():
        data = store_object(s3_server, "sharded", f"jobs/{job_id}/{name}")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
    got = np.load(io.BytesIO(download(client, job_id, "scores.npy")))
    assert got.shape == want.shape == (N_EVAL, N_TRAIN)
    relative = float(np.abs(got - want).max() / np.abs(want).max())
    assert relative < 1e-5, f"max relative error {relative:.2e}"
    print(f"  scores.npy against the unsharded run: max relative error {relative:.1e}")
    result = client.results(job_id)
    assert _top_k(result) == _top_k(reference)
    assert result["influence"]["train_ids"] == reference["influence"]["train_ids"]

    ranked = client.request("GET", f"/api/jobs/{job_id}/training-examples", params={"sort": "suspect"})
    assert ranked.status_code == 200, ranked.text
    assert ranked.json()["total"] == N_TRAIN


def test_runpod_runs_each_part_once_and_the_shards_on_two_workers(
    stack: Stack,
    fake: FakeRunPodProcess,
    s3_server: S3TestServer,
    unsharded: Callable[[str], Unsharded],
) -> None:
    client = GatewayClient(stack.gateway_url, timeout_s=120)
    client.sign_in_locally("shard-rosa")
    saved = client.request("POST", "/api/settings/runpod-key", json={"api_key": RUNPOD_KEY})
    assert saved.status_code == 200, saved.text

    def two_active_workers() -> None:
        """The researcher keeps both workers of their endpoint on once the dashboard has made it
        (RunPod's console: active workers, ``workers.min``), so that both are warm when the
        shards queue: these shards last less than a second, less than a cold start and RunPod's
        4 s queue delay before it adds a worker (the fake's scaler has its own test)."""
        deadline = time.monotonic() + 60
        while not (endpoints := fake.control("GET", "endpoints")["endpoints"]):  # type: ignore[index]
            assert time.monotonic() < deadline, "no endpoint was created"
            time.sleep(0.1)
        (endpoint,) = endpoints
        assert endpoint["workers"]["max"] == 2
        patched = httpx.patch(
            f"{fake.url}/v2/serverless/{endpoint['id']}",
            headers={"Authorization": f"Bearer {RUNPOD_KEY}"},
            json={"workers": {**endpoint["workers"], "min": 2}},
            timeout=10,
        )
        assert patched.status_code == 200, patched.text

    job_id, parts = run_sharded(stack, client, "runpod", submitted=two_active_workers)

    # One /run per part, none twice: the inputs RunPod took name each part's kind and shard.
    jobs = fake.control("GET", "jobs")
    accepted: list[str] = jobs["accepted_runs"]  # type: ignore[index]
    inputs = {rid: fake.control("GET", f"jobs/{rid}/input")["input"] for rid in accepted}  # type: ignore[index]
    ran = sorted(
        (i.get("kind", "experiment"), (i.get("request") or {}).get("shard", -1)) for i in inputs.values()
    )
    assert ran == [("index_shard", 0), ("index_shard", 1), ("shard_merge", -1), ("training", -1)]
    assert len(accepted) == len(set(accepted)) == 4
    assert sorted(accepted) == sorted(part["provider_job_id"] for part in parts)
    runs: dict[str, dict[str, Any]] = jobs["runs"]  # type: ignore[index]
    shards = sorted(
        (runs[rid] for rid, i in inputs.items() if i.get("kind") == "index_shard"),
        key=lambda run: run["started_at"],
    )
    # Two workers ran the two shards at once.
    assert shards[0]["worker_id"] != shards[1]["worker_id"], shards
    assert shards[1]["started_at"] < shards[0]["finished_at"], shards
    for rid, taken in sorted(inputs.items(), key=lambda item: runs[item[0]]["started_at"]):
        run = runs[rid]
        shard = (taken.get("request") or {}).get("shard", "")
        took, since = run["finished_at"] - run["started_at"], run["started_at"] - shards[0]["started_at"]
        where = f"worker {run['worker_id']}, {took:.2f} s from {since:+.2f} s"
        print(f"  {taken['kind']} {shard}: {where}, input {len(json.dumps(taken))} B")
    # Every file went through the store: each part had upload URLs for its files (RunPod carried
    # only manifests and small results), and the shards and the merge read theirs from
    # presigned GETs of the store (the training job's adapter and checkpoints, the shards' columns).
    for taken in inputs.values():
        transport = taken["artifact_transport"]
        assert transport["mode"] == "presigned", taken["kind"]
        assert any(not name.startswith("_worker/") for name in transport["urls"]), taken["kind"]
        downloads = taken.get("parent_artifacts", [])
        assert bool(downloads) == (taken["kind"] != "training")
        assert all(a["url"].startswith(s3_server.endpoint_url) for a in downloads), taken["kind"]
        assert len(json.dumps(taken)) < 200_000
    assert_unsharded_result(client, s3_server, job_id, unsharded("tracin"))

    # Deleting the experiment kills its parts' upload URLs too (a late delivery of a part writes
    # nothing): the store refuses a PUT to one of them (412, a placeholder holds its name).
    assert client.request("DELETE", f"/api/jobs/{job_id}").status_code == 200
    training = next(taken for taken in inputs.values() if taken["kind"] == "training")
    url = training["artifact_transport"]["urls"]["adapter/adapter_model.safetensors"]
    late = httpx.put(url, content=b"late", headers={"If-None-Match": "*"}, timeout=30)
    assert late.status_code == 412, late.text


@pytest.mark.parametrize("method", ["tracin", "trackstar"])
def test_modal_spawns_each_part_once(
    stack: Stack, s3_server: S3TestServer, unsharded: Callable[[str], Unsharded], method: str
) -> None:
    client = GatewayClient(stack.gateway_url, timeout_s=120)
    client.sign_in_locally(f"shard-mona-{method}")
    job_id, parts = run_sharded(stack, client, "modal", method)
    spawned = [
        json.loads(line)
        for line in stack.log_text("compute-modal").splitlines()
        if line.startswith("{") and json.loads(line).get("message") == "submitted"
    ]
    part_ids = [part["id"] for part in parts]
    assert sorted(s["job_id"] for s in spawned if s["job_id"] in part_ids) == sorted(part_ids)
    # The two shard calls ran at once (as the scheduler saw them start and end).
    first, second = sorted((p for p in parts if p["kind"] == "index_shard"), key=lambda p: p["started_at"])
    assert second["started_at"] < first["finished_at"], parts
    for part in sorted(parts, key=lambda p: p["started_at"]):
        shard = "" if part["shard"] is None else part["shard"]
        took, since = part["finished_at"] - part["started_at"], part["started_at"] - first["started_at"]
        print(f"  {part['kind']} {shard}: {took:.2f} s from {since:+.2f} s")
    assert_unsharded_result(client, s3_server, job_id, unsharded(method))
