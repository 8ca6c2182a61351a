"""Jobs that cost money, through the whole stack (gateway, scheduler, compute-runpod, the fake
RunPod running the real worker, the artifact store on the S3 test server): a BYOK job whose
``/run`` RunPod accepted but whose answer was lost (a 5xx, or no answer before compute-runpod's
timeout) is never sent again; the scheduler finds the RunPod job through the worker's claim in
the store and the job completes, with exactly one accepted ``/run`` at the fake.

The stack has a public address (SCHEDULER_WEBHOOK_BASE_URL, the gateway), so the worker asks the
gateway's upload route for each file's URL, of that file's size (scheduler.uploads); the route
answers only the job's secret, and only while the job runs."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from devstack.client import GatewayClient
from devstack.s3_server import S3TestServer
from devstack.stack import FakeRunPodProcess, Stack
from gpu_core.uploads import CLAIM_NAME, UPLOAD_GRANT_NAME

from .test_stack import small_spec

pytestmark = pytest.mark.e2e

RUNPOD_KEY = "rpa_MONEYFAULTS0123456789ABCDEFGHIJ"


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


def test_the_worker_asked_for_each_files_url_and_the_route_answers_only_the_running_job(
    stack: Stack, client: GatewayClient, fake: FakeRunPodProcess
) -> None:
    job = client.submit(small_spec(n_train=4, n_eval=2))
    events = list(client.events(job["job_id"]))
    assert events[-1]["state"] == "completed", events[-1]
    listed = client.request("GET", f"/api/jobs/{job['job_id']}/artifacts").json()["artifacts"]
    artifacts = {entry["name"] for entry in listed}
    assert "scores.npy" in artifacts
    runpod_job = fake.control("GET", "jobs")["accepted_runs"][-1]  # type: ignore[index]
    sent = fake.control("GET", f"jobs/{runpod_job}/input")["input"]["artifact_transport"]  # type: ignore[index]
    # No URL for the run's files in the job's input: each was asked for, with its size, at upload.
    assert set(sent["urls"]) == {CLAIM_NAME, CLAIM_NAME + ":read", UPLOAD_GRANT_NAME}
    route = sent["urls"][UPLOAD_GRANT_NAME]
    prefix = f"{stack.gateway_url}/api/uploads/{job['job_id']}/"
    assert route.startswith(prefix)
    secret = route.removeprefix(prefix)
    granted = [line for line in stack.log_text("scheduler").splitlines() if "upload URL granted" in line]
    for name in ("scores.npy", "_worker/result.json"):  # the result record is asked for too
        assert any(job["job_id"] in line and name in line for line in granted), name
    assert secret not in stack.log_text("scheduler") + stack.log_text("gateway")
    # The ended job's route: a wrong secret is a 403 that does not repeat it; the right one a 409.
    ask = {"name": "scores.npy", "bytes": 10, "sha256": "0" * 64}
    wrong = client.http.post(f"/api/uploads/{job['job_id']}/not-the-secret", json=ask)
    assert wrong.status_code == 403 and "not-the-secret" not in wrong.text
    ended = client.http.post(f"/api/uploads/{job['job_id']}/{secret}", json=ask)
    assert ended.status_code == 409 and "ended" in ended.json()["detail"]
    assert client.request("DELETE", f"/api/jobs/{job['job_id']}").status_code in (200, 204)
    gone = client.http.post(f"/api/uploads/{job['job_id']}/{secret}", json=ask)
    assert gone.status_code == 404


def test_a_job_whose_files_exceed_the_operators_limit_fails_naming_it(
    stack: Stack, client: GatewayClient
) -> None:
    _restart_scheduler(stack, SCHEDULER_UPLOAD_MAX_JOB_BYTES="1000")
    try:
        job = client.submit(small_spec(n_train=4, n_eval=2))
        last = list(client.events(job["job_id"]))[-1]
    finally:
        _restart_scheduler(stack, SCHEDULER_UPLOAD_MAX_JOB_BYTES="32000000000")
    assert last["state"] == "failed", last
    assert "HTTP 413" in last["message"] and "SCHEDULER_UPLOAD_MAX_JOB_BYTES" in last["message"], last
    assert client.request("GET", f"/api/jobs/{job['job_id']}/artifacts").json()["artifacts"] == []


def test_the_worker_waits_for_the_upload_route_while_the_scheduler_restarts(
    stack: Stack, client: GatewayClient, fake: FakeRunPodProcess
) -> None:
    """The scheduler is killed while RunPod holds the job and started again once the worker has
    been refused its first upload URL (a 503 from the gateway): it asks again and the job completes."""
    refusals = stack.log_text("gateway").count("scheduler unavailable")
    job = _submit_and_kill_the_scheduler(stack, client, fake)
    # Nothing else calls the gateway meanwhile: its next "scheduler unavailable" is the worker's ask.
    deadline = time.monotonic() + 120
    while stack.log_text("gateway").count("scheduler unavailable") == refusals:
        assert time.monotonic() < deadline, "the worker never asked for an upload URL"
        time.sleep(0.2)
    stack.start_service("scheduler")
    events = _events_once_reconnected(client, job["job_id"])
    assert events[-1]["state"] == "completed", events[-1]
    assert len(client.results(job["job_id"])["influence"]["scores"]) == 2


def test_a_result_runpod_forgot_while_the_scheduler_was_down_is_collected(
    stack: Stack, client: GatewayClient, fake: FakeRunPodProcess
) -> None:
    """The scheduler is killed while the job runs and comes back after RunPod (its retention
    shortened to 1 s) has forgotten the finished job: the result is collected from the store.
    The worker uploads while the scheduler is down only with URLs minted at dispatch: this test
    runs the scheduler without the public address (the upload route needs the scheduler)."""
    _restart_scheduler(stack, SCHEDULER_WEBHOOK_BASE_URL="")
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
        _restart_scheduler(stack, SCHEDULER_WEBHOOK_BASE_URL=stack.gateway_url)


def _restart_scheduler(stack: Stack, **env: str) -> None:
    """Restart the scheduler with ``env``; return once the gateway reaches it again."""
    stack.stop_service("scheduler")
    stack.extra_env.update(env)
    stack.start_service("scheduler")
    deadline = time.monotonic() + 30
    while httpx.get(f"{stack.gateway_url}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not reach the restarted scheduler"
        time.sleep(0.2)


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
