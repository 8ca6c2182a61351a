"""End to end: PostgreSQL and every service as separate processes on loopback, driven through
the gateway's REST API exactly as the dashboard and `make demo` drive it."""

from __future__ import annotations

import copy
import http.client
import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from devstack.client import GatewayClient
from devstack.stack import REPO_ROOT, Stack
from gpu_core.tiny import tiny_model_dir

pytestmark = pytest.mark.e2e

SAMPLE = json.loads((REPO_ROOT / "examples" / "sample.json").read_text())


def small_spec(n_train: int = 12, n_eval: int = 4, epochs: int = 1) -> dict:
    spec = copy.deepcopy(SAMPLE)
    spec["model_id"] = "local/tiny-llama"  # the figures below are calibrated on it
    spec["training_data"] = spec["training_data"][:n_train]
    spec["eval_data"] = spec["eval_data"][:n_eval]
    spec["hyperparams"].update(epochs=epochs, max_seq_len=48, max_new_tokens=4)
    return spec


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("stack")
    with Stack(
        data_dir=data_dir,
        extra_env={
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
            "SCHEDULER_JOB_GAUGES_INTERVAL_S": "5",
            "COMPUTE_LOCAL_TORCH_THREADS": "1",
            "ALLOWED_MODEL_DIRS": str(data_dir / "models"),
            # Small, so that a file past the dataset limit is a small file (test_datasets_...).
            "GATEWAY_MAX_DATASET_TRAIN_EXAMPLES": "50",
        },
        services=("keyvault", "compute-local", "scheduler", "gateway"),
    ) as running:
        yield running


@pytest.fixture
def alice(stack: Stack) -> GatewayClient:
    client = GatewayClient(stack.gateway_url)
    client.sign_in_locally("alice")
    return client


def test_sample_experiment_runs_end_to_end(stack: Stack, alice: GatewayClient) -> None:
    spec = small_spec()
    submitted = alice.submit(spec)
    assert submitted["status"] in {"queued", "submitted", "running"}
    assert submitted["estimated_time_s"] > 0

    events = list(alice.events(submitted["job_id"]))
    stages = [e["stage"] for e in events if e.get("type") == "progress"]
    for stage in ("loading_model", "eval_base", "eval_few_shot", "training", "eval_finetuned", "influence"):
        assert stage in stages
    progress = [e["progress"] for e in events if e.get("type") == "progress"]
    assert progress == sorted(progress), "overall progress must never go backwards"
    assert events[-1]["type"] == "status" and events[-1]["state"] == "completed"

    job = alice.job(submitted["job_id"])
    assert job["status"] == "completed"
    stored_spec = alice.request("GET", f"/api/jobs/{submitted['job_id']}/spec").json()
    assert [t["prompt"] for t in stored_spec["training_data"]] == [t["prompt"] for t in spec["training_data"]]
    result = alice.results(submitted["job_id"])
    influence = result["influence"]
    assert influence["train_ids"] == [t["id"] for t in spec["training_data"]]
    assert influence["eval_ids"] == [e["id"] for e in spec["eval_data"]]
    assert len(influence["scores"]) == len(spec["eval_data"])
    assert all(len(row) == len(spec["training_data"]) for row in influence["scores"])
    for run in ("base", "few_shot", "finetuned"):
        assert len(result["eval_results"][run]["examples"]) == len(spec["eval_data"])
        assert 0.0 <= result["eval_results"][run]["metrics"]["exact_match_rate"] <= 1.0


def test_sse_resumes_after_a_given_event(stack: Stack, alice: GatewayClient) -> None:
    job_id = alice.submit(small_spec(n_train=6, n_eval=2))["job_id"]
    everything = list(alice.events(job_id))
    replay = list(alice.events(job_id, after=3))
    assert replay == everything[3:]


def test_another_user_gets_404_on_every_job_route(stack: Stack, alice: GatewayClient) -> None:
    job_id = alice.submit(small_spec(n_train=6, n_eval=2))["job_id"]
    bob = GatewayClient(stack.gateway_url)
    bob.sign_in_locally("bob")
    for method, path in [
        ("GET", f"/api/jobs/{job_id}"),
        ("GET", f"/api/jobs/{job_id}/events"),
        ("GET", f"/api/jobs/{job_id}/results"),
        ("GET", f"/api/jobs/{job_id}/spec"),
        ("POST", f"/api/jobs/{job_id}/cancel"),
    ]:
        assert bob.request(method, path).status_code == 404, path
    assert job_id not in {j["job_id"] for j in bob.request("GET", "/api/jobs").json()["jobs"]}
    list(alice.events(job_id))


def test_same_idempotency_key_concurrently_creates_one_job(stack: Stack, alice: GatewayClient) -> None:
    spec = small_spec(n_train=6, n_eval=2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(lambda _: alice.submit(spec, idempotency_key="same-key"), range(4)))
    assert len({r["job_id"] for r in replies}) == 1
    again = alice.submit(spec, idempotency_key="same-key")
    assert again["job_id"] == replies[0]["job_id"]
    list(alice.events(again["job_id"]))


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b"{not json", 400, "JSON"),
        (json.dumps({"training_data": "nope", "eval_data": []}).encode(), 422, "training_data"),
        (json.dumps({**small_spec(), "influence_method": "magic"}).encode(), 422, "influence_method"),
        (json.dumps({**small_spec(), "hyperparams": {"epochs": -1}}).encode(), 422, "epochs"),
    ],
)
def test_bad_input_gets_a_clear_4xx(alice: GatewayClient, body: bytes, status: int, names: str) -> None:
    reply = alice.request("POST", "/api/train", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    assert names in reply.text


def test_oversized_body_is_413_before_it_is_read(stack: Stack, alice: GatewayClient) -> None:
    # Only the headers go out: the gateway must answer from Content-Length alone, without
    # waiting for (or buffering) 25 MB.
    connection = http.client.HTTPConnection("127.0.0.1", stack.ports["gateway"], timeout=10)
    connection.putrequest("POST", "/api/train")
    for name, value in {
        **alice.headers,
        "Content-Type": "application/json",
        "Content-Length": str(25 * 1024 * 1024),
    }.items():
        connection.putheader(name, value)
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == 413
    assert "limit" in reply.read().decode().lower()
    connection.close()


def test_unknown_backend_is_422(alice: GatewayClient) -> None:
    reply = alice.request("PUT", "/api/settings/compute", json={"backend": "cloud9"})
    assert reply.status_code == 422
    assert "backend" in reply.text


def test_scheduler_killed_mid_job_restarts_and_the_job_finishes(stack: Stack, alice: GatewayClient) -> None:
    job_id = alice.submit(small_spec(n_train=26, n_eval=8, epochs=3))["job_id"]
    training_seen = threading.Event()
    for event in alice.events(job_id):
        if event.get("stage") == "training":
            training_seen.set()
            break
    assert training_seen.is_set()
    stack.stop_service("scheduler", sig=signal.SIGKILL)
    with pytest.raises(httpx.HTTPStatusError) as down:
        alice.job(job_id)
    assert down.value.response.status_code == 503
    stack.start_service("scheduler")
    # Like the browser's EventSource, retry while the gateway reconnects to the new scheduler.
    deadline = time.monotonic() + 15
    while True:
        try:
            alice.job(job_id)
            break
        except httpx.HTTPStatusError as error:
            if error.response.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)

    events = list(alice.events(job_id))
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "no event lost or duplicated across the restart"
    assert events[-1]["state"] == "completed"
    result = alice.results(job_id)
    assert len(result["influence"]["scores"]) == 8


def test_every_service_exports_metrics_showing_the_job(stack: Stack, alice: GatewayClient) -> None:
    job_id = alice.submit(small_spec(n_train=6, n_eval=2))["job_id"]
    list(alice.events(job_id))
    gateway_metrics = httpx.get(f"http://127.0.0.1:{stack.metrics_ports['gateway']}/metrics").text
    assert httpx.get(f"{stack.gateway_url}/metrics").status_code == 404  # not on the public app
    assert 'route="/api/train"' in gateway_metrics
    metrics = {
        name: httpx.get(f"http://127.0.0.1:{port}/metrics").text
        for name, port in stack.metrics_ports.items()
        if name in stack.running
    }
    assert set(metrics) == {"gateway", "keyvault", "compute-local", "scheduler"}
    assert 'method="SubmitJob"' in metrics["scheduler"]
    # The job gauges are refreshed with the database health check (every
    # SCHEDULER_DB_CHECK_INTERVAL_S, 5 s, at most every SCHEDULER_JOB_GAUGES_INTERVAL_S, here
    # 5 s): wait up to three refreshes for the finished job.
    scheduler_metrics_url = f"http://127.0.0.1:{stack.metrics_ports['scheduler']}/metrics"
    deadline = time.monotonic() + 15
    while 'scheduler_jobs{state="completed"}' not in metrics["scheduler"] and time.monotonic() < deadline:
        time.sleep(0.5)
        metrics["scheduler"] = httpx.get(scheduler_metrics_url).text
    assert 'scheduler_jobs{state="completed"}' in metrics["scheduler"]
    assert 'method="Submit"' in metrics["compute-local"]
    assert 'compute_local_jobs_finished_total{state="completed"}' in metrics["compute-local"]
    assert "grpc_server_handled_total" in metrics["keyvault"]


def test_trace_context_follows_a_request_from_gateway_to_compute(stack: Stack, alice: GatewayClient) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    reply = alice.request(
        "POST",
        "/api/train",
        json=small_spec(n_train=6, n_eval=2),
        headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
    )
    job_id = reply.json()["job_id"]
    list(alice.events(job_id))
    for service in ("scheduler", "compute-local"):
        lines = [json.loads(line) for line in stack.log_text(service).splitlines() if job_id in line]
        assert any(line.get("trace_id") == trace_id for line in lines), service


def test_every_grpc_service_answers_health_and_reflection(stack: Stack) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for name, service in stack.running.items():
        readiness = service.spec.grpc_service
        if not readiness:
            continue
        with grpc.insecure_channel(service.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for checked in ("", readiness):
                reply = health.Check(health_pb2.HealthCheckRequest(service=checked), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, checked)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            listed = {s.name for s in next(answers).list_services_response.service}
        assert {readiness, "grpc.health.v1.Health"} <= listed, (name, listed)


def test_cancel_stops_the_running_experiment(stack: Stack, alice: GatewayClient) -> None:
    job_id = alice.submit(small_spec(n_train=26, n_eval=8, epochs=100))["job_id"]
    for event in alice.events(job_id):
        if event.get("stage") == "training":
            break
    reply = alice.request("POST", f"/api/jobs/{job_id}/cancel")
    assert reply.status_code == 200, reply.text

    last = list(alice.events(job_id))[-1]
    assert last["state"] == "cancelled"
    assert alice.job(job_id)["status"] == "cancelled"
    assert alice.request("GET", f"/api/jobs/{job_id}/results").status_code == 409
    metrics = httpx.get(f"http://127.0.0.1:{stack.metrics_ports['compute-local']}/metrics").text
    assert 'compute_local_jobs_finished_total{state="cancelled"}' in metrics
    assert "compute_local_running_jobs 0.0" in metrics


def test_artifacts_download_whole_reload_and_are_owner_only(
    stack: Stack, alice: GatewayClient, tmp_path
) -> None:
    """scores.npy and the adapter come back through the gateway byte for byte; the adapter loads
    onto the base model and reproduces the fine-tuned eval losses; DELETE removes everything."""
    import numpy as np
    import torch
    from peft import PeftModel

    from gpu_core.data import encode_pair
    from gpu_core.evaluation import target_losses
    from gpu_core.runtime import load_model

    spec = small_spec(n_train=8, n_eval=3)
    job_id = alice.submit(spec)["job_id"]
    assert list(alice.events(job_id))[-1]["state"] == "completed"
    listed = alice.request("GET", f"/api/jobs/{job_id}/artifacts").json()["artifacts"]
    by_name = {a["name"]: a for a in listed}
    assert {
        "scores.npy",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "checkpoints/checkpoints.json",
    } <= set(by_name)
    results = alice.request("GET", f"/api/jobs/{job_id}/results")
    assert {a["name"] for a in results.json()["artifacts"]} == set(by_name)

    for name in by_name:
        reply = alice.request("GET", f"/api/jobs/{job_id}/artifacts/{name}")
        assert reply.status_code == 200, (name, reply.text)
        assert len(reply.content) == by_name[name]["bytes"]
        assert reply.headers["x-content-sha256"] == by_name[name]["sha256"]
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(reply.content)
    (child_scores,) = [
        record.parent / "artifacts" / "scores.npy"
        for record in (stack.data_dir / "compute-local" / "jobs").glob("*/job.json")
        if json.loads(record.read_text())["job_id"] == job_id
    ]
    downloaded = np.load(tmp_path / "scores.npy")
    assert downloaded.dtype == np.float32 and np.array_equal(downloaded, np.load(child_scores))
    assert np.allclose(downloaded, np.array(results.json()["influence"]["scores"], dtype=np.float32))

    loaded = load_model("local/tiny-llama", device=torch.device("cpu"))
    model = PeftModel.from_pretrained(loaded.model, tmp_path / "adapter")
    model.eval()
    max_len = spec["hyperparams"]["max_seq_len"]
    pairs = [encode_pair(loaded.tokenizer, e["prompt"], e["expected"], max_len) for e in spec["eval_data"]]
    losses = target_losses(model, pairs, loaded.tokenizer.pad_token_id, torch.device("cpu"))
    expected = [e["loss"] for e in results.json()["eval_results"]["finetuned"]["examples"]]
    assert losses == pytest.approx(expected, rel=1e-4)

    bob = GatewayClient(stack.gateway_url)
    bob.sign_in_locally("bob")
    for method, path in [
        ("GET", f"/api/jobs/{job_id}/artifacts"),
        ("GET", f"/api/jobs/{job_id}/artifacts/scores.npy"),
        ("GET", f"/api/jobs/{job_id}/artifacts/adapter/adapter_config.json"),
        ("DELETE", f"/api/jobs/{job_id}"),
    ]:
        assert bob.request(method, path).status_code == 404, path
    assert alice.request("GET", f"/api/jobs/{job_id}/artifacts/no-such.npy").status_code == 404

    deleted = alice.request("DELETE", f"/api/jobs/{job_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted_artifacts"] == len(by_name)
    assert alice.request("GET", f"/api/jobs/{job_id}").status_code == 404
    assert not list((stack.data_dir / "artifacts").glob(f"jobs/{job_id}/**/*.*"))


def test_model_directories_only_under_allowed_roots(stack: Stack, alice: GatewayClient, tmp_path) -> None:
    listed = stack.data_dir / "models" / "tiny-copy"
    unlisted = tmp_path / "tiny-copy"
    for target in (listed, unlisted):
        shutil.copytree(tiny_model_dir(), target)
    for model_id in ("/etc", "../x", str(unlisted)):
        reply = alice.request("POST", "/api/train", json={**small_spec(), "model_id": model_id})
        assert reply.status_code == 422, reply.text
        detail = reply.json()["detail"]
        assert f"model_id {model_id!r}" in detail and "ALLOWED_MODEL_DIRS" in detail
        assert str(stack.data_dir / "models") in detail
    job_id = alice.submit({**small_spec(n_train=4, n_eval=2), "model_id": str(listed)})["job_id"]
    events = list(alice.events(job_id))
    assert events[-1] == {**events[-1], "type": "status", "state": "completed"}, events[-1]
    assert any(str(listed) in (e.get("message") or "") for e in events if e.get("stage") == "loading_model")


def test_flood_is_refused_past_the_cap_and_another_user_starts_next(stack: Stack) -> None:
    flooder, other = GatewayClient(stack.gateway_url), GatewayClient(stack.gateway_url)
    flooder.sign_in_locally("flooder")
    other.sign_in_locally("other")
    spec = small_spec(n_train=4, n_eval=2)
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda _: flooder.request("POST", "/api/train", json=spec), range(50)))
    accepted = [r.json()["job_id"] for r in replies if r.status_code == 202]
    refused = [r for r in replies if r.status_code != 202]
    assert len(accepted) == 3 and len(refused) == 47
    for reply in refused:
        assert reply.status_code == 429
        assert int(reply.headers["Retry-After"]) >= 5
        assert reply.json()["detail"] == (
            "You have 3 active (queued or running) jobs on the hosted backend; the limit is 3 per "
            "user. Wait for one to finish or cancel one."
        )
    usage = flooder.request("GET", "/api/usage").json()
    assert usage["limits"][0] == {**usage["limits"][0], "name": "active_jobs", "used": 3, "limit": 3}

    mine = other.submit(spec)["job_id"]
    deadline = time.monotonic() + 300
    while other.job(mine)["status"] in ("queued", "submitted"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The flooder's backlog (all but the job that held the device) is still waiting when the
    # other user's first job starts.
    waiting = [j for j in accepted if flooder.job(j)["status"] in ("queued", "submitted")]
    assert len(waiting) >= 2, [flooder.job(j)["status"] for j in accepted]
    for job_id in accepted:
        flooder.request("POST", f"/api/jobs/{job_id}/cancel")
    assert list(other.events(mine))[-1]["state"] == "completed"


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_datasets_upload_once_count_and_are_owner_only(stack: Stack, alice: GatewayClient) -> None:
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(40)]
    params = {"kind": "train", "filename": "sums.jsonl"}
    stored = alice.request("POST", "/api/datasets", params=params, content=_jsonl(rows))
    assert stored.status_code == 201, stored.text
    body = stored.json()
    assert (body["format"], body["count"], body["existing"]) == ("prompt_completion", 40, False)
    assert body["dataset_id"].startswith("ds_")
    # Sent again (a retry): the same dataset, not a second copy.
    again = alice.request("POST", "/api/datasets", params=params, content=_jsonl(rows)).json()
    assert (again["dataset_id"], again["existing"]) == (body["dataset_id"], True)
    listed = alice.request("GET", "/api/datasets", params={"sha256": body["sha256"]}).json()["datasets"]
    assert [d["dataset_id"] for d in listed] == [body["dataset_id"]]
    assert alice.request("GET", f"/api/datasets/{body['dataset_id']}").json()["count"] == 40

    bob = GatewayClient(stack.gateway_url)
    bob.sign_in_locally("bob")
    for method in ("GET", "DELETE"):
        answer = bob.request(method, f"/api/datasets/{body['dataset_id']}")
        assert answer.status_code == 404 and answer.json()["detail"] == "Dataset not found"
    assert bob.request("GET", "/api/datasets").json()["datasets"] == []
    spec = small_spec(n_train=0)
    del spec["training_data"]
    spec["training_dataset_id"] = body["dataset_id"]
    refused = bob.request("POST", "/api/train", json=spec)
    assert refused.status_code == 422
    assert f"training_dataset_id: you have no dataset {body['dataset_id']}" in refused.text

    # Past the operator's dataset limit (50 in this stack): 413 naming it; a bad row: 422 naming it.
    over = alice.request("POST", "/api/datasets", params=params, content=_jsonl(rows + rows[:11]))
    assert over.status_code == 413
    assert over.json()["detail"] == "sums.jsonl has more than 50 examples; the limit is 50"
    bad = alice.request("POST", "/api/datasets", params=params, content=_jsonl([*rows[:2], {"prompt": "x"}]))
    assert bad.status_code == 422
    assert bad.json()["detail"] == [{"field": "line 3", "message": 'field "completion" is missing'}]


def test_an_experiment_on_a_stored_dataset_runs_and_the_dataset_stays_while_it_does(
    stack: Stack, alice: GatewayClient
) -> None:
    rows = [
        {"id": f"s{i}", "prompt": t["prompt"], "completion": t["completion"]}
        for i, t in enumerate(SAMPLE["training_data"][:12])
    ]
    dataset = alice.request(
        "POST", "/api/datasets", params={"kind": "train", "filename": "sample.jsonl"}, content=_jsonl(rows)
    ).json()
    spec = small_spec()
    del spec["training_data"]
    spec["training_dataset_id"] = dataset["dataset_id"]
    estimate = alice.request("POST", "/api/estimate", json=spec)
    assert estimate.status_code == 200, estimate.text
    inline = alice.request("POST", "/api/estimate", json=small_spec()).json()
    # The stored dataset's examples are counted (its figures are mean lengths: close, not equal).
    assert estimate.json()["estimates"][0]["estimated_time_s"] == pytest.approx(
        inline["estimates"][0]["estimated_time_s"], rel=0.25
    )
    submitted = alice.submit(spec)
    assert alice.job(submitted["job_id"])["n_train"] == 12
    busy = alice.request("DELETE", f"/api/datasets/{dataset['dataset_id']}")
    assert busy.status_code == 409 and submitted["job_id"] in busy.json()["detail"]
    events = list(alice.events(submitted["job_id"]))
    assert events[-1]["state"] == "completed", events[-3:]
    assert any("reading the training dataset (12 examples" in e.get("message", "") for e in events)
    assert alice.results(submitted["job_id"])["influence"]["train_ids"] == [r["id"] for r in rows]
    # Follow-up jobs read the spec's inline examples: refused, naming why, until they read datasets.
    query = alice.request(
        "POST", f"/api/jobs/{submitted['job_id']}/queries", json={"queries": [{"prompt": "1 + 1 ="}]}
    )
    assert query.status_code == 422 and "on a stored dataset is not supported yet" in query.text
    assert alice.request("DELETE", f"/api/datasets/{dataset['dataset_id']}").status_code == 200
    assert alice.request("GET", f"/api/datasets/{dataset['dataset_id']}").status_code == 404
