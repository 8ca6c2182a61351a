"""Jobs that cost money, through the whole stack (gateway, scheduler, compute-runpod, the fake
RunPod running the real worker, the artifact store on the S3 test server): a BYOK job whose
``/run`` RunPod accepted but whose answer was lost (a 5xx, or no answer before compute-runpod's
timeout) is never sent again; the scheduler finds the RunPod job through the worker's claim in
the store and the job completes, with exactly one accepted ``/run`` at the fake."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from devstack.client import GatewayClient
from devstack.s3_server import S3TestServer
from devstack.stack import FakeRunPodProcess, Stack

from .test_stack import small_spec

pytestmark = pytest.mark.e2e

RUNPOD_KEY = "rpa_MONEYFAULTS0123456789ABCDEFGHIJ"


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
    stack = Stack(
        data_dir=tmp_path_factory.mktemp("money-faults"),
        extra_env={
            **fake.settings_env(),
            **s3_server.store_env(prefix="money-faults"),
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
            "SCHEDULER_RETRY_MAX_S": "0.5",
            "RUNPOD_STREAM_WAIT_MS": "1000",
            "RUNPOD_HTTP_TIMEOUT_S": "2",
            "RUNPOD_RETRY_BASE_S": "0.05",
        },
        services=("keyvault", "compute-runpod", "scheduler", "gateway"),
    )
    # The fake RunPod reaches this gateway: every job is sent with its webhook.
    stack.extra_env["SCHEDULER_WEBHOOK_BASE_URL"] = stack.gateway_url
    with stack as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: Stack) -> GatewayClient:
    researcher = GatewayClient(stack.gateway_url)
    researcher.sign_in_locally("mona")
    reply = researcher.request("POST", "/api/settings/runpod-key", json={"api_key": RUNPOD_KEY})
    assert reply.status_code == 200, reply.text
    return researcher


@pytest.mark.parametrize("fault", [{"status": 502}, {"hang_s": 5.0}], ids=["5xx", "timeout"])
def test_a_run_accepted_then_lost_completes_with_one_runpod_job(
    client: GatewayClient, fake: FakeRunPodProcess, fault: dict
) -> None:
    accepted_before = len(fake.control("GET", "jobs")["accepted_runs"])  # type: ignore[index]
    fake.control("POST", "faults", after_accept=True, **fault)
    job = client.submit(small_spec(n_train=4, n_eval=2))
    events = list(client.events(job["job_id"]))
    assert events[-1]["state"] == "completed", events[-1]
    assert len(client.results(job["job_id"])["influence"]["scores"]) == 2
    accepted = fake.control("GET", "jobs")["accepted_runs"]  # type: ignore[index]
    assert len(accepted) - accepted_before == 1
    assert client.job(job["job_id"])["provider"] == "runpod"
    # RunPod's webhook went through the gateway to the scheduler (a 200), once; a forged one
    # (a wrong secret) is a 404 that says nothing more.
    deadline = time.monotonic() + 10
    while not (posts := _webhook_posts(fake, accepted[-1])):
        assert time.monotonic() < deadline, "no webhook was posted"
        time.sleep(0.1)
    assert posts == [[accepted[-1], 200]]
    forged = client.http.post(f"/api/webhooks/runpod/{job['job_id']}/forged-secret", json={})
    assert (forged.status_code, forged.json()) == (404, {"detail": "Not found"})


def test_a_result_runpod_forgot_while_the_scheduler_was_down_is_collected(
    stack: Stack, client: GatewayClient, fake: FakeRunPodProcess
) -> None:
    """The scheduler is killed while the job runs and comes back after RunPod (its retention
    shortened to 1 s) has forgotten the finished job: the result is collected from the store."""
    fake.control("POST", "mode", retention_s=1.0)
    try:
        job = _submit_and_kill_the_scheduler(stack, client, fake)
        deadline = time.monotonic() + 60
        runpod_job = fake.control("GET", "jobs")["accepted_runs"][-1]  # type: ignore[index]
        while fake.control("GET", "jobs")["jobs"].get(runpod_job) != "COMPLETED":  # type: ignore[index]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(2.0)  # past RunPod's (shortened) retention
        stack.start_service("scheduler")
        events = _events_once_reconnected(client, job["job_id"])
        assert events[-1]["state"] == "completed", events[-1]
        assert len(client.results(job["job_id"])["influence"]["scores"]) == 2
        assert "result collected from the artifact store" in stack.log_text("scheduler")
    finally:
        fake.control("POST", "mode", retention_s=1800.0)


def _webhook_posts(fake: FakeRunPodProcess, runpod_job: str) -> list[list]:
    posts = fake.control("GET", "jobs")["webhook_posts"]  # type: ignore[index]
    return [post for post in posts if post[0] == runpod_job]


def _events_once_reconnected(client: GatewayClient, job_id: str) -> list[dict]:
    """The job's events; the gateway answers 503 until its channel to the restarted scheduler
    is up again (gRPC's reconnect backoff)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return list(client.events(job_id))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _submit_and_kill_the_scheduler(stack: Stack, client: GatewayClient, fake: FakeRunPodProcess) -> dict:
    """Submit a job and SIGKILL the scheduler once it has stored RunPod's job id, while RunPod
    still holds the job in its queue (no GPU free), so it finishes only after the kill."""
    fake.control("POST", "mode", throttled=True)
    try:
        job = client.submit(small_spec(n_train=4, n_eval=2))
        deadline = time.monotonic() + 60
        while client.job(job["job_id"])["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        stack.stop_service("scheduler", signal.SIGKILL)
    finally:
        fake.control("POST", "mode", throttled=False)
    return job
