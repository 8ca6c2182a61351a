"""compute-local accepts only the callers in COMPUTE_CALLER_TOKENS (the scheduler's COMPUTE_TOKEN):
a call without that token is refused before the servicer runs; health checks stay open."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compute_local.config import Settings
from influence.v1 import compute_pb2, compute_pb2_grpc
from service_runtime.grpc_server import insecure_channel
from service_runtime.settings import SettingsError

SCHEDULER_TOKEN = "the-schedulers-compute-token"


async def test_a_call_without_the_caller_token_is_unauthenticated(start_compute_local) -> None:
    service = await start_compute_local(compute_caller_tokens=f"scheduler={SCHEDULER_TOKEN}")
    address = f"127.0.0.1:{service.port}"
    status = compute_pb2.GetStatusRequest(provider_job_id="no-such-job", job_id="no-such-job")
    fetch = compute_pb2.FetchArtifactRequest(provider_job_id="no-such-job", job_id="j", name="a")
    for token in (None, "a-token-nobody-was-given"):
        async with insecure_channel(address, caller_token=token) as channel:
            stub = compute_pb2_grpc.ComputeProviderStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetStatus(status)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "x-caller-token" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _chunk in stub.FetchArtifact(fetch):
                    pass
            assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Probes carry no token and are answered.
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))  # type: ignore[attr-defined]
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

    async with insecure_channel(address, caller_token=SCHEDULER_TOKEN) as channel:
        stub = compute_pb2_grpc.ComputeProviderStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.GetStatus(status)
        # Past the check: the servicer itself answers about the job, on streams too.
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as streamed_unknown:
            async for _chunk in stub.FetchArtifact(fetch):
                pass
        assert streamed_unknown.value.code() != grpc.StatusCode.UNAUTHENTICATED


async def test_without_caller_tokens_any_caller_is_served(start_compute_local) -> None:
    service = await start_compute_local()
    async with insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = compute_pb2_grpc.ComputeProviderStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.GetStatus(compute_pb2.GetStatusRequest(provider_job_id="x", job_id="x"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def _start_process(module: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        k: v for k, v in os.environ.items() if not k.endswith(("_HOST", "CALLER_TOKENS", "ALLOW_ANY_CALLER"))
    }
    return subprocess.run(
        [sys.executable, "-m", module], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("module", "host_variable", "tokens_variable"),
    [
        ("compute_local", "COMPUTE_LOCAL_HOST", "COMPUTE_CALLER_TOKENS"),
        ("scheduler", "SCHEDULER_HOST", "SCHEDULER_CALLER_TOKENS"),
    ],
)
def test_without_caller_tokens_a_service_off_loopback_refuses_to_start(
    module: str, host_variable: str, tokens_variable: str
) -> None:
    done = _start_process(module, **{host_variable: "0.0.0.0", "DATABASE_URL": "postgresql://x@127.0.0.1/x"})
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["level"].lower() == "error"
    assert tokens_variable in record["message"] and "ALLOW_ANY_CALLER" in record["message"]


def test_caller_tokens_off_loopback_or_the_explicit_flag_let_a_service_start() -> None:
    assert Settings.load(compute_local_host="0.0.0.0", compute_caller_tokens=f"scheduler={SCHEDULER_TOKEN}")
    assert Settings.load(compute_local_host="0.0.0.0", allow_any_caller=True).allow_any_caller
    assert Settings.load(compute_local_host="127.0.0.1").compute_caller_tokens is None
    with pytest.raises(SettingsError, match="COMPUTE_LOCAL_HOST=0.0.0.0"):
        Settings.load(compute_local_host="0.0.0.0")
