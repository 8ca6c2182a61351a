"""A paid job runs once and its result survives, through compute-runpod, the fake RunPod (the real
worker under the runpod SDK's loop, the real pipeline on the tiny model) and the S3 test server
(moto): the upload plan is the one the scheduler mints (scheduler.uploads), and the reconciling
and collecting are the scheduler's own functions (scheduler.artifacts). Each case ends with the
job completed or failed in plain words, and counts the jobs the fake's ``/run`` created."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from runpod_testkit import (
    TEMPLATE_ID,
    HostedAccount,
    Stack,
    hosted_account,
    load_worker_handler,
    running_keyvault,
    running_stack,
    spec_bytes,
)

from artifact_store import ArtifactStore, job_key, job_prefix
from benchmarks.planted import stand_in_result
from devstack.fake_runpod import FakeRunPod
from devstack.fake_runpod.state import DEFAULT_RETENTION_S
from devstack.s3_server import S3TestServer
from gpu_core.schemas import ExperimentResult, parse_spec
from gpu_core.uploads import CLAIM_NAME, CLAIM_READ_NAME, DUPLICATE_DELIVERY, RESULT_NAME, presigned_expiry
from influence.v1 import common_pb2, compute_pb2
from keyvault.server import KeyVaultServer
from scheduler.artifacts import WorkerClaim, fetch_stored_result, read_worker_claim
from scheduler.uploads import presigned_uploads, verify_uploads

HOSTED = common_pb2.Account(user_id="operator-tier-user", hosted=True)

# One fake RunPod, key vault and hosted endpoint for the module, so that its worker process cold
# starts (imports torch, loads the tiny model) once and stays warm for every job here; each test
# gets its own compute-runpod (its settings may differ) and an empty record of the fake's calls.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake() -> AsyncIterator[FakeRunPod]:
    async with FakeRunPod(template_ids={TEMPLATE_ID}, stream_wait_s=1.0) as fake_runpod:
        yield fake_runpod


@pytest.fixture(scope="module")
def database_url(embedded_postgres: Any) -> str:
    return str(embedded_postgres.create_database())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keyvault_server(database_url: str) -> AsyncIterator[KeyVaultServer]:
    async with running_keyvault(database_url) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def account(fake: FakeRunPod) -> HostedAccount:
    return await hosted_account(fake)


@pytest.fixture
def service_overrides(request: pytest.FixtureRequest) -> dict[str, object]:
    return getattr(request, "param", {})


@pytest_asyncio.fixture(loop_scope="module")
async def stack(
    fake: FakeRunPod,
    keyvault_server: KeyVaultServer,
    account: HostedAccount,
    service_overrides: dict[str, object],
) -> AsyncIterator[Stack]:
    # What an earlier test changed at the shared fake goes back to RunPod's behaviour.
    fake.set_throttled(False)
    fake.retention_s = DEFAULT_RETENTION_S
    async with running_stack(fake, keyvault_server.port, account, **service_overrides) as running:
        yield running


def submit_request(job_id: str, uploads: list[compute_pb2.ArtifactUpload]) -> compute_pb2.SubmitRequest:
    return compute_pb2.SubmitRequest(
        job_id=job_id, account=HOSTED, spec_json=spec_bytes(), artifact_uploads=uploads
    )


async def upload_plan(
    store: ArtifactStore, job_id: str, life_s: int = 3600
) -> list[compute_pb2.ArtifactUpload]:
    return await presigned_uploads(store, job_id, json.loads(spec_bytes()), life_s)


async def wait_for_claim(store: ArtifactStore, job_id: str, limit_s: float = 120) -> WorkerClaim:
    """What the scheduler does with an ambiguous submit: wait for the worker's claim."""
    async with asyncio.timeout(limit_s):
        while (claim := await read_worker_claim(store, job_id)) is None:
            await asyncio.sleep(0.2)
    return claim


async def completed_result(stack: Stack, provider_job_id: str) -> ExperimentResult:
    final, _, _ = await stack.wait_terminal(provider_job_id, HOSTED)
    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.error
    answer = await stack.stub.GetResult(
        compute_pb2.GetResultRequest(provider_job_id=provider_job_id, account=HOSTED)
    )
    return ExperimentResult.model_validate_json(answer.result_json)


async def assert_files_verified(store: ArtifactStore, job_id: str, result: ExperimentResult) -> None:
    manifest = [entry.model_dump() for entry in result.artifacts]
    await verify_uploads(store, job_id, manifest)
    stored = {info.key for info in await store.list(job_prefix(job_id))}
    expected = {job_key(job_id, entry.name) for entry in result.artifacts}
    assert expected | {job_key(job_id, CLAIM_NAME), job_key(job_id, RESULT_NAME)} == stored


async def reconcile_ambiguous_submit(stack: Stack, s3_store: ArtifactStore, job_id: str) -> None:
    """The job the lost answer created is found through the worker's claim and completes."""
    assert len(stack.fake.accepted_runs) == 1
    claim = await wait_for_claim(s3_store, job_id)
    assert (claim.job_id, claim.provider) == (job_id, "runpod")
    assert claim.provider_job_id == stack.fake.accepted_runs[0]
    result = await completed_result(stack, claim.provider_job_id)
    await assert_files_verified(s3_store, job_id, result)
    assert len(stack.fake.accepted_runs) == 1  # exactly one provider job, never sent again
    assert len(stack.fake.calls("job.run")) == 1


async def test_run_accepted_then_a_server_error_is_reconciled_not_resent(
    stack: Stack, s3_store: ArtifactStore
) -> None:
    stack.fake.fail_after_accept(status=502)
    plan = await upload_plan(s3_store, "job-5xx")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Submit(submit_request("job-5xx", plan))
    # UNKNOWN, not UNAVAILABLE: the scheduler must reconcile it, not retry it.
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert "may or may not have accepted it; it was not sent again" in caught.value.details()
    await reconcile_ambiguous_submit(stack, s3_store, "job-5xx")


@pytest.mark.parametrize("service_overrides", [{"runpod_http_timeout_s": 1.5}], indirect=True)
async def test_run_accepted_then_no_answer_before_the_timeout_is_reconciled(
    stack: Stack, s3_store: ArtifactStore
) -> None:
    stack.fake.fail_after_accept(hang_s=4.0)
    plan = await upload_plan(s3_store, "job-hang")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Submit(submit_request("job-hang", plan))
    assert caught.value.code() == grpc.StatusCode.UNKNOWN
    assert "RunPod did not answer (ReadTimeout)" in caught.value.details()
    await reconcile_ambiguous_submit(stack, s3_store, "job-hang")


async def test_a_second_delivery_of_the_same_job_does_no_gpu_work(
    stack: Stack, s3_store: ArtifactStore
) -> None:
    plan = await upload_plan(s3_store, "job-twice")
    first = (await stack.stub.Submit(submit_request("job-twice", plan))).provider_job_id
    # The same job sent to RunPod again (as a restarted compute-runpod, whose memory of what it
    # sent is gone, or a retry after an ambiguous answer would): the same input, a new RunPod job.
    async with httpx.AsyncClient() as http:
        resent = await http.post(
            f"{stack.fake.url}/v2/{stack.hosted_endpoint}/run",
            headers={"Authorization": f"Bearer {stack.hosted_key}"},
            json={"input": stack.fake.job(first).input},
        )
    second = resent.json()["id"]
    result = await completed_result(stack, first)
    final, events, _ = await stack.wait_terminal(second, HOSTED)
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert final.error.startswith(f"{DUPLICATE_DELIVERY} of job job-twice"), final.error
    assert "did no GPU work" in final.error
    assert events == []  # no model loaded, no training step: the GPU work ran once
    assert (await read_worker_claim(s3_store, "job-twice")).provider_job_id == first
    await assert_files_verified(s3_store, "job-twice", result)
    assert stack.fake.accepted_runs == [first, second]


async def test_a_job_that_waited_uploads_its_result_outlives_runpod_and_a_503_deletes_nothing(
    stack: Stack, s3_server: S3TestServer, s3_store: ArtifactStore
) -> None:
    """One job, three outages: it waits in RunPod's queue (the scheduler's default URL life
    outlives RunPod's whole ttl, so it still uploads); RunPod forgets it before the scheduler
    asks (its result is collected from the store); the store answers 503 while its files are
    verified, until the test has seen checks refused (nothing is deleted, it completes). The
    scheduler's own 10 s case is services/scheduler/tests/test_outbox.py."""
    from compute_runpod.config import Settings as RunPodSettings
    from scheduler.config import Settings as SchedulerSettings

    life_s = SchedulerSettings.model_fields["scheduler_upload_url_ttl_s"].default
    assert life_s > RunPodSettings.model_fields["runpod_job_ttl_s"].default
    stack.fake.set_throttled(True)  # no GPU: the job waits in the queue
    plan = await upload_plan(s3_store, "job-late", life_s=life_s)
    provider_job_id = (await stack.stub.Submit(submit_request("job-late", plan))).provider_job_id
    await asyncio.sleep(3)
    stack.fake.set_throttled(False)
    final, _, _ = await stack.wait_terminal(provider_job_id, HOSTED)
    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.error

    stack.fake.retention_s = 0.5  # RunPod's 30 minutes, shortened: the scheduler was away longer
    await asyncio.sleep(1.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.GetResult(
            compute_pb2.GetResultRequest(provider_job_id=provider_job_id, account=HOSTED)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    stored = await fetch_stored_result(s3_store, "job-late")
    assert stored is not None
    result = ExperimentResult.model_validate_json(stored)
    assert {"scores.npy", "adapter/adapter_model.safetensors"} <= {e.name for e in result.artifacts}
    assert await fetch_stored_result(s3_store, "job-never-ran") is None

    before = {info.key for info in await s3_store.list(job_prefix("job-late"))}
    assert s3_server.faults is not None
    refused = s3_server.faults.refused
    s3_server.outage()
    try:
        verifying = asyncio.create_task(assert_files_verified(s3_store, "job-late", result))
        async with asyncio.timeout(30):
            while s3_server.faults.refused < refused + 3:  # checks refused, and retried
                await asyncio.sleep(0.05)
        assert not verifying.done()  # no verdict while the store is down
    finally:
        s3_server.end_outage()
    await verifying
    assert {info.key for info in await s3_store.list(job_prefix("job-late"))} == before
    assert stack.fake.accepted_runs == [provider_job_id]


async def test_a_job_whose_upload_urls_lapse_in_the_queue_is_dropped_unrun(
    stack: Stack, s3_store: ArtifactStore
) -> None:
    """RunPod's ttl is kept within the upload URLs' life: a job still queued when they lapse is
    dropped by RunPod before any worker takes it (nothing paid), not run to an end that cannot
    upload. No claim in the store is the proof it never started, so sending it again with fresh
    URLs is safe."""
    stack.fake.set_throttled(True)  # no GPU: the job waits in the queue
    plan = await upload_plan(s3_store, "job-queued", life_s=12)
    expires = min(presigned_expiry(upload.url) or 0 for upload in plan)
    provider_job_id = (await stack.stub.Submit(submit_request("job-queued", plan))).provider_job_id
    job = stack.fake.job(provider_job_id)
    assert job is not None
    # The fake keeps the ttl as a monotonic deadline: it ends no later than the URLs do.
    assert job.expires_at - time.monotonic() <= expires - time.time() + 1
    await asyncio.sleep(max(0.0, expires - time.time()) + 1)
    stack.fake.set_throttled(False)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.get_status(provider_job_id, HOSTED, "")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # the scheduler fails it in these words
    assert "drops a job still queued when its ttl ends" in caught.value.details()
    # No worker ever streamed or finished it: it never ran.
    assert not [c for c in stack.fake.calls() if c.route.startswith("worker.") and provider_job_id in c.path]
    assert await read_worker_claim(s3_store, "job-queued") is None
    assert [info.key for info in await s3_store.list(job_prefix("job-queued"))] == []
    assert stack.fake.accepted_runs == [provider_job_id]


async def test_a_worker_that_cannot_reach_the_store_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim comes before any GPU work: with the store unreachable the job ends at once with
    a plain error (its files could not have been stored either), and no model is loaded."""
    import gpu_core.uploads

    handler = load_worker_handler("runpod_worker_claim_under_test")
    monkeypatch.setattr(gpu_core.uploads, "_RETRY_BASE_S", 0.0)
    started: list[object] = []
    monkeypatch.setattr(handler, "ExperimentThread", lambda *args, **kwargs: started.append(args))
    transport = {
        "mode": "presigned",
        "job_id": "job-nostore",
        "urls": {CLAIM_NAME: "http://127.0.0.1:9/claim", RESULT_NAME: "http://127.0.0.1:9/result"},
    }
    job = {"id": "rp-1", "input": {**json.loads(spec_bytes()), "artifact_transport": transport}}
    chunks = [chunk async for chunk in handler.handler(job)]
    assert len(chunks) == 1 and chunks[0]["error"].startswith("The job was not run: the artifact store")
    assert "could not be reached" in chunks[0]["error"]
    assert started == []


async def test_runpod_delivering_the_same_job_again_reclaims_it_another_job_is_refused(
    s3_store: ArtifactStore,
) -> None:
    """RunPod runs a job again under the same id when its first worker failed (or on /retry):
    that delivery finds its own claim (through the plan's GET of it) and runs; a second RunPod job
    of the same job of ours (a resent /run) is still refused before any GPU work."""
    handler = load_worker_handler("runpod_worker_reclaim_under_test")
    urls = {upload.name: upload.url for upload in await upload_plan(s3_store, "job-again")}
    transport = {"mode": "presigned", "urls": urls, "job_id": "job-again"}
    assert await handler.claim({"id": "rp-1"}, transport) is None  # the first delivery runs
    assert await handler.claim({"id": "rp-1"}, transport) is None  # RunPod delivers rp-1 again
    refusal = await handler.claim({"id": "rp-2"}, transport)
    assert refusal is not None and refusal.startswith(f"{DUPLICATE_DELIVERY} of job job-again")
    claim = await read_worker_claim(s3_store, "job-again")
    assert claim is not None and claim.provider_job_id == "rp-1"
    # A plan without the GET (minted before it existed) keeps the strict rule: any 412 refuses.
    strict = {**transport, "urls": {name: url for name, url in urls.items() if name != CLAIM_READ_NAME}}
    refusal = await handler.claim({"id": "rp-1"}, strict)
    assert refusal is not None and refusal.startswith(DUPLICATE_DELIVERY)


async def test_a_later_job_carries_its_workers_record_urls(stack: Stack, s3_store: ArtifactStore) -> None:
    """A counterfactual check writes no files, but its worker claims our job id and keeps its
    result in the store: the records' URLs the scheduler minted reach the worker's input."""
    stack.fake.set_throttled(True)  # no worker picks it up: only what was sent is looked at
    spec = parse_spec(spec_bytes()).model_dump(mode="json")  # with the ids a result names
    uploads = await presigned_uploads(s3_store, "job-check", None, 3600)
    answer = await stack.stub.Submit(
        compute_pb2.SubmitRequest(
            job_id="job-check",
            account=HOSTED,
            spec_json=json.dumps(spec).encode(),
            kind="counterfactual",
            request_json=json.dumps({"k": 1, "controls": 1}).encode(),
            parent_result_json=json.dumps(stand_in_result(spec)).encode(),
            artifact_uploads=uploads,
        )
    )
    sent = stack.fake.job(answer.provider_job_id)
    assert sent is not None
    transport = sent.input["artifact_transport"]
    assert transport["job_id"] == "job-check" and set(transport["urls"]) == {
        CLAIM_NAME,
        RESULT_NAME,
        CLAIM_READ_NAME,
    }
    await stack.stub.Cancel(compute_pb2.CancelRequest(provider_job_id=answer.provider_job_id, account=HOSTED))
