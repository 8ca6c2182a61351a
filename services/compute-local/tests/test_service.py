"""compute-local end to end: the real gRPC server on 127.0.0.1 port 0, real child processes
running the real gpu_core pipeline on ``local/tiny-llama``, the real work dir on disk."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from compute_local.jobs import JobState
from compute_local.server import ComputeLocalServer
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc

from .conftest import ServiceFactory

# Every wait in these tests ends on an event; this only bounds a hang.
WAIT_LIMIT_S = 180.0
TERMINAL_STATES = (
    common_pb2.JOB_STATE_COMPLETED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
)


def tiny_spec(**overrides: Any) -> bytes:
    """8 training and 4 eval examples on the tiny model: seconds on one CPU core."""
    spec: dict[str, Any] = {
        "model_id": "local/tiny-llama",
        "training_data": [
            {"id": f"t{i}", "prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(8)
        ],
        "eval_data": [{"id": f"e{i}", "prompt": f"{i} + {i} =", "expected": f" {2 * i}"} for i in range(4)],
        "hyperparams": {"epochs": 1, "max_seq_len": 64, "batch_size": 4, "max_new_tokens": 4},
        "few_shot_k": 2,
    }
    hyperparams = overrides.pop("hyperparams", {})
    spec["hyperparams"].update(hyperparams)
    spec.update(overrides)
    return json.dumps(spec).encode()


def long_spec() -> bytes:
    """A run that lasts far longer than any test waits: it is always cancelled or stopped."""
    return tiny_spec(hyperparams={"epochs": 100, "batch_size": 1})


async def wait_until(service: ComputeLocalServer, predicate: Callable[[], bool]) -> None:
    await asyncio.wait_for(service.runner.wait_for(predicate), WAIT_LIMIT_S)


def has_event(service: ComputeLocalServer, provider_job_id: str, event_type: str) -> Callable[[], bool]:
    def check() -> bool:
        status = service.runner.status(provider_job_id, "", "")
        return any(stored.event.get("type") == event_type for stored in status.events)

    return check


def is_terminal(service: ComputeLocalServer, provider_job_id: str) -> Callable[[], bool]:
    return lambda: service.runner.status(provider_job_id, "", "").state.terminal


async def follow(
    service: ComputeLocalServer,
    stub: compute_pb2_grpc.ComputeProviderStub,
    provider_job_id: str,
) -> tuple[compute_pb2.GetStatusResponse, list[common_pb2.ProgressEvent]]:
    """Poll GetStatus with the cursor as the scheduler does, waking on each runner change, until
    the job is terminal and no event is left; returns the last response and every event."""
    events: list[common_pb2.ProgressEvent] = []
    cursor = ""
    while True:
        response = await stub.GetStatus(
            compute_pb2.GetStatusRequest(provider_job_id=provider_job_id, cursor=cursor)
        )
        events.extend(response.events)
        assert len(events) < 10_000, "the cursor does not advance"
        cursor = response.cursor
        if response.events:
            continue
        if response.state in TERMINAL_STATES:
            return response, events
        seen = int(cursor)

        def moved(seen: int = seen) -> bool:
            status = service.runner.status(provider_job_id, "", str(seen))
            return bool(status.events) or status.state.terminal

        await wait_until(service, moved)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _child_threads(pid: int) -> tuple[str, str]:
    """The ``--threads`` argument and ``OMP_NUM_THREADS`` the service gave the child ``pid``."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    environ = dict(
        entry.split(b"=", 1)
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"=" in entry
    )
    return argv[argv.index(b"--threads") + 1].decode(), environ[b"OMP_NUM_THREADS"].decode()


def _event_dicts(events: list[common_pb2.ProgressEvent]) -> list[dict[str, Any]]:
    return [json.loads(event.event_json) for event in events]


# Each slow test opens the same way (start, connect, build a SubmitRequest); the specs and
# assertions that follow differ, so the three lines stay in every test rather than a fixture.
@pytest.mark.slow
async def test_experiment_runs_to_a_result_that_survives_a_restart(
    start_compute_local: ServiceFactory, connect: Callable[..., compute_pb2_grpc.ComputeProviderStub]
) -> None:
    service = await start_compute_local()
    stub = connect(service)
    submit = compute_pb2.SubmitRequest(job_id="job-1", spec_json=tiny_spec())
    first, second = await asyncio.gather(stub.Submit(submit), stub.Submit(submit))
    provider_job_id = first.provider_job_id
    assert second.provider_job_id == provider_job_id

    final, events = await follow(service, stub, provider_job_id)

    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.error
    assert final.result_ready
    assert final.stage_message == "finished; result ready"
    progress_events = [e for e in events if e.type == "progress"]
    progress = [e.progress for e in progress_events]
    assert progress == sorted(progress) and progress[-1] > progress[0]
    assert {e.stage for e in progress_events} == {
        "loading_model",
        "eval_base",
        "eval_few_shot",
        "training",
        "eval_finetuned",
        "influence",
    }
    assert [e.stage for e in events[:2]] == ["queued", "starting"]
    assert events[-1].type == "result"
    assert all(e.time.seconds > 0 for e in events)
    # A resubmit while it ran did not start a second run.
    assert [e.stage for e in events].count("starting") == 1

    # Cursor semantics: re-reading from the start or from any cursor gives the same events.
    again = await stub.GetStatus(compute_pb2.GetStatusRequest(provider_job_id=provider_job_id))
    assert _event_dicts(list(again.events)) == _event_dicts(events)
    middle = len(events) // 2
    tail = await stub.GetStatus(
        compute_pb2.GetStatusRequest(provider_job_id=provider_job_id, cursor=str(middle))
    )
    assert _event_dicts(list(tail.events)) == _event_dicts(events[middle:])
    assert tail.cursor == str(len(events))
    with pytest.raises(grpc.aio.AioRpcError) as past_end:
        await stub.GetStatus(
            compute_pb2.GetStatusRequest(provider_job_id=provider_job_id, cursor=str(len(events) + 1))
        )
    assert past_end.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    fetched = await stub.GetResult(compute_pb2.GetResultRequest(provider_job_id=provider_job_id))
    result_json = fetched.result_json
    result = json.loads(result_json)
    assert set(result["eval_results"]) == {"base", "few_shot", "finetuned"}
    assert all(run["metrics"]["n"] == 4 for run in result["eval_results"].values())
    influence = result["influence"]
    assert influence["train_ids"] == [f"t{i}" for i in range(8)]
    assert influence["eval_ids"] == [f"e{i}" for i in range(4)]
    assert len(influence["scores"]) == 4 and all(len(row) == 8 for row in influence["scores"])

    # Every listed artifact streams back in chunks, byte for byte as the manifest says.
    import hashlib

    names = {entry["name"]: entry for entry in result["artifacts"]}
    assert {"scores.npy", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(names)
    for name, entry in names.items():
        request = compute_pb2.FetchArtifactRequest(provider_job_id=provider_job_id, name=name)
        chunks = [chunk.data async for chunk in stub.FetchArtifact(request)]
        data = b"".join(chunks)
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert all(len(chunk) <= 1024 * 1024 for chunk in chunks)
    for bad in ("../spec.json", "nope.npy", ""):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            request = compute_pb2.FetchArtifactRequest(provider_job_id=provider_job_id, name=bad)
            [chunk async for chunk in stub.FetchArtifact(request)]
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    # Same job id after completion: the same provider job, no new run.
    assert (await stub.Submit(submit)).provider_job_id == provider_job_id
    assert service.runner.finished_counts == {JobState.COMPLETED: 1}

    await service.stop()
    restarted = await start_compute_local(compute_local_work_dir=service.settings.compute_local_work_dir)
    stub = connect(restarted)
    after = await stub.GetStatus(compute_pb2.GetStatusRequest(provider_job_id=provider_job_id))
    assert after.state == common_pb2.JOB_STATE_COMPLETED and after.result_ready
    assert _event_dicts(list(after.events)) == _event_dicts(events)
    kept = await stub.GetResult(compute_pb2.GetResultRequest(job_id="job-1"))
    assert kept.result_json == result_json
    assert (await stub.Submit(submit)).provider_job_id == provider_job_id


@pytest.mark.slow
async def test_one_slot_queues_cancels_and_reports_a_failing_model(
    start_compute_local: ServiceFactory, connect: Callable[..., compute_pb2_grpc.ComputeProviderStub]
) -> None:
    service = await start_compute_local()
    stub = connect(service)

    async def submit(job_id: str, spec_json: bytes) -> str:
        request = compute_pb2.SubmitRequest(job_id=job_id, spec_json=spec_json)
        return (await stub.Submit(request)).provider_job_id

    async def status(provider_job_id: str) -> compute_pb2.GetStatusResponse:
        return await stub.GetStatus(compute_pb2.GetStatusRequest(provider_job_id=provider_job_id))

    # Straight to the runner: the job holds the slot the moment submit returns, before the
    # event loop has run anything that starts its child.
    running = service.runner.submit("long", long_spec())
    assert service.runner.status(running, "", "").state is JobState.RUNNING
    failing = await submit("bad-model", tiny_spec(model_id="local/no-such-model"))
    queued = await submit("queued", tiny_spec())

    first_waiting = await status(failing)
    assert first_waiting.state == common_pb2.JOB_STATE_SUBMITTED
    assert first_waiting.stage_message == "queued: position 1 of 2, waiting for a free device (cpu)"
    assert "position 2 of 2" in (await status(queued)).stage_message
    assert service.runner.queue_depth == 2

    # The running job is inside the pipeline (it reported progress) before it is cancelled.
    await wait_until(service, has_event(service, running, "progress"))
    pid = service.runner.child_pid(running)
    assert pid is not None and _alive(pid)
    assert (await status(running)).state == common_pb2.JOB_STATE_RUNNING
    assert _child_threads(pid) == ("1", "1")  # COMPUTE_LOCAL_TORCH_THREADS of the fixture
    assert (service.runner.slot_count, service.runner.running_count) == (1, 1)

    cancelled_queued = await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=queued))
    assert cancelled_queued.state == common_pb2.JOB_STATE_CANCELLED
    assert "position 1 of 1" in (await status(failing)).stage_message

    cancelled_running = await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=running))
    assert cancelled_running.state == common_pb2.JOB_STATE_CANCELLED
    assert not _alive(pid)
    running_status = await status(running)
    assert running_status.state == common_pb2.JOB_STATE_CANCELLED
    assert running_status.events[-1].stage == "cancelled"

    # The freed slot goes to the next job in line, which fails with a message naming its model.
    final, events = await follow(service, stub, failing)
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert "local/no-such-model" in final.error
    assert events[-1].type == "error" and "local/no-such-model" in events[-1].message
    with pytest.raises(grpc.aio.AioRpcError) as no_result:
        await stub.GetResult(compute_pb2.GetResultRequest(provider_job_id=failing))
    assert no_result.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    never_ran = await status(queued)
    assert never_ran.state == common_pb2.JOB_STATE_CANCELLED
    assert [e.stage for e in never_ran.events] == ["queued", "cancelled"]
    assert service.runner.finished_counts == {JobState.CANCELLED: 2, JobState.FAILED: 1}
    assert service.runner.queue_depth == 0 and service.runner.running_count == 0


@pytest.mark.slow
async def test_shutdown_fails_the_running_job_and_keeps_the_queued_one(
    start_compute_local: ServiceFactory, connect: Callable[..., compute_pb2_grpc.ComputeProviderStub]
) -> None:
    service = await start_compute_local()
    stub = connect(service)
    long_job = compute_pb2.SubmitRequest(job_id="long", spec_json=long_spec())
    running = (await stub.Submit(long_job)).provider_job_id
    next_job = compute_pb2.SubmitRequest(job_id="next", spec_json=tiny_spec(model_id="local/no-such-model"))
    waiting = (await stub.Submit(next_job)).provider_job_id
    await wait_until(service, has_event(service, running, "progress"))
    pid = service.runner.child_pid(running)
    assert pid is not None

    await service.stop()

    assert not _alive(pid)
    assert service.runner.status(running, "", "").error == "compute-local stopped"
    assert service.runner.status(waiting, "", "").state is JobState.SUBMITTED

    restarted = await start_compute_local(compute_local_work_dir=service.settings.compute_local_work_dir)
    stub = connect(restarted)
    stopped = await stub.GetStatus(compute_pb2.GetStatusRequest(provider_job_id=running))
    assert stopped.state == common_pb2.JOB_STATE_FAILED
    assert stopped.error == "compute-local stopped"
    # The queued job ran after the restart.
    final, events = await follow(restarted, stub, waiting)
    assert final.state == common_pb2.JOB_STATE_FAILED and "local/no-such-model" in final.error
    assert "starting" in [e.stage for e in events]


@pytest.mark.slow
async def test_queue_takes_turns_between_users(
    start_compute_local: ServiceFactory, connect: Callable[..., compute_pb2_grpc.ComputeProviderStub]
) -> None:
    """One device: alice's backlog does not delay bob's first job, which starts next."""
    service = await start_compute_local()
    stub = connect(service)

    async def submit(job_id: str, user: str, spec_json: bytes) -> str:
        request = compute_pb2.SubmitRequest(
            job_id=job_id, spec_json=spec_json, account=common_pb2.Account(user_id=user, hosted=True)
        )
        return (await stub.Submit(request)).provider_job_id

    async def position(provider_job_id: str) -> str:
        status = await stub.GetStatus(compute_pb2.GetStatusRequest(provider_job_id=provider_job_id))
        return status.stage_message.split(",")[0]

    running = await submit("a-1", "alice", long_spec())
    alice_backlog = [await submit(f"a-{n}", "alice", tiny_spec()) for n in range(2, 5)]
    bob_first = await submit("b-1", "bob", tiny_spec())
    carol_first = await submit("c-1", "carol", tiny_spec())
    assert service.runner.status(running, "", "").state is JobState.RUNNING
    assert [await position(p) for p in (bob_first, carol_first, *alice_backlog)] == [
        "queued: position 1 of 5",
        "queued: position 2 of 5",
        "queued: position 3 of 5",
        "queued: position 4 of 5",
        "queued: position 5 of 5",
    ]
    # The running job ends: bob's job starts, ahead of alice's three older ones.
    await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=running))

    def state(provider_job_id: str) -> JobState:
        return service.runner.status(provider_job_id, "", "").state

    await wait_until(service, lambda: state(bob_first) is not JobState.SUBMITTED)
    assert all(state(p) is JobState.SUBMITTED for p in alice_backlog)
    for provider_job_id in (bob_first, carol_first, *alice_backlog):
        await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=provider_job_id))
