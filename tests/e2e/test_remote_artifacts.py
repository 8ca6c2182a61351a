"""A job's files from workers far from the dashboard, end to end through the gateway, with the
artifact store on the S3 test server (moto on loopback):

- RunPod: the fake RunPod runs the real worker under the runpod SDK's production loop and enforces
  RunPod's payload limits (10 MB for a job's input and output). A TracIn job of 10,000 training x
  1,000 eval examples (the gateway's maximums) writes a 40 MB score matrix that no RunPod answer
  could carry; the worker uploads it to a presigned PUT URL, RunPod carries only the manifest, and
  the scheduler checks every sha256 in the store before the job is COMPLETED.
- Modal: the in-process adapter runs the Modal app's function body, which uploads the same way.

The stack has a public address (SCHEDULER_WEBHOOK_BASE_URL, the gateway): every worker asks the
gateway's upload route for each file's URL, signed for that file's size (scheduler.uploads).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.specs import tracin_spec
from devstack.client import GatewayClient
from devstack.s3_server import S3TestServer
from devstack.stack import FakeRunPodProcess, Stack
from gpu_core.uploads import UPLOAD_GRANT_NAME

from .remote_store import download, store_object
from .test_stack import small_spec

pytestmark = pytest.mark.e2e

RUNPOD_KEY = "rpa_REMOTEARTIFACTS0123456789ABCDEF"
N_TRAIN, N_EVAL = 10_000, 1_000


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeRunPodProcess, s3_server: S3TestServer
) -> Iterator[Stack]:
    stack = Stack(
        data_dir=tmp_path_factory.mktemp("remote-artifacts"),
        extra_env={
            **fake.settings_env(),
            **s3_server.store_env(prefix="remote"),
            "HOSTED_PROVIDER": "modal",
            "COMPUTE_MODAL_BACKEND": "inprocess",
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
            "RUNPOD_STREAM_WAIT_MS": "1000",
        },
        services=("keyvault", "compute-runpod", "compute-modal", "scheduler", "gateway"),
    )
    # Workers reach this gateway: each asks its upload route for every file's URL.
    stack.extra_env["SCHEDULER_WEBHOOK_BASE_URL"] = stack.gateway_url
    with stack as running:
        yield running


def large_spec() -> dict:
    """The issue's job (TracIn, 1 epoch, one new token, no few-shot), in batches of 64."""
    spec = tracin_spec(N_TRAIN, N_EVAL)
    spec["hyperparams"]["batch_size"] = 64
    return spec


def test_runpod_10000_x_1000_job_uploads_its_files_to_presigned_urls(
    stack: Stack, fake: FakeRunPodProcess, s3_server: S3TestServer
) -> None:
    client = GatewayClient(stack.gateway_url, timeout_s=120)
    client.sign_in_locally("rosa")
    assert client.request("POST", "/api/settings/runpod-key", json={"api_key": RUNPOD_KEY}).status_code == 200
    job_id = client.submit(large_spec())["job_id"]
    last = list(client.events(job_id))[-1]
    assert last["state"] == "completed", last

    results = client.request("GET", f"/api/jobs/{job_id}/results")
    assert len(results.content) < 5_000_000
    result = results.json()
    assert result["influence"].get("scores") is None and result["influence"]["heatmap"]
    artifacts = client.request("GET", f"/api/jobs/{job_id}/artifacts").json()["artifacts"]
    listed = {a["name"]: a for a in artifacts}
    assert listed["scores.npy"]["bytes"] == 128 + 4 * N_TRAIN * N_EVAL
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(listed)

    # The worker's upload is what the store holds and what the researcher downloads, byte for byte.
    scores = download(client, job_id, "scores.npy")
    assert hashlib.sha256(scores).hexdigest() == listed["scores.npy"]["sha256"]
    assert scores == store_object(s3_server, "remote", f"jobs/{job_id}/scores.npy")
    matrix = np.load(io.BytesIO(scores))
    assert matrix.shape == (N_EVAL, N_TRAIN) and matrix.dtype == np.float32
    heatmap = result["influence"]["heatmap"]
    row = [f"e{i}" for i in range(N_EVAL)].index(heatmap["eval_ids"][0])
    col = [f"t{j}" for j in range(N_TRAIN)].index(heatmap["train_ids"][0])
    assert heatmap["scores"][0][0] == pytest.approx(float(matrix[row, col]), rel=1e-5)
    adapter = download(client, job_id, "adapter/adapter_config.json")
    assert json.loads(adapter)["r"] > 0

    # The job's input held no URL for its files: the worker asked for each, of its size.
    runpod_job = fake.control("GET", "jobs")["accepted_runs"][-1]  # type: ignore[index]
    sent = fake.control("GET", f"jobs/{runpod_job}/input")["input"]["artifact_transport"]  # type: ignore[index]
    assert "scores.npy" not in sent["urls"] and UPLOAD_GRANT_NAME in sent["urls"]
    # RunPod carried the plan in, and only progress and the small result out (its limit is 10 MB).
    (run,) = [r for r in fake.requests("job.run") if r["status"] == 200][-1:]
    assert int(run["headers"]["content-length"]) < 10_000_000
    done = [r for r in fake.requests("worker.done") if r["status"] == 200]
    assert done and int(done[-1]["headers"]["content-length"]) < 10_000_000 < len(scores)


def test_modal_job_uploads_its_files_to_presigned_urls(stack: Stack, s3_server: S3TestServer) -> None:
    client = GatewayClient(stack.gateway_url)
    client.sign_in_locally("mona")
    job_id = client.submit(small_spec(n_train=8, n_eval=3))["job_id"]
    assert list(client.events(job_id))[-1]["state"] == "completed"
    assert client.job(job_id)["provider"] == "modal"
    listed = client.request("GET", f"/api/jobs/{job_id}/artifacts").json()["artifacts"]
    assert {"scores.npy", "adapter/adapter_model.safetensors"} <= {a["name"] for a in listed}
    for artifact in listed:
        data = store_object(s3_server, "remote", f"jobs/{job_id}/{artifact['name']}")
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"], artifact["name"]
    scores = np.load(io.BytesIO(download(client, job_id, "scores.npy")))
    result = client.results(job_id)
    assert np.allclose(scores, np.array(result["influence"]["scores"], dtype=np.float32))
    # The function also left its result in the store, which outlives Modal's 7 days.
    stored = json.loads(store_object(s3_server, "remote", f"jobs/{job_id}/_worker/result.json"))
    assert np.allclose(np.array(stored["influence"]["scores"], dtype=np.float32), scores)


@pytest.fixture(scope="module")
def planted_experiments(stack: Stack) -> Iterator[Callable[[str], tuple[GatewayClient, dict, str]]]:
    """A finished planted-duplicate experiment per backend, run once and shared by the later
    jobs of it (a query, a merge): (its owner's client, its spec, its job id)."""
    from benchmarks.planted import planted_duplicate_spec

    made: dict[str, tuple[GatewayClient, dict, str]] = {}

    def experiment(backend: str) -> tuple[GatewayClient, dict, str]:
        if backend not in made:
            client = GatewayClient(stack.gateway_url)
            client.sign_in_locally(f"quinn-{backend}")
            if backend == "runpod":
                saved = client.request("POST", "/api/settings/runpod-key", json={"api_key": RUNPOD_KEY})
                assert saved.status_code == 200, saved.text
            spec = planted_duplicate_spec("trackstar", 16, 2, 60)
            job_id = client.submit(spec)["job_id"]
            assert list(client.events(job_id))[-1]["state"] == "completed"
            assert client.job(job_id)["provider"] == backend
            made[backend] = (client, spec, job_id)
        return made[backend]

    yield experiment


@pytest.mark.parametrize("backend", ["runpod", "modal"])
def test_a_query_downloads_the_experiments_files_from_presigned_gets(
    planted_experiments: Callable[[str], tuple[GatewayClient, dict, str]], backend: str
) -> None:
    """A follow-up query on RunPod (the SDK loop) and on Modal (the function body): the worker
    downloads the experiment's adapter and gradient index from presigned GETs of the S3 store
    (sha256 checked) and answers from that index."""
    client, spec, job_id = planted_experiments(backend)
    copied = spec["training_data"][11]
    reply = client.request(
        "POST", f"/api/jobs/{job_id}/queries", json={"queries": [{"prompt": copied["prompt"]}], "top_k": 2}
    )
    assert reply.status_code == 202, reply.text
    query_id = reply.json()["query_job_id"]
    events = list(client.events(query_id))
    assert events[-1]["state"] == "completed", events[-3:]
    assert any("downloading the experiment's" in str(e.get("message")) for e in events)
    query = client.request("GET", f"/api/jobs/{job_id}/queries/{query_id}").json()
    assert query["provider"] == backend
    result = query["result"]
    assert result["source"] == "index"
    assert result["results"][0]["helpful"][0]["id"] == "t11"
    assert result["results"][0]["helpful"][0]["text"]["answer"] == copied["completion"]


@pytest.mark.parametrize("backend", ["runpod", "modal"])
def test_a_curation_runs_on_the_experiments_backend_and_stays_the_owners(
    stack: Stack, fake: FakeRunPodProcess, backend: str
) -> None:
    """The training data of an experiment on RunPod (the SDK loop) and on Modal (the function
    body): the ranking from its summary in the S3 store (a presigned GET), a curation with one
    random control on the same backend, the curated set as JSONL; other users get 404."""
    from benchmarks.curate import task_spec

    client = GatewayClient(stack.gateway_url)
    client.sign_in_locally(f"cora-{backend}")
    if backend == "runpod":
        saved = client.request("POST", "/api/settings/runpod-key", json={"api_key": RUNPOD_KEY})
        assert saved.status_code == 200, saved.text
    spec = task_spec("tracin", n_train=12, n_eval=3).model_dump(mode="json", exclude_none=True)
    spec["hyperparams"]["epochs"] = 1
    job_id = client.submit(spec)["job_id"]
    assert list(client.events(job_id))[-1]["state"] == "completed"
    assert client.job(job_id)["provider"] == backend

    base = f"/api/jobs/{job_id}"
    ranked = client.request("GET", f"{base}/training-examples", params={"sort": "suspect", "limit": 12})
    assert ranked.status_code == 200, ranked.text
    assert ranked.json()["total"] == 12
    assert [row["suspect_rank"] for row in ranked.json()["examples"]] == list(range(1, 13))
    suspects = [row["id"] for row in ranked.json()["examples"][:2]]

    body = {"drop": {"by": "suspect", "count": 2}, "controls": 1, "seeds": [0]}
    submitted = client.request("POST", f"{base}/curations", json=body)
    assert submitted.status_code == 202, submitted.text
    curation_id = submitted.json()["curation_job_id"]
    assert list(client.events(curation_id))[-1]["state"] == "completed"
    curation = client.request("GET", f"{base}/curations/{curation_id}").json()
    assert curation["provider"] == backend
    result = curation["result"]
    assert result["selected_ids"] == suspects
    assert [run["selection"] for run in result["runs"]] == ["curated", "control-1"]
    assert result["loss"]["n_pairs"] == 3

    curated = client.request("GET", f"{base}/curations/{curation_id}/training-set.jsonl")
    assert curated.status_code == 200
    kept = [json.loads(line)["id"] for line in curated.text.splitlines()]
    assert kept == [e["id"] for e in spec["training_data"] if e["id"] not in suspects]

    other = GatewayClient(stack.gateway_url)
    other.sign_in_locally(f"mallory-{backend}")
    for method, path in [
        ("GET", f"{base}/training-examples"),
        ("POST", f"{base}/curations"),
        ("GET", f"{base}/curations/{curation_id}"),
        ("GET", f"{base}/curations/{curation_id}/training-set.jsonl"),
    ]:
        reply = other.request(method, path, json=body if method == "POST" else None)
        assert reply.status_code == 404, (path, reply.text)


def _stored_dataset(client: GatewayClient, rows: list[dict]) -> dict:
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    reply = client.request(
        "POST", "/api/datasets", params={"kind": "train", "filename": "t.jsonl"}, content=content
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def _spec_on(dataset: dict) -> dict:
    spec = small_spec(n_eval=3)
    del spec["training_data"]
    spec["training_dataset_id"] = dataset["dataset_id"]
    return spec


@pytest.mark.parametrize("backend", ["runpod", "modal"])
def test_a_stored_dataset_reaches_a_remote_worker_as_a_presigned_get(
    stack: Stack, fake: FakeRunPodProcess, s3_server: S3TestServer, backend: str
) -> None:
    client = GatewayClient(stack.gateway_url)
    client.sign_in_locally(f"dana-{backend}")
    if backend == "runpod":
        assert (
            client.request("POST", "/api/settings/runpod-key", json={"api_key": RUNPOD_KEY}).status_code
            == 200
        )
    rows = [{**t, "id": f"d{i}"} for i, t in enumerate(small_spec(n_train=8)["training_data"])]
    dataset = _stored_dataset(client, rows)
    key = f"datasets/{dataset['dataset_id']}/data.jsonl"
    assert hashlib.sha256(store_object(s3_server, "remote", key)).hexdigest() == dataset["sha256"]
    job_id = client.submit(_spec_on(dataset))["job_id"]
    events = list(client.events(job_id))
    assert events[-1]["state"] == "completed", events[-3:]
    assert client.job(job_id)["provider"] == backend
    assert any("reading the training dataset (8 examples" in str(e.get("message")) for e in events)
    assert client.results(job_id)["influence"]["train_ids"] == [r["id"] for r in rows]
    if backend == "runpod":  # the examples travelled by URL, not in RunPod's payload
        (run,) = [r for r in fake.requests("job.run") if r["status"] == 200][-1:]
        assert int(run["headers"]["content-length"]) < 20_000

    # The stored object changed behind the dataset's record: the worker refuses it, nothing trains.
    import boto3

    from devstack.s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

    original = store_object(s3_server, "remote", key)
    boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    ).put_object(Bucket=s3_server.bucket, Key=f"remote/{key}", Body=original.replace(b"prompt", b"PROMPT", 1))
    refused = list(client.events(client.submit(_spec_on(dataset))["job_id"]))
    assert refused[-1]["state"] == "failed", [e.get("message") for e in refused]
    assert "the stored object was changed; refusing it" in json.dumps(refused[-3:])
    assert not any(e.get("stage") == "training" for e in refused)


def test_a_runpod_merge_uploads_weights_that_load_with_from_pretrained_and_reproduce_the_losses(
    planted_experiments: Callable[[str], tuple[GatewayClient, dict, str]],
    fake: FakeRunPodProcess,
    s3_server: S3TestServer,
    tmp_path: Path,
) -> None:
    """Merged weights on RunPod (the SDK loop): the worker downloads the adapter from a presigned
    GET, merges, uploads the shards to presigned PUTs, and the scheduler verifies them in the
    store; the researcher's download loads with plain from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpu_core.data import batches
    from gpu_core.evaluation import target_losses
    from gpu_core.pipeline import experiment_encoder
    from gpu_core.schemas import parse_spec

    client, spec, job_id = planted_experiments("runpod")
    reply = client.request("POST", f"/api/jobs/{job_id}/merges", json={"shard_size_mb": 0.1})
    assert reply.status_code == 202, reply.text
    merge_id = reply.json()["merge_job_id"]
    events = list(client.events(merge_id))
    assert events[-1]["state"] == "completed", events[-3:]
    assert any("downloading the experiment's" in str(e.get("message")) for e in events)
    merge = client.request("GET", f"/api/jobs/{job_id}/merges/{merge_id}").json()
    assert merge["provider"] == "runpod" and merge["result"]["check"]["passed"] is True
    listed = client.request("GET", f"/api/jobs/{merge_id}/artifacts").json()["artifacts"]
    assert {
        "merged/config.json",
        "merged/model.safetensors.index.json",
        "merged/model-00001.safetensors",
    } <= {a["name"] for a in listed}
    folder = tmp_path
    for artifact in listed:
        data = download(client, merge_id, artifact["name"])
        assert data == store_object(s3_server, "remote", f"jobs/{merge_id}/{artifact['name']}")
        target = folder / artifact["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    model = AutoModelForCausalLM.from_pretrained(folder / "merged")
    tokenizer = AutoTokenizer.from_pretrained(folder / "merged")
    parsed = parse_spec(spec)
    encoder = experiment_encoder(parsed, tokenizer)
    losses: list[float] = []
    for chunk in batches(parsed.eval_data, parsed.hyperparams.batch_size):
        pairs = [encoder.encode(example.turns, last_only=True) for example in chunk]
        losses += target_losses(model, pairs, tokenizer.pad_token_id, model.device)
    finetuned = client.results(job_id)["eval_results"]["finetuned"]["examples"]
    assert losses == pytest.approx([example["loss"] for example in finetuned], rel=1e-4)
    # The weights went to the store directly: RunPod carried only the manifest.
    done = [r for r in fake.requests("worker.done") if r["status"] == 200]
    assert done and int(done[-1]["headers"]["content-length"]) < sum(a["bytes"] for a in listed)
