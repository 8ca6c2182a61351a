"""gRPC status codes from the scheduler become HTTP answers with the scheduler's plain message."""

from __future__ import annotations

import grpc
import pytest

from gateway.upstream import ApiError, scheduler_errors


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "status", "message"),
    [
        (grpc.StatusCode.NOT_FOUND, 404, "Job not found"),
        (grpc.StatusCode.INVALID_ARGUMENT, 422, "the spec names an unknown model"),
        (grpc.StatusCode.FAILED_PRECONDITION, 409, "Your RunPod balance is $1.00 but the job costs $2.00"),
        (grpc.StatusCode.UNAUTHENTICATED, 400, "Invalid RunPod API key"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "The key lacks a permission"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "You have 3 jobs running; wait for one to finish"),
        (grpc.StatusCode.UNAVAILABLE, 503, "The scheduler is unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "The scheduler did not answer in time; try again"),
        (grpc.StatusCode.INTERNAL, 502, "The scheduler failed to answer; try again"),
    ],
)
def test_status_mapping(code: grpc.StatusCode, status: int, message: str) -> None:
    with pytest.raises(ApiError) as raised, scheduler_errors("The scheduler is unavailable", "Job not found"):
        raise rpc_error(code, message if status in (409, 400, 403, 422, 429) else "internal detail")
    assert (raised.value.status, raised.value.message) == (status, message)


@pytest.mark.parametrize(
    ("component", "details", "message"),
    [
        (
            "compute-runpod",
            "Cannot reach RunPod (api.runpod.io): ConnectError",
            "Cannot reach RunPod (api.runpod.io): ConnectError",
        ),
        (
            "scheduler-database",
            "the scheduler's database is unreachable; try again shortly",
            "The scheduler's database is unreachable; try again shortly",
        ),
    ],
)
def test_unavailable_behind_the_scheduler_names_that_component(
    component: str, details: str, message: str
) -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("x-failed-component", component)),
        details=details,
    )
    with pytest.raises(ApiError) as raised, scheduler_errors("The scheduler is unavailable"):
        raise error
    assert (raised.value.status, raised.value.message) == (503, message)
    assert "scheduler is unavailable" not in raised.value.message


def test_resource_exhausted_is_429_with_retry_after() -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("retry-after-s", "42")),
        details="You have 3 active (queued or running) jobs on the hosted backend; the limit is 3",
    )
    with pytest.raises(ApiError) as raised, scheduler_errors("The scheduler is unavailable"):
        raise error
    assert raised.value.status == 429
    assert raised.value.message.startswith("You have 3 active")
    assert raised.value.headers == {"Retry-After": "42"}
