"""The fake RunPod itself keeps RunPod's documented behaviour (shared/reference/runpod.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from devstack.fake_runpod import FakeRunPod

KEY = "fake-test-key-0123456789"
ENDPOINT_BODY = {"name": "e", "type": "QUEUE", "templateId": "influence-template",
                 "gpu": {"pools": ["AMPERE_80"]}, "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4}}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield client


async def _finish(http: httpx.AsyncClient, fake: FakeRunPod, endpoint: str, job: str) -> dict:
    """Poll /stream (as a client would) until the job is terminal; the status and all chunks."""
    chunks: list = []
    async with asyncio.timeout(60):
        while True:
            answer = (await http.get(f"{fake.url}/v2/{endpoint}/stream/{job}?wait=1000")).json()
            chunks.extend(c["output"] for c in answer["stream"])
            if answer["status"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}:
                return {"status": answer["status"], "chunks": chunks}


async def test_auth_and_endpoint_management(http: httpx.AsyncClient) -> None:
    async with FakeRunPod({KEY: 12.5}) as fake:
        async with httpx.AsyncClient() as no_key:
            anonymous = await no_key.post(f"{fake.url}/graphql", json={"query": "query { myself { id } }"})
        assert anonymous.status_code == 200 and anonymous.json() == {"data": {"myself": None}}
        bad = await http.get(f"{fake.url}/v2/serverless", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.headers["content-type"] == "application/problem+json"
        me = await http.post(f"{fake.url}/graphql", json={"query": "query { myself { id clientBalance } }"})
        assert me.json()["data"]["myself"]["clientBalance"] == 12.5

        without_gpu = {k: v for k, v in ENDPOINT_BODY.items() if k != "gpu"}
        neither = await http.post(f"{fake.url}/v2/serverless", json=without_gpu)
        assert neither.status_code == 400
        unknown = await http.post(
            f"{fake.url}/v2/serverless", json={**ENDPOINT_BODY, "templateId": "x"}
        )
        assert unknown.status_code == 404
        created = await http.post(f"{fake.url}/v2/serverless", json=ENDPOINT_BODY)
        assert created.status_code == 201
        body = created.json()
        # API-create defaults differ from the console's: 5 min timeout, FlashBoot off, 3 workers.
        assert (body["timeout"], body["flashboot"], body["workers"]["max"]) == (300000, "OFF", 3)
        assert body["requestUrls"]["run"] == f"{fake.url}/v2/{body['id']}/run"
        deleted = await http.delete(f"{fake.url}/v2/serverless/{body['id']}")
        assert deleted.status_code == 204
        assert (await http.get(f"{fake.url}/v2/serverless/{body['id']}")).status_code == 404

        fake.fail_next("serverless.list", 429, retry_after=7)
        limited = await http.get(f"{fake.url}/v2/serverless")
        assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
        assert (await http.get(f"{fake.url}/v2/serverless")).status_code == 200
        assert [r.status for r in fake.calls("serverless.list")] == [401, 429, 200]


async def test_yielded_error_fails_the_job_and_stays_out_of_the_stream(http: httpx.AsyncClient) -> None:
    async with FakeRunPod({KEY: 10}) as fake:
        endpoint = (await http.post(f"{fake.url}/v2/serverless", json=ENDPOINT_BODY)).json()["id"]
        job = (await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": {"eval_data": []}})).json()
        assert job["status"] == "IN_QUEUE"
        finished = await _finish(http, fake, endpoint, job["id"])
        assert finished == {"status": "FAILED", "chunks": []}
        status = (await http.get(f"{fake.url}/v2/{endpoint}/status/{job['id']}")).json()
        assert "training_data" in status["error"] and "output" not in status

        fake.retention_s = 0.0  # results are kept for a limited time, then 404
        assert (await http.get(f"{fake.url}/v2/{endpoint}/status/{job['id']}")).status_code == 404


async def test_stream_drains_and_large_chunks_are_split(http: httpx.AsyncClient, tmp_path: Path) -> None:
    handler = tmp_path / "handler.py"
    handler.write_text(
        "def handler(job):\n"
        "    yield {'step': 1}\n"
        "    yield {'blob': 'x' * 3000}\n"
        "    return 'ignored'\n"
    )
    async with FakeRunPod({KEY: 10}, handler_path=handler, max_chunk_bytes=1024) as fake:
        endpoint = (await http.post(f"{fake.url}/v2/serverless", json=ENDPOINT_BODY)).json()["id"]
        job = (await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": {}})).json()["id"]
        finished = await _finish(http, fake, endpoint, job)
        assert finished["status"] == "COMPLETED"
        first, *pieces = finished["chunks"]
        assert first == {"step": 1} and len(pieces) > 1
        assert json.loads("".join(pieces)) == {"blob": "x" * 3000}
        again = (await http.get(f"{fake.url}/v2/{endpoint}/stream/{job}")).json()
        assert again["stream"] == []  # drained
        status = (await http.get(f"{fake.url}/v2/{endpoint}/status/{job}")).json()
        assert status["output"] == [{"step": 1}, {"blob": "x" * 3000}]  # return value ignored
