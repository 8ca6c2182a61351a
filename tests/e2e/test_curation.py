"""End to end: the training data of a finished experiment through the whole stack (gateway ->
scheduler -> compute-local -> gpu_core): its ranked training examples, a curation by rule with
one random control, its result, the curated set (JSONL, Parquet, a new experiment from it), and
other users' 404s."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pyarrow.parquet as pq
import pytest

from benchmarks.curate import task_spec
from devstack.client import GatewayClient
from devstack.stack import Stack
from influence_client import AsyncClient, Client, InfluenceError

pytestmark = pytest.mark.e2e

N_TRAIN = 20
CURATION = {"drop": {"by": "suspect", "count": 2}, "controls": 1, "seeds": [0]}


def small_spec() -> dict:
    spec = task_spec("tracin", n_train=N_TRAIN).model_dump(mode="json", exclude_none=True)
    spec["hyperparams"]["epochs"] = 2
    return spec


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
    job_id = alice.submit(small_spec())["job_id"]
    assert list(alice.events(job_id))[-1]["state"] == "completed"
    return job_id


def test_training_examples_rank_the_whole_set(alice: GatewayClient, experiment: str) -> None:
    base = f"/api/jobs/{experiment}/training-examples"
    page = alice.request("GET", base, params={"sort": "suspect", "limit": 5}).json()
    assert page["total"] == N_TRAIN
    assert [row["suspect_rank"] for row in page["examples"]] == [1, 2, 3, 4, 5]
    assert set(page["examples"][0]) == {
        "id",
        "net_influence",
        "self_influence",
        "train_loss",
        "worst_harm",
        "suspect_rank",
        "text",
    }
    harmful = alice.request("GET", base, params={"sort": "harmful", "limit": N_TRAIN}).json()["examples"]
    nets = [row["net_influence"] for row in harmful]
    assert nets == sorted(nets) and len(nets) == N_TRAIN
    worst = alice.request("GET", base, params={"sort": "worst_harm", "limit": N_TRAIN}).json()["examples"]
    harms = [row["worst_harm"] for row in worst]
    assert harms == sorted(harms) and harms[0] < 0 and len(harms) == N_TRAIN
    second = alice.request("GET", base, params={"sort": "harmful", "limit": 3, "offset": 3}).json()[
        "examples"
    ]
    assert [row["id"] for row in second] == [row["id"] for row in harmful[3:6]]
    for params, field in [({"sort": "newest"}, "sort"), ({"limit": 0}, "limit"), ({"offset": -1}, "offset")]:
        reply = alice.request("GET", base, params=params)
        assert reply.status_code == 422 and field in reply.text, reply.text


def test_a_curation_by_rule_retrains_against_a_control(alice: GatewayClient, experiment: str) -> None:
    base = f"/api/jobs/{experiment}/curations"
    suspects = alice.request(
        "GET", f"/api/jobs/{experiment}/training-examples", params={"sort": "suspect", "limit": 2}
    ).json()["examples"]
    estimate = alice.request("POST", f"{base}/estimate", json=CURATION)
    assert estimate.status_code == 200, estimate.text
    assert estimate.json()["retrainings"] == 2 and estimate.json()["selected"] == 2
    assert estimate.json()["estimates"][0]["estimated_time_s"] > 0

    submitted = alice.request("POST", base, json=CURATION, headers={"Idempotency-Key": "cur-1"})
    assert submitted.status_code == 202, submitted.text
    curation_id = submitted.json()["curation_job_id"]
    events = list(alice.events(curation_id))
    assert {e["stage"] for e in events if e.get("type") == "progress"} == {"curation"}
    assert events[-1]["state"] == "completed"

    curation = alice.request("GET", f"{base}/{curation_id}").json()
    result = curation["result"]
    assert result["mode"] == "drop" and result["selected_ids"] == [row["id"] for row in suspects]
    assert [run["selection"] for run in result["runs"]] == ["curated", "control-1"]
    assert len(result["control_selected_ids"][0]) == 2 and result["kept"] == N_TRAIN - 2
    assert (
        result["loss"]["n_pairs"] == len(small_spec()["eval_data"])
        and result["loss"]["ci_low"] <= result["loss"]["mean"] <= result["loss"]["ci_high"]
    )
    assert curation["request"]["drop"] == CURATION["drop"]
    assert [c["curation_job_id"] for c in alice.request("GET", base).json()["curations"]] == [curation_id]

    curated = alice.request("GET", f"{base}/{curation_id}/training-set.jsonl")
    assert curated.status_code == 200
    rows = [json.loads(line) for line in curated.text.splitlines()]
    assert len(rows) == N_TRAIN - 2 and not {row["id"] for row in rows} & set(result["selected_ids"])
    assert set(rows[0]) == {"id", "prompt", "completion"}
    parquet = alice.request("GET", f"{base}/{curation_id}/training-set.parquet")
    assert parquet.status_code == 200 and parquet.headers["content-type"] == "application/vnd.apache.parquet"
    assert pq.read_table(io.BytesIO(parquet.content)).to_pylist() == rows

    # The curated set starts a new experiment: the parent's spec with the curated training set.
    started = alice.request(
        "POST", f"{base}/{curation_id}/experiment", headers={"Idempotency-Key": "from-cur-1"}
    )
    assert started.status_code == 202, started.text
    new_id = started.json()["job_id"]
    assert started.headers["location"] == f"/api/jobs/{new_id}"
    with Client(str(alice.http.base_url), token=alice.token) as client:  # the library, same key
        assert client.experiment_from_curation(experiment, curation_id, "from-cur-1").job_id == new_id
    new_spec = alice.request("GET", f"/api/jobs/{new_id}/spec").json()
    parent_spec = alice.request("GET", f"/api/jobs/{experiment}/spec").json()
    assert new_spec["training_data"] == rows
    assert {k: v for k, v in new_spec.items() if k != "training_data"} == {
        k: v for k, v in parent_spec.items() if k != "training_data"
    }
    alice.request("POST", f"/api/jobs/{new_id}/cancel")


def _client_views(client: Client, experiment: str, curation_id: str) -> dict[str, Any]:
    """What the library answers for the experiment's training data and its curation."""
    return {
        "page": client.training_examples(experiment, sort="harmful", limit=3, offset=1).model_dump(),
        "estimate": client.curation_estimate(experiment, CURATION).model_dump(),
        # The same Idempotency-Key as the first submit: the same curation, no new job.
        "resubmitted": client.submit_curation(experiment, CURATION, "cur-1").curation_job_id,
        "listed": [c.curation_job_id for c in client.curations(experiment)],
        "curation": client.curation(experiment, curation_id).model_dump(),
        "curated": [
            row.model_dump(exclude_none=True) for row in client.curated_training_set(experiment, curation_id)
        ],
        "new_experiment": client.experiment_from_curation(experiment, curation_id, "from-cur-1").job_id,
    }


async def _async_client_views(client: AsyncClient, experiment: str, curation_id: str) -> dict[str, Any]:
    page = await client.training_examples(experiment, sort="harmful", limit=3, offset=1)
    curated = await client.curated_training_set(experiment, curation_id)
    return {
        "page": page.model_dump(),
        "estimate": (await client.curation_estimate(experiment, CURATION)).model_dump(),
        "resubmitted": (await client.submit_curation(experiment, CURATION, "cur-1")).curation_job_id,
        "listed": [c.curation_job_id for c in await client.curations(experiment)],
        "curation": (await client.curation(experiment, curation_id)).model_dump(),
        "curated": [row.model_dump(exclude_none=True) for row in curated],
        "new_experiment": (
            await client.experiment_from_curation(experiment, curation_id, "from-cur-1")
        ).job_id,
    }


def test_the_sync_and_async_clients_rank_curate_and_download(
    stack: Stack, alice: GatewayClient, experiment: str
) -> None:
    """Both libraries answer what the HTTP API answers (after the curation test above)."""
    base = f"/api/jobs/{experiment}"
    curation_id = alice.request("GET", f"{base}/curations").json()["curations"][0]["curation_job_id"]
    with Client(str(alice.http.base_url), token=alice.token) as client:
        sync = _client_views(client, experiment, curation_id)

    async def run_async() -> tuple[dict[str, Any], InfluenceError]:
        async with AsyncClient(str(alice.http.base_url), token=alice.token) as client:
            views = await _async_client_views(client, experiment, curation_id)
        async with AsyncClient(stack.gateway_url) as bob:
            await bob.sign_in("bob")
            try:
                await bob.curation(experiment, curation_id)
            except InfluenceError as error:
                return views, error
        raise AssertionError("another user read alice's curation")

    views, refused = asyncio.run(run_async())
    assert refused.status == 404
    page = alice.request(
        "GET", f"{base}/training-examples", params={"sort": "harmful", "limit": 3, "offset": 1}
    )
    assert sync["page"] == views["page"] == page.json()
    assert sync["estimate"]["retrainings"] == views["estimate"]["retrainings"] == 2
    assert sync["estimate"]["selected"] == views["estimate"]["selected"] == 2
    assert sync["resubmitted"] == views["resubmitted"] == curation_id
    assert sync["listed"] == views["listed"] == [curation_id]
    assert sync["curation"] == views["curation"]
    assert views["curation"]["result"]["selected_ids"] == views["curation"]["request"]["drop_ids"]
    jsonl = alice.request("GET", f"{base}/curations/{curation_id}/training-set.jsonl").text
    assert sync["curated"] == views["curated"] == [json.loads(line) for line in jsonl.splitlines()]
    assert len(views["curated"]) == N_TRAIN - 2
    assert sync["new_experiment"] == views["new_experiment"]


def test_a_drop_by_worst_harm_selects_the_lowest_worst_harm(alice: GatewayClient, experiment: str) -> None:
    worst = alice.request(
        "GET", f"/api/jobs/{experiment}/training-examples", params={"sort": "worst_harm", "limit": 3}
    ).json()["examples"]
    body = {"drop": {"by": "worst_harm", "count": 3}, "controls": 0, "seeds": [0]}
    submitted = alice.request("POST", f"/api/jobs/{experiment}/curations", json=body)
    assert submitted.status_code == 202, submitted.text
    curation_id = submitted.json()["curation_job_id"]
    curation = alice.request("GET", f"/api/jobs/{experiment}/curations/{curation_id}").json()
    assert curation["request"]["drop_ids"] == [row["id"] for row in worst]
    assert curation["request"]["drop"] == body["drop"]
    alice.request("POST", f"/api/jobs/{curation_id}/cancel")


def test_bad_curations_name_the_field(alice: GatewayClient, experiment: str) -> None:
    base = f"/api/jobs/{experiment}/curations"
    for body, names in [
        ({"drop": {"by": "suspect", "count": N_TRAIN}}, "drop.count"),
        ({"drop": {"by": "newest", "count": 1}}, "drop.by"),
        ({"keep": {"by": "helpful", "fraction": 1.5}}, "keep.fraction"),
        ({"drop_ids": ["nope"]}, "drop_ids: not training examples of this experiment: 'nope'"),
        ({"drop_ids": ["t0"], "keep": {"by": "helpful", "fraction": 0.5}}, "exactly one"),
        ({"drop_ids": ["t0"], "controls": 99}, "controls"),
    ]:
        reply = alice.request("POST", base, json=body)
        assert reply.status_code == 422 and names in reply.text, (body, reply.text)


def test_other_users_get_404_and_unfinished_experiments_409(
    stack: Stack, alice: GatewayClient, experiment: str
) -> None:
    bob = GatewayClient(stack.gateway_url)
    bob.sign_in_locally("bob")
    base = f"/api/jobs/{experiment}"
    curation_id = alice.request("GET", f"{base}/curations").json()["curations"][0]["curation_job_id"]
    for method, path, body in [
        ("GET", f"{base}/training-examples", None),
        ("POST", f"{base}/curations/estimate", CURATION),
        ("POST", f"{base}/curations", CURATION),
        ("GET", f"{base}/curations", None),
        ("GET", f"{base}/curations/{curation_id}", None),
        ("GET", f"{base}/curations/{curation_id}/training-set.jsonl", None),
        ("GET", f"{base}/curations/{curation_id}/training-set.parquet", None),
        ("POST", f"{base}/curations/{curation_id}/experiment", None),
        ("POST", f"/api/jobs/{curation_id}/cancel", None),
    ]:
        reply = bob.request(method, path, json=body)
        assert reply.status_code == 404, (path, reply.text)
    spec = small_spec()
    spec["hyperparams"]["epochs"] = 30
    running = alice.submit(spec)["job_id"]
    for method, path in [("GET", "training-examples"), ("POST", "curations")]:
        reply = alice.request(
            method, f"/api/jobs/{running}/{path}", json=CURATION if method == "POST" else None
        )
        assert reply.status_code == 409, reply.text
    alice.request("POST", f"/api/jobs/{running}/cancel")
