"""RunPod's webhook (issue 22 item 4): with a public base URL set, each RunPod job is sent with a
webhook URL holding a per-job secret (only its hash stored); WakeJob with that secret makes the
job's next poll due at once, on the replica following it, and nothing else: the provider's status
stays the truth, and a wrong secret, an unknown job or a replay after the end is NOT_FOUND."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import asyncpg
import grpc
import pytest

from influence.v1 import common_pb2, scheduler_pb2

BASE = "https://dash.example.org"


async def _wake(stub, job_id: str, secret: str) -> grpc.StatusCode:
    try:
        await stub.WakeJob(scheduler_pb2.WakeJobRequest(job_id=job_id, secret=secret))
    except grpc.aio.AioRpcError as exc:
        assert exc.details() == "not found"  # nothing said about why
        return exc.code()
    return grpc.StatusCode.OK


async def _until_polls(provider_job, polls: int, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while provider_job.polls < polls:
            await asyncio.sleep(0.02)


async def test_a_webhook_wakes_the_poll_early_and_a_forged_one_changes_nothing(
    start, provider, database_url, h
) -> None:
    # Polls 30 s apart and slowing: without the webhook nothing would happen during this test.
    scheduler = await start(
        scheduler_webhook_base_url=BASE + "/",
        scheduler_poll_interval_s=30.0,
        scheduler_poll_max_interval_s=60.0,
    )
    stub = scheduler.stub
    provider.servicer.plan = h.plan(events=h.progress_events(2), chunk=2, waiting_polls=2)
    await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="wendy", backend="runpod"))
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="wendy", spec_json=h.spec_json()))
    provider_job = await h.until_submitted(provider.servicer, job.id)
    await _until_polls(provider_job, 1)

    (sent,) = [r for r in provider.servicer.submit_requests if r.job_id == job.id]
    prefix = f"{BASE}/api/webhooks/runpod/{job.id}/"
    assert sent.webhook_url.startswith(prefix)
    secret = sent.webhook_url.removeprefix(prefix)
    assert len(secret) >= 40
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow("SELECT * FROM jobs WHERE id = $1", uuid.UUID(job.id))
    finally:
        await connection.close()
    assert row["webhook_secret_sha256"] == hashlib.sha256(secret.encode()).digest()
    assert not any(secret in repr(value) for value in dict(row).values())  # only its hash

    # Forged: a wrong secret, another job's id, no id at all. Nothing is polled or changed.
    for job_id, offered in ((job.id, secret[:-1] + "x"), (str(uuid.uuid4()), secret), ("nope", secret)):
        assert await _wake(stub, job_id, offered) == grpc.StatusCode.NOT_FOUND
    await asyncio.sleep(0.3)
    assert provider_job.polls == 1

    # The right secret while RunPod still has the job queued: polled at once, and still waiting.
    assert await _wake(stub, job.id, secret) == grpc.StatusCode.OK
    await _until_polls(provider_job, 2)
    await asyncio.sleep(0.1)
    current = await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="wendy", job_id=job.id))
    assert current.state == common_pb2.JOB_STATE_SUBMITTED

    # RunPod's webhook once the job has finished: it completes promptly.
    assert await _wake(stub, job.id, secret) == grpc.StatusCode.OK
    async with asyncio.timeout(5):  # the stream ends with the job
        await h.watch_all(stub, "wendy", job.id)
    assert provider_job.polls == 3
    # A replay after the end: NOT_FOUND, and the job stays as it is.
    assert await _wake(stub, job.id, secret) == grpc.StatusCode.NOT_FOUND
    current = await stub.GetJob(scheduler_pb2.GetJobRequest(user_id="wendy", job_id=job.id))
    assert current.state == common_pb2.JOB_STATE_COMPLETED


@pytest.mark.parametrize("base", ["ftp://dash.example.org", "dash.example.org", "https://x.org/?a=1"])
def test_the_webhook_base_url_must_be_an_http_base(h, base: str) -> None:
    with pytest.raises(ValueError, match="public http"):
        h.settings("postgresql://x/y", "127.0.0.1:1", scheduler_webhook_base_url=base)
