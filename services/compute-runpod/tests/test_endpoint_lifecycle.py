"""The researcher's endpoint (issue 24, items 3 and 6): its GPU pools refitted to each job's model
(a small and a large catalog model each land on a GPU that fits, at the estimate's price),
described as RunPod reports it, deleted, never a stranger's endpoint adopted, and no key saved
where the server cannot run researchers' jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import httpx
import pytest
from runpod_testkit import Stack, spec_bytes

import cost_model
from compute_runpod.config import Settings
from compute_runpod.server import start_server
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc

PRICES = cost_model.price_table("runpod")


def user(user_id: str, endpoint_id: str = "") -> common_pb2.Account:
    return common_pb2.Account(user_id=user_id, endpoint_id=endpoint_id, hosted=False)


async def gpu_pool_of(stack: Stack, provider_job_id: str) -> str:
    """The pool the fake RunPod ran the job on, once a worker took it."""
    async with asyncio.timeout(120):
        while not (job := stack.fake.job(provider_job_id)) or not job.gpu_pool:
            await asyncio.sleep(0.1)
    return job.gpu_pool


async def test_a_small_and_a_large_model_each_land_on_a_gpu_that_fits_priced_as_estimated(
    stack: Stack,
) -> None:
    await stack.store_key("u-fit", stack.user_key)
    endpoint_id, landed = "", {}
    for job_id, model_id in (("job-small", "local/tiny-llama"), ("job-large", "google/gemma-3-27b")):
        card = cost_model.lookup_model(model_id)
        spec = spec_bytes(model_id=model_id, hyperparams={"quantization": card.default_quantization})
        estimate = (
            await stack.stub.Estimate(compute_pb2.EstimateRequest(spec_json=spec, backend="runpod"))
        ).estimate
        # What the scheduler sends before each job (scheduler.dispatcher.Endpoints.ensure).
        prepared = await stack.stub.PrepareAccount(
            compute_pb2.PrepareAccountRequest(
                account=user("u-fit", endpoint_id),
                model_id=model_id,
                model_params_b=card.params_b,
                quantization=card.default_quantization,
            )
        )
        endpoint_id = prepared.endpoint_id
        account = user("u-fit", endpoint_id)
        submitted = await stack.stub.Submit(
            compute_pb2.SubmitRequest(
                job_id=job_id,
                account=account,
                spec_json=spec,
                estimated_cost_usd=estimate.estimated_cost_usd,
                estimated_time_s=estimate.estimated_time_s,
            )
        )
        pool = await gpu_pool_of(stack, submitted.provider_job_id)
        landed[model_id] = pool
        assert pool == estimate.gpu, model_id
        assert PRICES.gpus[pool].memory_gb >= estimate.required_memory_gb, model_id
        assert PRICES.gpus[pool].usd_per_second == estimate.usd_per_second, model_id
        if model_id == "local/tiny-llama":
            final, _, _ = await stack.wait_terminal(submitted.provider_job_id, account)
            assert final.state == common_pb2.JOB_STATE_COMPLETED
            large_job = ""
        else:
            large_job = submitted.provider_job_id
    assert landed == {"local/tiny-llama": "AMPERE_16", "google/gemma-3-27b": "AMPERE_48"}
    (endpoint,) = [e for e in stack.fake.endpoints() if e["id"] == endpoint_id]
    assert endpoint["gpu"]["pools"] == ["AMPERE_48", "ADA_48_PRO", "AMPERE_80"]  # within 3x the cheapest

    # While the large job is on the endpoint, a small one does not narrow its pools (it fits).
    updates = len(stack.fake.calls("serverless.update"))
    await stack.stub.PrepareAccount(
        compute_pb2.PrepareAccountRequest(account=user("u-fit", endpoint_id), model_id="local/tiny-llama")
    )
    assert len(stack.fake.calls("serverless.update")) == updates
    (endpoint,) = [e for e in stack.fake.endpoints() if e["id"] == endpoint_id]
    assert endpoint["gpu"]["pools"][0] == "AMPERE_48"
    await stack.stub.Cancel(
        compute_pb2.CancelRequest(provider_job_id=large_job, account=user("u-fit", endpoint_id))
    )


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


PINNED = {"runpod_gpu": "ADA_24"}


async def estimate(stack: Stack, spec: bytes) -> common_pb2.Estimate:
    answer = await stack.stub.Estimate(compute_pb2.EstimateRequest(spec_json=spec, backend="runpod"))
    return answer.estimate


async def test_a_job_pinned_to_a_gpu_pool_runs_and_is_priced_there_and_widening_offers_every_fitting_pool(
    stack: Stack,
) -> None:
    """Issue 24 item 7: the spec's runpod_gpu reaches PrepareAccount (the endpoint's pools become
    that pool), the fake RunPod runs the job there, and the estimate prices that GPU; widening
    ("all-fitting") offers every pool that fits, past the price band, and the estimate says so."""
    await stack.store_key("u-pin", stack.user_key)
    model_id = "local/tiny-llama"
    auto, pinned = [await estimate(stack, spec_bytes(model_id=model_id, **choice)) for choice in ({}, PINNED)]
    assert (auto.gpu, pinned.gpu) == ("AMPERE_16", "ADA_24")
    assert pinned.usd_per_second == PRICES.gpus["ADA_24"].usd_per_second > auto.usd_per_second
    assert pinned.estimated_cost_usd > auto.estimated_cost_usd
    assert any("ADA_24, the GPU pool you chose" in note for note in pinned.notes)

    prepared = await stack.stub.PrepareAccount(
        compute_pb2.PrepareAccountRequest(account=user("u-pin"), model_id=model_id, runpod_gpu="ADA_24")
    )
    account = user("u-pin", prepared.endpoint_id)
    submitted = await stack.stub.Submit(
        compute_pb2.SubmitRequest(
            job_id="job-pinned",
            account=account,
            spec_json=spec_bytes(model_id=model_id, runpod_gpu="ADA_24"),
            estimated_cost_usd=pinned.estimated_cost_usd,
            estimated_time_s=pinned.estimated_time_s,
        )
    )
    assert await gpu_pool_of(stack, submitted.provider_job_id) == "ADA_24"
    (endpoint,) = [e for e in stack.fake.endpoints() if e["id"] == prepared.endpoint_id]
    assert endpoint["gpu"]["pools"] == ["ADA_24"]
    # Its run is not the point here (the test above runs one): cancelled, it leaves the endpoint.
    await stack.stub.Cancel(
        compute_pb2.CancelRequest(provider_job_id=submitted.provider_job_id, account=account)
    )

    # Widened: with nothing on the endpoint, every pool that fits, cheapest first, past the band.
    await stack.stub.PrepareAccount(
        compute_pb2.PrepareAccountRequest(account=account, model_id=model_id, runpod_gpu="all-fitting")
    )
    (endpoint,) = [e for e in stack.fake.endpoints() if e["id"] == prepared.endpoint_id]
    assert endpoint["gpu"]["pools"] == [pool for pool, _ in PRICES.gpus_for_tier(16)]
    assert "BLACKWELL_180" in endpoint["gpu"]["pools"]
    widened = await estimate(stack, spec_bytes(model_id=model_id, runpod_gpu="all-fitting"))
    assert widened.gpu == "AMPERE_16"
    assert any(f"among the {len(PRICES.gpus)} pools that fit at any price" in note for note in widened.notes)
