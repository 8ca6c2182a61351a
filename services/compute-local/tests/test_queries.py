"""Follow-up queries on compute-local: the real gRPC server, a real planted-duplicate experiment on
the tiny model, then queries answered by its warm worker (one process, kept between queries,
reading the experiment's own folder), a cancel that keeps the worker, the idle timeout, the
bound on warm workers, and a query whose experiment folder is gone (recomputed)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from typing import Any

import pytest

from benchmarks.planted import planted_duplicate_spec
from compute_local.jobs import JobState
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc

from .conftest import ServiceFactory
from .test_service import follow

COPIED = 11
COMPLETED = common_pb2.JOB_STATE_COMPLETED


def query_request(prompt: str, **extra: Any) -> bytes:
    return json.dumps({"queries": [{"prompt": prompt, **extra}], "top_k": 3}).encode()


async def run_experiment(
    stub: compute_pb2_grpc.ComputeProviderStub, service: Any, job_id: str, spec: dict[str, Any]
) -> bytes:
    request = compute_pb2.SubmitRequest(job_id=job_id, spec_json=json.dumps(spec).encode())
    provider_job_id = (await stub.Submit(request)).provider_job_id
    final, _ = await follow(service, stub, provider_job_id)
    assert final.state == COMPLETED, final.error
    return service.runner.result(provider_job_id, "")


async def ask(
    stub: compute_pb2_grpc.ComputeProviderStub,
    service: Any,
    job_id: str,
    parent: str,
    spec: dict[str, Any],
    result_json: bytes,
    request: bytes,
) -> tuple[str, compute_pb2.GetStatusResponse, list[dict[str, Any]]]:
    submitted = await stub.Submit(
        compute_pb2.SubmitRequest(
            job_id=job_id,
            spec_json=json.dumps(spec).encode(),
            kind="query",
            request_json=request,
            parent_result_json=result_json,
            parent_job_id=parent,
        )
    )
    final, events = await follow(service, stub, submitted.provider_job_id)
    return submitted.provider_job_id, final, [json.loads(e.event_json) for e in events]


def answer(service: Any, provider_job_id: str) -> dict[str, Any]:
    return json.loads(service.runner.result(provider_job_id, ""))


@pytest.mark.slow
async def test_queries_share_one_warm_worker_that_a_cancel_keeps_and_idleness_retires(
    start_compute_local: ServiceFactory, connect: Callable[..., compute_pb2_grpc.ComputeProviderStub]
) -> None:
    service = await start_compute_local(compute_local_warm_query_workers=1, compute_local_cancel_grace_s=30.0)
    stub = connect(service)
    spec = planted_duplicate_spec("trackstar", 16, 2, 60)
    result_json = await run_experiment(stub, service, "exp-1", spec)
    prompt = spec["training_data"][COPIED]["prompt"]

    first, final, events = await ask(stub, service, "q-1", "exp-1", spec, result_json, query_request(prompt))
    assert final.state == COMPLETED, final.error
    assert any(e.get("stage") == "query" for e in events)
    assert events[-1]["message"] == "query answered; result ready"
    outcome = answer(service, first)
    assert outcome["source"] == "index"  # the experiment's own gradient index, from its folder
    assert outcome["results"][0]["helpful"][0]["id"] == f"t{COPIED}"
    (worker,) = service.runner.warm.workers
    pid = worker.process.pid

    # A cancel stops the query in the worker and keeps the worker (and its session).
    submitted = await stub.Submit(
        compute_pb2.SubmitRequest(
            job_id="q-2",
            spec_json=json.dumps(spec).encode(),
            kind="query",
            request_json=query_request(prompt),
            parent_result_json=result_json,
            parent_job_id="exp-1",
        )
    )
    await stub.Cancel(compute_pb2.CancelRequest(provider_job_id=submitted.provider_job_id))
    assert service.runner.status(submitted.provider_job_id, "", "").state is JobState.CANCELLED
    (kept,) = service.runner.warm.workers
    assert kept.process.pid == pid and kept.alive

    # The next query is answered by that same process, with the same ranking.
    span = [0, 1]
    third, final, _ = await ask(
        stub, service, "q-3", "exp-1", spec, result_json, query_request(prompt, span=span)
    )
    assert final.state == COMPLETED, final.error
    assert service.runner.warm.workers[0].process.pid == pid
    spanned = answer(service, third)["results"][0]
    assert spanned["span"] == span and spanned["span_tokens"] >= 1
    assert service.runner.status(third, "", "").state is JobState.COMPLETED

    # Idle past the timeout: retired, its process gone.
    assert await service.runner.warm.retire_idle(now=worker.idle_since + service.runner.warm.idle_s + 1) == 1
    assert service.runner.warm.workers == [] and worker.process.returncode is not None


@pytest.mark.slow
async def test_a_full_pool_retires_the_longest_idle_worker_and_a_gone_folder_is_recomputed(
    start_compute_local: ServiceFactory, connect: Callable[..., compute_pb2_grpc.ComputeProviderStub]
) -> None:
    service = await start_compute_local(compute_local_warm_query_workers=1)
    stub = connect(service)
    spec = planted_duplicate_spec("datainf", 8, 1, 30)
    results = {}
    for name in ("exp-a", "exp-b"):
        results[name] = await run_experiment(stub, service, name, spec)
    prompt = spec["training_data"][1]["prompt"]
    await ask(stub, service, "qa", "exp-a", spec, results["exp-a"], query_request(prompt))
    first = service.runner.warm.workers[0]
    # The experiment's folder is gone (as after retention): the query recomputes, in a new worker
    # that replaces the other experiment's (the pool holds one).
    shutil.rmtree(service.runner._store.artifacts_dir(service.runner._by_job_id["exp-b"]))
    qb, final, _ = await ask(stub, service, "qb", "exp-b", spec, results["exp-b"], query_request(prompt))
    assert final.state == COMPLETED, final.error
    assert answer(service, qb)["source"] == "retrained"
    (only,) = service.runner.warm.workers
    assert only.parent_job_id == "exp-b" and first.process.returncode is not None
