"""Warm query workers are tenants of their device: an experiment given a device first retires
the idle workers there (never one answering a query), and prefers a device without any. Real
worker processes and the real service; the experiments are cancelled once they have started."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from benchmarks.planted import planted_duplicate_spec
from compute_local.warm import WarmQueryPool
from influence.v1 import compute_pb2, compute_pb2_grpc

from .conftest import ServiceFactory


def worker_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", GPU_CORE_DEVICE="cpu")


async def test_evict_retires_the_idle_workers_of_a_device_and_never_a_busy_one(tmp_path: Path) -> None:
    pool = WarmQueryPool(3, 300.0, 10.0, tmp_path / "query-workers.log")
    try:
        idle = await pool.get("exp-idle", "cpu", 1, None, worker_env())
        busy = await pool.get("exp-busy", "cpu", 1, None, worker_env())
        elsewhere = await pool.get("exp-other", "cuda:1", 1, None, worker_env())
        assert {w.parent_job_id for w in pool.on_device("cpu")} == {"exp-idle", "exp-busy"}
        # Mid-answer: the worker has sent the query's first event (an error: the job folder is
        # empty) and its "done" line is still to be read.
        answering = busy.answer(tmp_path / "empty-job")
        first = await anext(answering)
        assert first["type"] == "error" and busy.busy

        assert await pool.evict("cpu") == 1
        await idle.process.wait()
        assert not idle.alive and busy.alive and elsewhere.alive
        assert [w.parent_job_id for w in pool.workers] == ["exp-busy", "exp-other"]

        assert [event async for event in answering] == []  # the rest of the answer, up to "done"
        assert not busy.busy and busy.in_sync
        assert await pool.evict("cpu") == 1
        assert [w.parent_job_id for w in pool.workers] == ["exp-other"]
    finally:
        await pool.close()


async def submit_experiment(stub: compute_pb2_grpc.ComputeProviderStub, job_id: str) -> str:
    spec = planted_duplicate_spec("tracin", 8, 1, 1)
    request = compute_pb2.SubmitRequest(job_id=job_id, spec_json=json.dumps(spec).encode())
    return (await stub.Submit(request)).provider_job_id


async def test_an_experiment_retires_the_idle_warm_workers_of_its_device_before_it_starts(
    start_compute_local: ServiceFactory, connect: Callable[..., compute_pb2_grpc.ComputeProviderStub]
) -> None:
    service = await start_compute_local(compute_local_warm_query_workers=2, compute_local_cancel_grace_s=2.0)
    runner = service.runner
    worker = await runner.warm.get("exp-old", "cpu", 1, None, worker_env())
    stub = connect(service)
    provider_job_id = await submit_experiment(stub, "exp-new")
    await runner.wait_for(lambda: runner.child_pid(provider_job_id) is not None)

    assert worker.process.returncode is not None  # gone before the experiment's child started
    assert runner.warm.workers == []
    messages = [stored.event.get("message") for stored in runner.status(provider_job_id, "", "").events]
    assert "retired 1 idle query worker(s) on cpu to free its memory" in messages
    await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=provider_job_id))


async def test_an_experiment_prefers_a_free_device_without_warm_workers(
    start_compute_local: ServiceFactory, connect: Callable[..., compute_pb2_grpc.ComputeProviderStub]
) -> None:
    """Two devices, a warm worker on the first: the experiment goes to the second (and is
    cancelled there: this machine has no CUDA) and the worker stays."""
    service = await start_compute_local(
        compute_local_devices="cuda:0,cuda:1", compute_local_cancel_grace_s=2.0
    )
    runner = service.runner
    worker = await runner.warm.get("exp-old", "cuda:0", 1, None, worker_env())
    stub = connect(service)
    provider_job_id = await submit_experiment(stub, "exp-new")

    assert runner.status(provider_job_id, "", "").stage_message.startswith("running on cuda:1")
    await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=provider_job_id))
    assert worker.alive and runner.warm.workers == [worker]
