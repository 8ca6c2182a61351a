"""A job runs once on Modal: concurrent submits of one job id spawn one call (the "spawning" mark
taken with put-if-absent), and a second call for the same job (a duplicate spawn) finds the
first call's claim and returns without GPU work. Against the in-process Modal running the real
function body on the tiny model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from compute_modal import provider as modal_provider
from gpu_core.uploads import DUPLICATE_DELIVERY
from influence.v1 import common_pb2, compute_pb2

pytestmark = pytest.mark.timeout(120)
Spec = Callable[..., dict[str, Any]]


def submit_request(job_id: str, spec: dict[str, Any]) -> compute_pb2.SubmitRequest:
    return compute_pb2.SubmitRequest(
        job_id=job_id,
        account=common_pb2.Account(user_id="u1", hosted=True),
        spec_json=json.dumps(spec).encode(),
    )


async def test_concurrent_submits_of_one_job_spawn_one_call(harness: Any, make_spec: Spec) -> None:
    spawned: list[str] = []
    spawn = harness.adapter.spawn

    async def counted_spawn(job_id: str, payload: dict[str, Any], gpu: str) -> str:
        await asyncio.sleep(0.3)  # a slow spawn RPC: the other submits arrive meanwhile
        call_id = await spawn(job_id, payload, gpu)
        spawned.append(call_id)
        return call_id

    harness.adapter.spawn = counted_spawn
    answers = await asyncio.gather(
        *(harness.stub.Submit(submit_request("job-race", make_spec())) for _ in range(3)),
        return_exceptions=True,
    )
    accepted = [a.provider_job_id for a in answers if not isinstance(a, BaseException)]
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(spawned) == 1
    assert accepted and set(accepted) == set(spawned)
    assert all(
        e.code() == grpc.StatusCode.UNAVAILABLE and "not spawned again" in e.details() for e in refused
    )
    # Once the spawn is recorded, a resubmit gets the call id.
    again = await harness.stub.Submit(submit_request("job-race", make_spec()))
    assert again.provider_job_id == spawned[0]
    assert await harness.adapter.wait(spawned[0], timeout=100)


async def test_a_duplicate_call_for_the_same_job_does_no_gpu_work(harness: Any, make_spec: Spec) -> None:
    first = (await harness.stub.Submit(submit_request("job-dup", make_spec()))).provider_job_id
    assert await harness.adapter.wait(first, timeout=100)
    # A second call of the function for the same job id (what a lost spawn answer, resent, does).
    payload = {**make_spec()}
    second = await harness.adapter.spawn("job-dup", payload, "T4")
    assert await harness.adapter.wait(second, timeout=30)
    outcome = await harness.adapter.get(second)
    assert outcome["error"].startswith(f"{DUPLICATE_DELIVERY} of job job-dup")
    assert harness.adapter.progress["job-dup#claim"] == first
    # The first call's progress entry was not touched by the duplicate (it ran no step).
    final = await harness.stub.GetStatus(
        compute_pb2.GetStatusRequest(provider_job_id=first, job_id="job-dup")
    )
    assert final.state == common_pb2.JOB_STATE_COMPLETED


async def test_a_stale_spawning_mark_adopts_the_call_that_claimed_the_job(
    harness: Any, make_spec: Spec
) -> None:
    """A submit that died between the mark and recording the call id: the next submit finds
    the call through the worker's claim instead of spawning again."""
    first = await harness.adapter.spawn("job-orphan", make_spec(), "T4")
    assert await harness.adapter.wait(first, timeout=100)
    harness.adapter.progress["job-orphan#call"] = f"spawning since {time.time()}"
    again = await harness.stub.Submit(submit_request("job-orphan", make_spec()))
    assert again.provider_job_id == first


async def test_a_stale_spawning_mark_with_no_claim_spawns_again(harness: Any, make_spec: Spec) -> None:
    stale = time.time() - modal_provider.SPAWN_STALE_S - 1
    harness.adapter.progress["job-lost#call"] = f"spawning since {stale}"
    submitted = await harness.stub.Submit(submit_request("job-lost", make_spec()))
    assert submitted.provider_job_id.startswith("fc-")
    assert await harness.adapter.wait(submitted.provider_job_id, timeout=100)
    assert harness.adapter.progress["job-lost#claim"] == submitted.provider_job_id
