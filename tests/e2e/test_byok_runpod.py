"""Bring your own RunPod key, end to end through the gateway, against the fake RunPod (which runs
the real worker handler and so the real gpu_core pipeline on the tiny model).

Every key used here is collected; the last test scans every log line the services wrote, every
response body the gateway sent and every database row for any of them in plain text.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest

from devstack.client import GatewayClient
from devstack.stack import FakeRunPodProcess, Stack

from .actual_cost import assert_actual_cost, assert_status_shows_actual
from .test_stack import small_spec

pytestmark = pytest.mark.e2e

USED_KEYS: list[str] = []
RESPONSE_BODIES: list[str] = []


class RecordingClient(GatewayClient):
    """Keeps every response body, for the plaintext-key scan."""

    def request(self, method, path, **kwargs):
        reply = super().request(method, path, **kwargs)
        RESPONSE_BODIES.append(reply.text)
        return reply


def new_key() -> str:
    key = f"rpa_{secrets.token_hex(16).upper()}"
    USED_KEYS.append(key)
    return key


@pytest.fixture(scope="module")
def fake() -> FakeRunPodProcess:
    # Small result parts so every result crosses several stream chunks and is reassembled.
    process = FakeRunPodProcess.start(extra_env={"INFLUENCE_RESULT_CHUNK_BYTES": "4096"})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fake: FakeRunPodProcess):
    with Stack(
        data_dir=tmp_path_factory.mktemp("byok"),
        extra_env={
            **fake.settings_env(),
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
            "RUNPOD_QUEUE_TIMEOUT_S": "3",
            "RUNPOD_RETRY_BASE_S": "0.05",
            "RUNPOD_RETRY_MAX_WAIT_S": "0.5",
            "RUNPOD_STREAM_WAIT_MS": "1000",
        },
        services=("keyvault", "compute-local", "compute-runpod", "scheduler", "gateway"),
    ) as running:
        yield running


def researcher(stack: Stack, name: str) -> RecordingClient:
    client = RecordingClient(stack.gateway_url)
    client.sign_in_locally(name)
    return client


def funded_key(fake: FakeRunPodProcess, balance: float) -> str:
    key = new_key()
    fake.control("POST", "keys", key=key, balance=balance)
    return key


def save_key(client: GatewayClient, key: str):
    return client.request("POST", "/api/settings/runpod-key", json={"api_key": key})


def finish(client: GatewayClient, job_id: str) -> dict:
    events = list(client.events(job_id))
    return events[-1]


def test_invalid_key_is_refused_in_plain_words(stack: Stack) -> None:
    client = researcher(stack, "ivan")
    reply = save_key(client, new_key())
    assert reply.status_code == 400
    assert "Invalid RunPod API key" in reply.json()["detail"]
    assert client.request("GET", "/api/settings/compute").json()["backend"] == "hosted"


def test_zero_balance_key_is_refused(stack: Stack, fake: FakeRunPodProcess) -> None:
    client = researcher(stack, "zoe")
    key = new_key()
    fake.control("POST", "keys", key=key, balance=0.0)
    reply = save_key(client, key)
    assert reply.status_code == 402
    assert "balance" in reply.json()["detail"].lower()


def test_key_lacking_a_scope_is_refused_as_forbidden(stack: Stack, fake: FakeRunPodProcess) -> None:
    client = researcher(stack, "rhea")
    key = new_key()
    fake.control("POST", "keys", key=key, balance=20.0, scope="restricted")
    reply = save_key(client, key)
    assert reply.status_code == 403
    assert "serverless Read/Write" in reply.json()["detail"]
    assert client.request("GET", "/api/settings/runpod-key").json()["has_key"] is False


def test_key_check_while_runpod_is_down_is_a_503_naming_runpod(stack: Stack, fake: FakeRunPodProcess) -> None:
    client = researcher(stack, "ursula")
    key = funded_key(fake, 50.0)
    # Every attempt compute-runpod makes (RUNPOD_MAX_ATTEMPTS, 5 by default) meets a 503.
    fake.control("POST", "faults", route="serverless.list", status=503, times=5)
    reply = save_key(client, key)
    assert reply.status_code == 503
    assert "RunPod answered with a server error (HTTP 503)" in reply.json()["detail"]
    assert client.request("GET", "/api/settings/runpod-key").json()["has_key"] is False
    # RunPod back: the same key is saved.
    assert save_key(client, key).status_code == 200


def test_good_key_first_jobs_create_one_endpoint_and_results_arrive_whole(
    stack: Stack, fake: FakeRunPodProcess
) -> None:
    client = researcher(stack, "grace")
    key = funded_key(fake, 50.0)
    reply = save_key(client, key)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["last4"] == key[-4:] and body["backend"] == "runpod"
    creates_before = len(fake.requests("serverless.create"))

    spec = small_spec(n_train=8, n_eval=3)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = list(pool.map(lambda _: client.submit(spec), range(2)))
    for job in jobs:
        assert finish(client, job["job_id"])["state"] == "completed"
        result = client.results(job["job_id"])
        assert len(result["influence"]["scores"]) == 3
        view = client.job(job["job_id"])
        assert view["provider"] == "runpod"
        # RunPod's executionTime from /status, priced at the pool the estimate chose (the fake's
        # worker runs on the CPU, so it names no GPU).
        actual = assert_actual_cost(view, "runpod", view["estimated_gpu"], "RunPod executionTime")
        assert actual["delay_seconds"] > 0
    assert_status_shows_actual(client, jobs[0]["job_id"], client.job(jobs[0]["job_id"])["actual"])
    assert len(fake.requests("serverless.create")) - creates_before == 1
    settings = client.request("GET", "/api/settings/runpod-key").json()
    assert settings["endpoint_status"] == "ready" and settings["last4"] == key[-4:]

    removed = client.request("DELETE", "/api/settings/runpod-key")
    assert removed.status_code == 200
    assert client.request("GET", "/api/settings/compute").json()["backend"] == "hosted"
    assert client.request("GET", "/api/settings/runpod-key").json()["has_key"] is False


def test_valid_key_is_saved_with_a_note_when_graphql_is_gone(stack: Stack, fake: FakeRunPodProcess) -> None:
    client = researcher(stack, "gus")
    key = funded_key(fake, 50.0)
    fake.control("POST", "mode", graphql=False)
    try:
        reply = save_key(client, key)
    finally:
        fake.control("POST", "mode", graphql=True)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["backend"] == "runpod" and body["balance_usd"] is None
    assert "balance could not be read" in body["message"]
    assert "execution timeout" in body["message"]
    assert client.request("GET", "/api/settings/runpod-key").json()["has_key"] is True


def _runpod_user(stack: Stack, fake: FakeRunPodProcess, name: str, balance: float) -> GatewayClient:
    client = researcher(stack, name)
    assert save_key(client, funded_key(fake, balance)).status_code == 200
    return client


def test_low_balance_is_refused_before_anything_is_submitted(stack: Stack, fake: FakeRunPodProcess) -> None:
    client = _runpod_user(stack, fake, "lowe", balance=0.000001)
    runs_before = len(fake.requests("job.run"))
    job = client.submit(small_spec(n_train=8, n_eval=3))
    last = finish(client, job["job_id"])
    assert last["state"] == "failed"
    assert "balance" in last["error"].lower()
    assert len(fake.requests("job.run")) == runs_before


def test_no_gpu_says_so_in_plain_words(stack: Stack, fake: FakeRunPodProcess) -> None:
    client = _runpod_user(stack, fake, "nadia", balance=50.0)
    fake.control("POST", "mode", throttled=True)
    try:
        job = client.submit(small_spec(n_train=6, n_eval=2))
        last = finish(client, job["job_id"])
    finally:
        fake.control("POST", "mode", throttled=False)
    assert last["state"] == "failed"
    assert "No GPU available on RunPod" in last["error"]


def test_execution_timeout_says_so(stack: Stack, fake: FakeRunPodProcess) -> None:
    client = _runpod_user(stack, fake, "tim", balance=50.0)
    fake.control("POST", "mode", execution_timeout_s=0.5)
    try:
        job = client.submit(small_spec(n_train=26, n_eval=8, epochs=3))
        last = finish(client, job["job_id"])
    finally:
        fake.control("POST", "mode", execution_timeout_s=None)
    assert last["state"] == "failed"
    assert "timeout" in last["error"].lower()


def test_429_storm_and_5xx_lose_nothing_and_submit_once(stack: Stack, fake: FakeRunPodProcess) -> None:
    client = _runpod_user(stack, fake, "rita", balance=50.0)
    first = client.submit(small_spec(n_train=6, n_eval=2))  # creates the endpoint
    assert finish(client, first["job_id"])["state"] == "completed"
    runs_before = len([r for r in fake.requests("job.run") if r["status"] == 200])
    fake.control("POST", "faults", route="job.run", status=429, times=3, retry_after=0)
    fake.control("POST", "faults", route="job.status", status=503, times=2)
    job = client.submit(small_spec(n_train=6, n_eval=2))
    assert finish(client, job["job_id"])["state"] == "completed"
    accepted = [r for r in fake.requests("job.run") if r["status"] == 200]
    assert len(accepted) - runs_before == 1, "a retried /run must not submit the job twice"
    assert len(client.results(job["job_id"])["influence"]["scores"]) == 2


def test_a_failure_on_the_worker_reads_in_plain_words(stack: Stack, fake: FakeRunPodProcess) -> None:
    """gpu_core raises on the worker; the SDK reports ``handler: <message> \ntraceback: ...``;
    the researcher reads the message, never the traceback."""
    client = _runpod_user(stack, fake, "fay", balance=50.0)
    spec = small_spec(n_train=6, n_eval=2)
    spec["hyperparams"]["target_modules"] = ["no_such_proj"]
    last = finish(client, client.submit(spec)["job_id"])
    assert last["state"] == "failed"
    assert last["error"].startswith("The experiment failed on the RunPod worker: ")
    assert "no_such_proj" in last["error"]
    assert "Traceback" not in last["error"] and "handler:" not in last["error"]


def test_a_result_over_runpods_payload_limit_is_a_plain_error(stack: Stack, fake: FakeRunPodProcess) -> None:
    """No artifact store is configured here, so a result that RunPod could not carry is refused
    with a message that says so (the limit is lowered so that a small job's result exceeds it)."""
    fake.control("POST", "mode", max_payload_bytes=12_000)
    try:
        client = _runpod_user(stack, fake, "pat", balance=50.0)  # a new endpoint: a new worker
        last = finish(client, client.submit(small_spec(n_train=24, n_eval=8))["job_id"])
    finally:
        fake.control("POST", "mode", max_payload_bytes=10_000_000)
    assert last["state"] == "failed"
    assert "over RunPod's limit for a job's output" in last["error"]
    assert "artifact store" in last["error"]


def test_a_gated_model_needs_the_researchers_hf_token_which_reaches_the_worker(
    stack: Stack, fake: FakeRunPodProcess
) -> None:
    client = _runpod_user(stack, fake, "gina", balance=50.0)
    gated = {**small_spec(n_train=6, n_eval=2), "model_id": "meta-llama/Llama-3.2-1B"}
    refused = client.request("POST", "/api/train", json=gated)
    assert refused.status_code == 422, refused.text
    (problem,) = refused.json()["detail"]
    assert problem["field"] == "model_id"
    assert "gated on Hugging Face" in problem["message"]
    assert "add your Hugging Face token (HF_TOKEN)" in problem["message"]
    assert "PUT /api/settings/hf-token" in problem["message"]
    assert client.request("GET", "/api/settings/hf-token").json()["has_token"] is False

    token = "hf_" + secrets.token_hex(17)
    USED_KEYS.append(token)  # the sweep below looks for it everywhere
    saved = client.request("PUT", "/api/settings/hf-token", json={"token": token})
    assert saved.status_code == 200, saved.text
    assert saved.json()["has_token"] is True and saved.json()["last4"] == token[-4:]
    assert client.request("GET", "/api/settings/hf-token").json()["last4"] == token[-4:]

    runs_before = set(fake.control("GET", "jobs")["accepted_runs"])
    job = client.submit(gated)
    last = finish(client, job["job_id"])
    # The worker got the token with the job; the model itself cannot load here (no hub access).
    assert last["state"] == "failed", last
    (run,) = set(fake.control("GET", "jobs")["accepted_runs"]) - runs_before
    assert fake.control("GET", f"jobs/{run}/input")["input"]["hf_token"] == token

    removed = client.request("DELETE", "/api/settings/hf-token")
    assert removed.json() == {"has_token": False, "deleted": True}
    assert client.request("POST", "/api/train", json=gated).status_code == 422


def test_replacing_the_key_while_a_job_runs_strands_nothing(stack: Stack, fake: FakeRunPodProcess) -> None:
    """A job is followed and cancelled with the key it was submitted with: a key of another
    RunPod account is refused with the job named, or, asked to, cancels the job first on the
    account it runs on (with the old key) and is then stored."""
    old_key, other_key = funded_key(fake, 50.0), funded_key(fake, 50.0)  # two accounts
    client = researcher(stack, "rhea")
    assert save_key(client, old_key).status_code == 200
    fake.control("POST", "mode", throttled=True)  # the job waits in RunPod's queue
    try:
        job = client.submit(small_spec(n_train=6, n_eval=2))
        deadline = time.monotonic() + 20
        while client.job(job["job_id"])["status"] != "submitted":
            assert time.monotonic() < deadline, client.job(job["job_id"])
            time.sleep(0.1)
        refused = save_key(client, other_key)
        assert refused.status_code == 409
        assert job["job_id"] in refused.json()["detail"] and "cancel_jobs=true" in refused.json()["detail"]
        kept = client.request("GET", "/api/settings/runpod-key").json()
        assert (kept["last4"], kept["backend"]) == (old_key[-4:], "runpod")
        cancels_before = len(fake.requests("job.cancel"))
        replaced = client.request(
            "POST", "/api/settings/runpod-key?cancel_jobs=true", json={"api_key": other_key}
        )
        assert replaced.status_code == 200, replaced.text
        assert (replaced.json()["last4"], replaced.json()["backend"]) == (other_key[-4:], "runpod")
    finally:
        fake.control("POST", "mode", throttled=False)
    cancels = fake.requests("job.cancel")[cancels_before:]
    assert [old_key in str(c["headers"].get("authorization")) for c in cancels] == [True]  # type: ignore[union-attr]
    assert client.job(job["job_id"])["status"] == "cancelled"
    assert finish(client, job["job_id"])["state"] == "cancelled"


def test_no_plaintext_key_in_logs_responses_or_tables(stack: Stack) -> None:
    assert USED_KEYS, "the tests above must have used keys"
    logs = "\n".join(stack.log_text(name) for name in stack.running)
    responses = "\n".join(RESPONSE_BODIES)

    async def dump_tables() -> str:
        connection = await asyncpg.connect(stack.database_url)
        try:
            tables = await connection.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
            rows = []
            assert await connection.fetchval("SELECT count(*) FROM credentials") > 0
            for table in tables:
                for row in await connection.fetch(f'SELECT * FROM "{table["table_name"]}"'):
                    rows.append(json.dumps({k: repr(v) for k, v in dict(row).items()}))
            return "\n".join(rows)
        finally:
            await connection.close()

    tables = asyncio.run(dump_tables())
    for key in USED_KEYS:
        for where, text in (("logs", logs), ("responses", responses), ("tables", tables)):
            assert key not in text, f"plaintext key found in {where}"
            assert key[4:] not in text, f"key body found in {where}"


def test_removing_the_key_while_a_job_runs_strands_nothing(stack: Stack, fake: FakeRunPodProcess) -> None:
    """RunPod would go on running (and billing) a job whose key is gone: the removal is refused
    with the job named, or cancels it at RunPod first (with the key) when asked to."""
    client = _runpod_user(stack, fake, "kim", balance=50.0)
    fake.control("POST", "mode", throttled=True)  # the job waits in RunPod's queue
    try:
        job = client.submit(small_spec(n_train=6, n_eval=2))
        deadline = time.monotonic() + 20
        while client.job(job["job_id"])["status"] != "submitted":
            assert time.monotonic() < deadline, client.job(job["job_id"])
            time.sleep(0.1)
        refused = client.request("DELETE", "/api/settings/runpod-key")
        assert refused.status_code == 409
        assert job["job_id"] in refused.json()["detail"]
        assert client.request("GET", "/api/settings/runpod-key").json()["has_key"] is True
        cancels_before = len(fake.requests("job.cancel"))
        removed = client.request("DELETE", "/api/settings/runpod-key?cancel_jobs=true")
        assert removed.status_code == 200, removed.text
    finally:
        fake.control("POST", "mode", throttled=False)
    assert len(fake.requests("job.cancel")) - cancels_before == 1
    assert client.job(job["job_id"])["status"] == "cancelled"
    assert finish(client, job["job_id"])["state"] == "cancelled"
    assert client.request("GET", "/api/settings/runpod-key").json()["has_key"] is False
