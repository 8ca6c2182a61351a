"""The researcher's endpoint as RunPod reports it (issue 24, item 6): described, deleted, never a
stranger's endpoint adopted, and no key saved where the server cannot run researchers' jobs."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import httpx
import pytest
from runpod_testkit import Stack

from compute_runpod.config import Settings
from compute_runpod.server import start_server
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc


def user(user_id: str, endpoint_id: str = "") -> common_pb2.Account:
    return common_pb2.Account(user_id=user_id, endpoint_id=endpoint_id, hosted=False)


async def test_the_endpoint_is_described_as_runpod_lists_it_then_deleted(stack: Stack) -> None:
    await stack.store_key("u-life", stack.user_key)
    before = await stack.stub.DescribeEndpoint(compute_pb2.EndpointRequest(account=user("u-life")))
    assert (before.state, before.byok_available) == ("none", True)
    assert not stack.fake.calls("serverless.get")  # nothing stored: RunPod is not asked

    prepared = await stack.stub.PrepareAccount(
        compute_pb2.PrepareAccountRequest(account=user("u-life"), model_params_b=70.0)
    )
    account = user("u-life", prepared.endpoint_id)
    live = await stack.stub.DescribeEndpoint(compute_pb2.EndpointRequest(account=account))
    assert live.state == "live" and live.endpoint_id == prepared.endpoint_id
    assert list(live.gpu_pools) == ["HOPPER_141", "BLACKWELL_180"]
    assert (live.workers_max, live.workers.total, live.execution_timeout_s) == (1, 0, 7200)
    assert live.console_url == f"https://console.runpod.io/serverless/user/endpoint/{prepared.endpoint_id}"

    deleted = await stack.stub.DeleteEndpoint(compute_pb2.EndpointRequest(account=account))
    assert deleted.state == "none"
    assert prepared.endpoint_id not in [e["id"] for e in stack.fake.endpoints()]
    assert [c.status for c in stack.fake.calls("serverless.delete")] == [204]
    gone = await stack.stub.DescribeEndpoint(compute_pb2.EndpointRequest(account=account))
    assert gone.state == "gone" and gone.endpoint_id == prepared.endpoint_id
    # Deleting again (the endpoint already gone, e.g. in RunPod's console) is not an error.
    await stack.stub.DeleteEndpoint(compute_pb2.EndpointRequest(account=account))
    assert [c.status for c in stack.fake.calls("serverless.delete")] == [204, 404]


async def test_the_hosted_endpoint_cannot_be_deleted(stack: Stack) -> None:
    hosted = common_pb2.Account(user_id="u-any", endpoint_id=stack.hosted_endpoint, hosted=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.DeleteEndpoint(compute_pb2.EndpointRequest(account=hosted))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stack.hosted_endpoint in [e["id"] for e in stack.fake.endpoints()]


async def test_an_endpoint_the_researcher_made_under_our_name_is_never_adopted(stack: Stack) -> None:
    async with httpx.AsyncClient() as http:
        theirs = await http.post(
            f"{stack.fake.url}/v2/serverless",
            headers={"Authorization": f"Bearer {stack.user_key}"},
            json={
                "name": "influence-dashboard",
                "type": "QUEUE",
                "image": "someone/else:1.0",
                "gpu": {"pools": ["ADA_24"]},
                "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
            },
        )
    their_id = theirs.json()["id"]
    await stack.store_key("u-named", stack.user_key)
    prepared = await stack.stub.PrepareAccount(compute_pb2.PrepareAccountRequest(account=user("u-named")))
    assert prepared.created and prepared.endpoint_id != their_id
    (untouched,) = [e for e in stack.fake.endpoints() if e["id"] == their_id]
    assert untouched["image"] == "someone/else:1.0" and untouched["gpu"]["pools"] == ["ADA_24"]
    assert not stack.fake.calls("serverless.update")


async def test_no_key_is_accepted_where_the_server_has_no_worker_template(
    stack: Stack, make_settings: Callable[..., Settings]
) -> None:
    bare = await start_server(make_settings(runpod_template_id=""))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bare.port}") as channel:
            stub = compute_pb2_grpc.ComputeProviderStub(channel)
            described = await stub.DescribeEndpoint(compute_pb2.EndpointRequest(account=user("u-bare")))
            assert not described.byok_available and "RUNPOD_TEMPLATE_ID" in described.unavailable_reason
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.VerifyCredentials(
                    compute_pb2.VerifyCredentialsRequest(account=user("u-bare"), api_key=stack.user_key)
                )
    finally:
        await bare.stop()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "RUNPOD_TEMPLATE_ID" in caught.value.details() and "not saved" in caught.value.details()
    assert not stack.fake.calls("serverless.list")  # RunPod was never asked
