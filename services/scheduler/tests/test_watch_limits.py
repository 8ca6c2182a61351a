"""WatchJob streams per user are capped (RESOURCE_EXHAUSTED naming the cap); the scheduler accepts
only the callers in SCHEDULER_CALLER_TOKENS when it is set."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from influence.v1 import scheduler_pb2, scheduler_pb2_grpc
from service_runtime.grpc_server import insecure_channel

GATEWAY_TOKEN = "the-gateways-scheduler-token"


async def test_watches_past_the_cap_are_refused_and_others_still_served(start, provider, h) -> None:
    scheduler = await start(scheduler_max_watches_per_user=2)
    plan = h.plan(events=h.progress_events(4), hold_at=1, chunk=1)
    provider.servicer.plan = plan
    stub = scheduler.stub
    alice_job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    watch = scheduler_pb2.WatchJobRequest(user_id="alice", job_id=alice_job.id)
    held = [stub.WatchJob(watch, timeout=20) for _ in range(2)]
    for stream in held:
        await stream.read()  # each is open and has its first event
    third = stub.WatchJob(watch, timeout=20)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await third.read()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 2 per user (SCHEDULER_MAX_WATCHES_PER_USER)" in (refused.value.details() or "")

    # Another user's watch is served; a closed stream gives its place back.
    with pytest.raises(grpc.aio.AioRpcError) as not_found:
        await stub.WatchJob(scheduler_pb2.WatchJobRequest(user_id="bob", job_id=alice_job.id)).read()
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    held[0].cancel()
    deadline = asyncio.get_running_loop().time() + 5
    while True:  # the scheduler sees the cancellation a moment later
        again = stub.WatchJob(watch, timeout=20)
        try:
            assert (await again.read()).seq == 1
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert asyncio.get_running_loop().time() < deadline, "the cancelled watch kept its place"
            await asyncio.sleep(0.05)
    plan.release.set()
    for stream in (held[1], again):
        stream.cancel()


async def test_only_listed_callers_reach_the_scheduler(start) -> None:
    scheduler = await start(scheduler_caller_tokens=f"gateway={GATEWAY_TOKEN}")
    address = f"127.0.0.1:{scheduler.app.port}"
    request = scheduler_pb2.ListJobsRequest(user_id="alice")
    for token in (None, "not-the-gateways-token"):
        async with insecure_channel(address, caller_token=token) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await scheduler_pb2_grpc.SchedulerStub(channel).ListJobs(request)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with insecure_channel(address, caller_token=GATEWAY_TOKEN) as channel:
        assert list((await scheduler_pb2_grpc.SchedulerStub(channel).ListJobs(request)).jobs) == []


async def test_watchers_of_one_job_share_their_reads(start, provider, h) -> None:
    scheduler = await start()
    plan = h.plan(events=h.progress_events(6), hold_at=1, chunk=1)
    provider.servicer.plan = plan
    stub = scheduler.stub
    job = await stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    watchers = 40
    streams = [
        stub.WatchJob(scheduler_pb2.WatchJobRequest(user_id="alice", job_id=job.id)) for _ in range(watchers)
    ]
    for stream in streams:
        assert (await stream.read()).seq == 1

    # A spy on the real store: every read still goes to PostgreSQL, and is counted.
    store = scheduler.app._store
    reads = 0
    events_after = store.events_after

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        return await events_after(*args, **kwargs)

    store.events_after = counted
    plan.release.set()
    seqs = []
    for stream in streams:
        got = []
        while (event := await stream.read()) is not grpc.aio.EOF:
            got.append(event.seq)
        seqs.append(got)
    assert all(got == seqs[0] for got in seqs) and seqs[0][0] == 2
    # Each wake-up is read once for every watcher (one per seq reached, and the empty read
    # before waiting), not once per watcher.
    print(f"{reads} reads of the job's events for {watchers} watchers")
    assert reads < watchers, f"{reads} reads of the job's events for {watchers} watchers"
