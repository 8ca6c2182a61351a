"""Admission control: per-user limits counted in PostgreSQL at submit time, atomically."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
from collections.abc import Iterator

import grpc
import pytest

import cost_model
from influence.v1 import common_pb2, scheduler_pb2
from scheduler.jobs import parse_job_spec

pytestmark = pytest.mark.timeout(60)


def submit(stub, user: str, spec: bytes, key: str = ""):
    return stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id=user, spec_json=spec, idempotency_key=key))


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def limits(usage: scheduler_pb2.Usage) -> dict[str, tuple[float, float]]:
    return {entry.name: (entry.used, entry.limit) for entry in usage.limits}


async def test_active_jobs_cap_is_atomic_and_named(start, provider, h) -> None:
    provider.servicer.plan = h.plan(hold_at=1)  # jobs stay running until released
    scheduler = await start(hosted_max_active_jobs=3, hosted_max_submissions_per_hour=0)
    results = await asyncio.gather(
        *(submit(scheduler.stub, "alice", h.spec_json()) for _ in range(8)), return_exceptions=True
    )
    accepted = [r for r in results if isinstance(r, scheduler_pb2.Job)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(accepted) == 3 and len(refused) == 5
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "You have 3 active (queued or running) jobs on the hosted backend; the limit is 3 per "
            "user. Wait for one to finish or cancel one."
        )
        retry_after = dict(error.trailing_metadata())["retry-after-s"]
        assert int(retry_after) >= 5
    # Another user is not affected; a resubmission with a known idempotency key is not refused.
    assert (await submit(scheduler.stub, "bob", h.spec_json())).id
    usage = await scheduler.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice"))
    assert usage.backend == "hosted" and limits(usage)["active_jobs"] == (3.0, 3.0)
    cancelled = await scheduler.stub.CancelJob(
        scheduler_pb2.CancelJobRequest(user_id="alice", job_id=accepted[0].id)
    )
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    assert (await submit(scheduler.stub, "alice", h.spec_json(), key="k1")).id
    again = await submit(scheduler.stub, "alice", h.spec_json(), key="k1")
    assert again.id and limits(await scheduler.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice")))[
        "active_jobs"
    ] == (3.0, 3.0)
    provider.servicer.plan.release.set()


async def test_hourly_submissions_and_monthly_gpu_seconds(start, provider, h) -> None:
    provider.servicer.plan = h.plan(hold_at=1)  # running jobs count their estimate (12 s here)
    scheduler = await start(hosted_max_active_jobs=0, hosted_max_submissions_per_hour=2)
    for _ in range(2):
        await submit(scheduler.stub, "alice", h.spec_json())
    error = await refusal(submit(scheduler.stub, "alice", h.spec_json()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "You made 2 hosted submissions in the last hour; the limit is 2 per hour."
    assert 3500 <= int(dict(error.trailing_metadata())["retry-after-s"]) <= 3600

    monthly = await start(
        hosted_max_active_jobs=0, hosted_max_submissions_per_hour=0, hosted_gpu_seconds_per_month=30
    )
    error = await refusal(submit(monthly.stub, "alice", h.spec_json()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details().startswith(
        "You have used 24 hosted GPU-seconds this month of the 30 allowed; this job's estimated"
    )
    assert "renews at the start of next month" in error.details()
    usage = limits(await monthly.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice")))
    assert usage["gpu_seconds_per_month"] == (24.0, 30.0)
    assert usage["submissions_per_hour"] == (2.0, 0.0)
    provider.servicer.plan.release.set()


async def test_gpu_seconds_count_the_actual_time_once_finished(start, h, database_url) -> None:
    import asyncpg

    scheduler = await start()
    job = await submit(scheduler.stub, "alice", h.spec_json())
    await h.watch_all(scheduler.stub, "alice", job.id)
    conn = await asyncpg.connect(database_url)
    try:
        # The ledger settled the job with the time it ran (well under 10 s here) ...
        ran = await conn.fetchval(
            "SELECT gpu_seconds FROM usage_ledger WHERE job_id = $1::uuid AND entry = 'settled'", job.id
        )
        assert 0 < ran < 10
        # ... as if it had run for 100 s.
        await conn.execute(
            "UPDATE usage_ledger SET gpu_seconds = 100 WHERE job_id = $1::uuid AND entry = 'settled'", job.id
        )
    finally:
        await conn.close()
    usage = limits(await scheduler.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice")))
    assert usage["gpu_seconds_per_month"] == (100.0, 36_000.0)


async def test_per_job_ceiling_is_422_naming_the_limit(start, h) -> None:
    scheduler = await start(hosted_max_job_time_s=1)
    error = await refusal(submit(scheduler.stub, "alice", h.spec_json()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the hosted tier's per-job limit of 1 s (HOSTED_MAX_JOB_TIME_S)" in error.details()
    jobs = await scheduler.stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice"))
    assert list(jobs.jobs) == []


async def test_byok_jobs_only_have_the_active_jobs_cap(start, provider, h) -> None:
    provider.servicer.plan = h.plan(hold_at=1)
    scheduler = await start(
        byok_max_active_jobs=2,
        hosted_max_submissions_per_hour=1,
        hosted_gpu_seconds_per_month=1,
        hosted_max_job_time_s=1,
    )
    await scheduler.stub.SetComputeBackend(
        scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod")
    )
    for _ in range(2):
        await submit(scheduler.stub, "alice", h.spec_json())
    error = await refusal(submit(scheduler.stub, "alice", h.spec_json()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 active (queued or running) jobs on the runpod backend; the limit is 2" in error.details()
    usage = await scheduler.stub.GetUsage(scheduler_pb2.GetUsageRequest(user_id="alice"))
    assert usage.backend == "runpod" and set(limits(usage)) == {"active_jobs"}
    assert usage.max_job_time_s == 0
    provider.servicer.plan.release.set()


# What a 0.5B model's config says (Qwen2.5-0.5B's shape), and what a 70B one's says.
SMALL_CONFIG = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
}
LARGE_CONFIG = {
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


@contextlib.contextmanager
def hub_serving(configs: dict[str, dict]) -> Iterator[str]:
    """A loopback stand-in for the Hub's file route: /{repo}/resolve/main/config.json."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            repo = self.path.removesuffix("/resolve/main/config.json").lstrip("/")
            body = json.dumps(configs[repo]).encode() if repo in configs else b"Entry not found"
            self.send_response(200 if repo in configs else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


async def test_the_ceiling_sizes_a_hub_model_by_its_config_not_its_name(start, h) -> None:
    spec = json.loads(h.spec_json())

    def estimated_s(card) -> float:
        parsed = parse_job_spec(json.dumps({**spec, "model_id": "me/x-0.5B"}).encode())
        return cost_model.estimate_job(parsed, "local", "hosted", card=card).estimated_time_s

    by_name = estimated_s(cost_model.lookup_model("me/x-0.5B"))
    by_config = estimated_s(cost_model.card_from_config("me/x-0.5B", LARGE_CONFIG))
    assert by_name * 10 < by_config
    limit = (by_name * by_config) ** 0.5  # the name's size passes, the config's does not
    with hub_serving({"me/x-0.5B": LARGE_CONFIG, "me/real-0.5B": SMALL_CONFIG}) as endpoint:
        scheduler = await start(hosted_max_job_time_s=limit, hf_endpoint=endpoint)
        error = await refusal(submit(scheduler.stub, "alice", h.spec_json(model_id="me/x-0.5B")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "HOSTED_MAX_JOB_TIME_S" in error.details()
        assert (await submit(scheduler.stub, "alice", h.spec_json(model_id="me/real-0.5B"))).id
        missing = await refusal(submit(scheduler.stub, "alice", h.spec_json(model_id="me/gone-1B")))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.json on the Hugging Face Hub, which could not be read (HTTP 404" in missing.details()
    # The Hub down: refused for hosted in plain words, never sized by the name.
    unreachable = await refusal(submit(scheduler.stub, "alice", h.spec_json(model_id="me/other-0.5B")))
    assert unreachable.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the Hub did not answer" in unreachable.details()
