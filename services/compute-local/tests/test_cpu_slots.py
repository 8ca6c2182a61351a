"""COMPUTE_LOCAL_CPU_SLOTS: "cpu" runs that many jobs at once, each child with its share of the
cores. The real service on 127.0.0.1 port 0 and real children on ``local/tiny-llama``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from compute_local.jobs import JobState, StoredEvent
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc

from .conftest import ServiceFactory
from .test_service import _alive, _child_threads, follow, has_event, long_spec, tiny_spec, wait_until


def _longer_spec() -> bytes:
    """Runs well past the other jobs of the test (minutes), which cancels it."""
    training = [{"id": f"t{i}", "prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(200)]
    return tiny_spec(training_data=training, hyperparams={"epochs": 100, "batch_size": 1})


def _running_interval(events: list[StoredEvent]) -> tuple[float, float]:
    started = next(stored.time for stored in events if stored.event.get("stage") == "starting")
    return started, events[-1].time


@pytest.mark.slow
async def test_two_cpu_slots_run_two_jobs_at_once_and_queue_the_third(
    start_compute_local: ServiceFactory, connect: Callable[..., compute_pb2_grpc.ComputeProviderStub]
) -> None:
    # No COMPUTE_LOCAL_TORCH_THREADS: each child gets half the cores (at least one).
    service = await start_compute_local(compute_local_cpu_slots=2, compute_local_torch_threads=None)
    runner = service.runner
    stub = connect(service)
    expected_threads = str(max(1, (os.cpu_count() or 1) // 2))

    async def submit(job_id: str, spec_json: bytes) -> str:
        request = compute_pb2.SubmitRequest(job_id=job_id, spec_json=spec_json)
        return (await stub.Submit(request)).provider_job_id

    async def stage_message(provider_job_id: str) -> str:
        status = await stub.GetStatus(compute_pb2.GetStatusRequest(provider_job_id=provider_job_id))
        return status.stage_message

    first = await submit("first", long_spec())
    second = await submit("second", _longer_spec())
    third = await submit("third", tiny_spec())
    fourth = await submit("fourth", tiny_spec())
    assert [runner.status(p, "", "").state for p in (first, second, third, fourth)] == [
        JobState.RUNNING,
        JobState.RUNNING,
        JobState.SUBMITTED,
        JobState.SUBMITTED,
    ]
    assert await stage_message(third) == (
        "queued: position 1 of 2, waiting for a free device (cpu: 2 jobs at once)"
    )
    assert (await stage_message(fourth)).startswith("queued: position 2 of 2")
    assert (runner.slot_count, runner.running_count, runner.queue_depth) == (2, 2, 2)

    # Both children are inside the pipeline at the same time, each with its share of the cores.
    await wait_until(service, has_event(service, first, "progress"))
    await wait_until(service, has_event(service, second, "progress"))
    pids = [runner.child_pid(first), runner.child_pid(second)]
    assert all(pid is not None and _alive(pid) for pid in pids)
    assert [_child_threads(pid) for pid in pids if pid is not None] == [(expected_threads,) * 2] * 2

    # A queued job is still cancelled without a slot: the next one moves up.
    cancelled = await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=fourth))
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    assert [e.event.get("stage") for e in runner.status(fourth, "", "").events] == ["queued", "cancelled"]
    assert (await stage_message(third)).startswith("queued: position 1 of 1")
    assert runner.running_count == 2

    # The first ends: the third takes its slot while the second goes on running.
    await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=first))
    final, events = await follow(service, stub, third)
    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.error
    assert [e.stage for e in events[:2]] == ["queued", "starting"]
    assert runner.status(second, "", "").state is JobState.RUNNING
    assert pids[1] is not None and _alive(pids[1])
    result_json = (await stub.GetResult(compute_pb2.GetResultRequest(provider_job_id=third))).result_json
    assert str(json.loads(result_json)["environment"]["torch_threads"]) == expected_threads

    # A follow-up query takes the free slot beside the second job; its warm worker gets the same
    # share of the cores and stays warm after answering.
    query_request = json.dumps({"queries": [{"prompt": "3 + 3 =", "expected": " 6"}], "top_k": 3})
    query = await stub.Submit(
        compute_pb2.SubmitRequest(
            job_id="query",
            spec_json=tiny_spec(),
            kind="query",
            request_json=query_request.encode(),
            parent_result_json=result_json,
            parent_job_id="third",
        )
    )
    answered, _ = await follow(service, stub, query.provider_job_id)
    assert answered.state == common_pb2.JOB_STATE_COMPLETED, answered.error
    [worker] = runner.warm.workers
    assert worker.alive and _child_threads(worker.process.pid) == (expected_threads,) * 2
    assert runner.status(second, "", "").state is JobState.RUNNING

    await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=second))
    # The running intervals (from the "starting" event to the end marker) overlap: the second
    # ran beside the first, then beside the third, which started once the first had ended.
    intervals = {p: _running_interval(runner.status(p, "", "").events) for p in (first, second, third)}
    for a, b in ((first, second), (third, second)):
        assert intervals[a][0] < intervals[b][1] and intervals[b][0] < intervals[a][1]
    assert intervals[first][1] <= intervals[third][0]
    assert runner.finished_counts == {JobState.CANCELLED: 3, JobState.COMPLETED: 2}
    assert (runner.running_count, runner.queue_depth) == (0, 0)
