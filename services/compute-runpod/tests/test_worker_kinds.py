"""The RunPod worker's handler on a later job of an experiment (a counterfactual check): it
dispatches on the payload's kind, runs the real gpu_core check on the tiny model, and refuses a
payload that does not fit with the field named."""

from __future__ import annotations

import json
from types import ModuleType

import pytest
from runpod_testkit import load_worker_handler

from artifact_store import ArtifactStore
from benchmarks.planted import planted_duplicate_spec, stand_in_result
from gpu_core.jobs import COUNTERFACTUAL, make_payload
from gpu_core.schemas import parse_spec
from gpu_core.uploads import CLAIM_READ_NAME, DUPLICATE_DELIVERY, WORKER_RECORD_NAMES
from scheduler.artifacts import fetch_stored_result, read_worker_claim
from scheduler.uploads import presigned_uploads


@pytest.fixture(scope="module")
def worker() -> ModuleType:
    return load_worker_handler("runpod_worker_kinds")


async def handle(worker: ModuleType, job: dict) -> list[dict]:
    """Every chunk the (async generator) handler yields for ``job``, as the SDK collects them."""
    return [chunk async for chunk in worker.handler(job)]


def check_payload(request: dict) -> dict:
    spec = parse_spec(planted_duplicate_spec("tracin", 6, 2, epochs=2)).model_dump(mode="json")
    return make_payload(COUNTERFACTUAL, spec, request, stand_in_result(spec))


async def test_a_counterfactual_payload_streams_progress_then_its_result(worker: ModuleType) -> None:
    chunks = await handle(worker, {"id": "job-1", "input": check_payload({"k": 1, "controls": 1})})
    *progress, last = chunks
    assert progress and {chunk["stage"] for chunk in progress} == {"counterfactual"}
    assert last["type"] == "result"
    assert last["result"]["removed_ids"] == ["t0", "t3"]  # each eval example's planted duplicate
    assert len(last["result"]["control_removed_ids"]) == 1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (check_payload({"k": 0}), "Invalid job input: k: Input should be greater than or equal to 1"),
        ({**check_payload({}), "parent_result": None}, "Invalid job input: parent_result: a counterfactual"),
        ({**check_payload({}), "kind": "retrain"}, "Invalid job input: kind: unknown job kind 'retrain'"),
        ({**check_payload({}), "spec": {"training_data": []}}, "Invalid experiment spec: "),
    ],
)
async def test_a_payload_that_does_not_fit_is_the_jobs_error(
    worker: ModuleType, payload: dict, message: str
) -> None:
    chunks = await handle(worker, {"id": "job-2", "input": payload})
    assert len(chunks) == 1 and chunks[0]["error"].startswith(message), chunks


async def test_a_check_with_record_urls_claims_its_job_and_keeps_its_result(
    worker: ModuleType, s3_store: ArtifactStore
) -> None:
    """What compute-runpod sends a later job when the scheduler minted its records' URLs: the
    worker claims our job id first and leaves the result in the store; a second delivery of the
    same job runs nothing."""
    urls = {upload.name: upload.url for upload in await presigned_uploads(s3_store, "job-check", None, 600)}
    assert set(urls) == {*WORKER_RECORD_NAMES, CLAIM_READ_NAME}
    transport = {"mode": "presigned", "urls": urls, "job_id": "job-check"}
    payload = {**check_payload({"k": 1, "controls": 1}), "artifact_transport": transport}
    chunks = await handle(worker, {"id": "rp-first", "input": payload})
    assert chunks[-1]["type"] == "result"
    claim = await read_worker_claim(s3_store, "job-check")
    assert claim is not None and claim.provider_job_id == "rp-first"
    stored = await fetch_stored_result(s3_store, "job-check")
    assert stored is not None and json.loads(stored)["removed_ids"] == ["t0", "t3"]
    again = await handle(worker, {"id": "rp-second", "input": payload})
    assert len(again) == 1 and again[0]["error"].startswith(DUPLICATE_DELIVERY)
