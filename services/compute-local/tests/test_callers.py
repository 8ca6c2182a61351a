"""compute-local accepts only the callers in COMPUTE_CALLER_TOKENS (the scheduler's COMPUTE_TOKEN):
a call without that token is refused before the servicer runs; health checks stay open."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from influence.v1 import compute_pb2, compute_pb2_grpc
from service_runtime.grpc_server import insecure_channel

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
