"""The fake RunPod keeps RunPod's documented behaviour (https://docs.runpod.io), with the
worker under the runpod SDK's own production loop (small handler scripts here, the real worker in
test_service.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from devstack.fake_runpod import FakeRunPod

KEY = "fake-test-key-0123456789"
ENDPOINT_BODY = {
    "name": "e",
    "type": "QUEUE",
    "templateId": "influence-template",
    "gpu": {"pools": ["AMPERE_80"]},
    "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield client


def sdk_worker(tmp_path: Path, body: str, aggregate: bool = True) -> Path:
    """A handler script started the way the worker image starts ours."""
    path = tmp_path / "handler.py"
    path.write_text(
        "import asyncio, runpod\n"
        f"{body}\n"
        f"runpod.serverless.start({{'handler': handler, 'return_aggregate_stream': {aggregate}}})\n"
    )
    return path


async def _submit(http: httpx.AsyncClient, fake: FakeRunPod, job_input: object) -> tuple[str, str]:
    endpoint = (await http.post(f"{fake.url}/v2/serverless", json=ENDPOINT_BODY)).json()["id"]
    job = (await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": job_input})).json()
    assert job["status"] == "IN_QUEUE"
    return endpoint, job["id"]


async def _finish(http: httpx.AsyncClient, fake: FakeRunPod, endpoint: str, job: str) -> dict:
    """Poll /stream (as a client would) until the job is terminal; the status and all chunks."""
    chunks: list = []
    async with asyncio.timeout(120):
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
        fake.graphql_enabled = False
        retired = await http.post(f"{fake.url}/graphql", json={"query": "query { myself { id } }"})
        assert retired.status_code == 410

        without_gpu = {k: v for k, v in ENDPOINT_BODY.items() if k != "gpu"}
        neither = await http.post(f"{fake.url}/v2/serverless", json=without_gpu)
        assert neither.status_code == 400
        unknown = await http.post(f"{fake.url}/v2/serverless", json={**ENDPOINT_BODY, "templateId": "x"})
        assert unknown.status_code == 404
        created = await http.post(f"{fake.url}/v2/serverless", json=ENDPOINT_BODY)
        assert created.status_code == 201
        body = created.json()
        # API-create defaults differ from the console's: 5 min timeout, FlashBoot off, 3 workers.
        assert (body["timeout"], body["flashboot"], body["workers"]["max"]) == (300000, "OFF", 3)
        assert body["requestUrls"]["run"] == f"{fake.url}/v2/{body['id']}/run"
        assert "templateId" not in body  # the Endpoint object does not carry it
        deleted = await http.delete(f"{fake.url}/v2/serverless/{body['id']}")
        assert deleted.status_code == 204
        assert (await http.get(f"{fake.url}/v2/serverless/{body['id']}")).status_code == 404

        fake.fail_next("serverless.list", 429, retry_after=7)
        limited = await http.get(f"{fake.url}/v2/serverless")
        assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
        assert (await http.get(f"{fake.url}/v2/serverless")).status_code == 200
        assert [r.status for r in fake.calls("serverless.list")] == [401, 429, 200]


async def test_yields_stream_drain_split_and_aggregate_without_the_return_value(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    handler = sdk_worker(
        tmp_path,
        (
            "def handler(job):\n"
            "    yield {'step': 1}\n"
            "    yield {'blob': 'x' * 3000}\n"
            "    return 'never delivered'\n"
        ),
    )
    async with FakeRunPod({KEY: 10}, handler_path=handler, max_chunk_bytes=1024) as fake:
        endpoint, job = await _submit(http, fake, {})
        finished = await _finish(http, fake, endpoint, job)
        assert finished["status"] == "COMPLETED"
        first, *pieces = finished["chunks"]
        assert first == {"step": 1} and len(pieces) > 1
        assert json.loads("".join(pieces)) == {"blob": "x" * 3000}
        again = (await http.get(f"{fake.url}/v2/{endpoint}/stream/{job}")).json()
        assert again["stream"] == []  # drained
        status = (await http.get(f"{fake.url}/v2/{endpoint}/status/{job}")).json()
        assert status["output"] == [{"step": 1}, {"blob": "x" * 3000}]
        # What the SDK called, in its own URL shapes.
        (take, *_) = [c for c in fake.calls("worker.take") if c.status == 200]
        assert "job_in_progress=0" in take.query and "gpu=" in take.query
        streamed = fake.calls("worker.stream")
        assert len(streamed) == 2 and all("isStream=false" in c.query for c in streamed)
        (done,) = fake.calls("worker.done")
        assert done.path == f"/job-done/{fake.workers()[0].id}/{job}" and "isStream=true" in done.query

        fake.retention_s = 0.0  # results are kept for a limited time, then 404
        assert (await http.get(f"{fake.url}/v2/{endpoint}/status/{job}")).status_code == 404


async def test_aggregate_off_leaves_the_results_only_in_the_stream(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    handler = sdk_worker(tmp_path, "def handler(job):\n    yield {'step': 1}\n", aggregate=False)
    async with FakeRunPod({KEY: 10}, handler_path=handler) as fake:
        endpoint, job = await _submit(http, fake, {})
        assert (await _finish(http, fake, endpoint, job))["chunks"] == [{"step": 1}]
        assert (await http.get(f"{fake.url}/v2/{endpoint}/status/{job}")).json()["output"] == []


async def test_generator_errors_in_the_sdks_shapes(http: httpx.AsyncClient, tmp_path: Path) -> None:
    handler = sdk_worker(
        tmp_path,
        (
            "def handler(job):\n"
            "    yield {'step': 1}\n"
            "    if job['input'].get('yield_error'):\n"
            "        yield {'error': 'plain words'}\n"
            "    raise ValueError('boom')\n"
        ),
    )
    async with FakeRunPod({KEY: 10}, handler_path=handler) as fake:
        endpoint, raised = await _submit(http, fake, {})
        assert (await _finish(http, fake, endpoint, raised)) == {"status": "FAILED", "chunks": [{"step": 1}]}
        error = (await http.get(f"{fake.url}/v2/{endpoint}/status/{raised}")).json()["error"]
        assert error.startswith("handler: boom \ntraceback: Traceback (most recent call last)")
        assert "ValueError: boom" in error

        run = await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": {"yield_error": 1}})
        yielded = run.json()
        finished = await _finish(http, fake, endpoint, yielded["id"])
        assert finished == {"status": "FAILED", "chunks": [{"step": 1}]}  # the error is not streamed
        status = (await http.get(f"{fake.url}/v2/{endpoint}/status/{yielded['id']}")).json()
        assert status["error"] == "plain words" and "output" not in status
        assert len(fake.workers()) == 1  # one warm worker took both jobs


async def test_an_endpoint_scales_to_its_workers_max_after_the_queue_delay(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Three jobs on an endpoint of at most 2 workers (QUEUE_DELAY 0.5 s): the first worker starts
    at once, a second once a job has waited 0.5 s with no free worker, never a third; the first
    two jobs run at once on the two, the third on whichever is free first."""
    handler = sdk_worker(
        tmp_path, "async def handler(job):\n    await asyncio.sleep(3)\n    yield {'done': 1}\n"
    )
    async with FakeRunPod({KEY: 10}, handler_path=handler, worker_poll_s=1.0) as fake:
        body = {
            **ENDPOINT_BODY,
            "workers": {"min": 0, "max": 2},
            "scaling": {"type": "QUEUE_DELAY", "queueDelay": 0.5},
        }
        endpoint = (await http.post(f"{fake.url}/v2/serverless", json=body)).json()["id"]
        jobs = [
            (await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": {"n": n}})).json()["id"]
            for n in range(3)
        ]
        await asyncio.sleep(2.5)
        summary = (await http.get(f"{fake.url}/v2/serverless/{endpoint}/workers")).json()["summary"]
        assert summary["total"] == 2
        for job in jobs:
            assert (await _finish(http, fake, endpoint, job))["status"] == "COMPLETED"
        assert len(fake.workers()) == 2
        ran = sorted((fake.jobs_by_id[job] for job in jobs), key=lambda j: j.started_at or 0)
        first, second, third = ran
        assert first.worker_id != second.worker_id
        assert second.started_at is not None and first.finished_at is not None
        assert second.started_at < first.finished_at  # the two ran at once
        assert third.started_at is not None and third.started_at >= min(
            first.finished_at, second.finished_at or 0
        )


async def test_output_over_the_payload_limit_completes_without_output(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    handler = sdk_worker(tmp_path, "def handler(job):\n    yield 'x' * 5000\n")
    async with FakeRunPod({KEY: 10}, handler_path=handler, max_payload_bytes=4096) as fake:
        endpoint, job = await _submit(http, fake, {})
        assert (await _finish(http, fake, endpoint, job))["status"] == "COMPLETED"
        status = (await http.get(f"{fake.url}/v2/{endpoint}/status/{job}")).json()
        assert "output" not in status  # runpod-python #309: the upload failed, only logged
        assert {c.status for c in fake.calls("worker.done")} == {400}
        assert "Failed to return job results" in fake.worker_log(endpoint)


async def test_cancel_reaches_a_running_handler_through_the_stop_channel(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    marker = tmp_path / "stopped"
    handler = sdk_worker(
        tmp_path,
        (
            "async def handler(job):\n"
            "    yield {'step': 1}\n"
            "    try:\n"
            "        await asyncio.sleep(600)\n"
            "    except asyncio.CancelledError:\n"
            f"        open({str(marker)!r}, 'w').write('stopped')\n"
            "        raise\n"
        ),
    )
    async with FakeRunPod({KEY: 10}, handler_path=handler, worker_poll_s=1.0) as fake:
        endpoint, job = await _submit(http, fake, {})
        async with asyncio.timeout(60):
            while not fake.calls("worker.stream"):
                await asyncio.sleep(0.1)
        cancelled = (await http.post(f"{fake.url}/v2/{endpoint}/cancel/{job}")).json()
        assert cancelled == {"id": job, "status": "CANCELLED"}
        async with asyncio.timeout(30):
            while not marker.exists():
                await asyncio.sleep(0.1)
        assert fake.calls("worker.done") == []  # a stopped job posts nothing
        assert (await http.get(f"{fake.url}/v2/{endpoint}/status/{job}")).json()["status"] == "CANCELLED"


async def test_controls_lose_the_answer_of_an_accepted_run(http: httpx.AsyncClient) -> None:
    """``/_fake/faults`` with ``after_accept``: the job is created (and would run), then the
    answer is a 5xx or comes after the client gave up; ``/_fake/jobs`` counts what was created."""
    async with FakeRunPod({KEY: 10.0}) as fake:
        await http.post(f"{fake.url}/_fake/mode", json={"throttled": True})  # no worker: jobs stay queued
        endpoint = (await http.post(f"{fake.url}/v2/serverless", json=ENDPOINT_BODY)).json()["id"]
        await http.post(f"{fake.url}/_fake/faults", json={"after_accept": True, "status": 503})
        failed = await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": {"n": 1}})
        assert failed.status_code == 503
        await http.post(f"{fake.url}/_fake/faults", json={"after_accept": True, "hang_s": 1.5})
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": {"n": 2}}, timeout=0.5)
        answered = await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": {"n": 3}})
        assert answered.status_code == 200
        jobs = (await http.get(f"{fake.url}/_fake/jobs")).json()
        assert len(jobs["accepted_runs"]) == 3 and answered.json()["id"] == jobs["accepted_runs"][-1]
        assert set(jobs["jobs"].values()) == {"IN_QUEUE"}
        assert [fake.job(job_id).input["n"] for job_id in jobs["accepted_runs"]] == [1, 2, 3]
        mode = await http.post(f"{fake.url}/_fake/mode", json={"retention_s": 2})
        assert mode.json()["retention_s"] == 2


async def test_a_finished_job_posts_its_status_to_its_webhook_retried_until_a_200(
    http: httpx.AsyncClient,
) -> None:
    """RunPod posts the /status body to /run's ``webhook`` when the job finishes, and tries again
    (up to 2 more times) while the answer is not a 200."""
    received: list[bytes] = []

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
        received.append(await reader.readexactly(length))
        status = b"500 Internal Server Error" if len(received) == 1 else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receiver, "127.0.0.1", 0)
    hook = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook/secret"
    async with server, FakeRunPod({KEY: 10.0}) as fake:
        fake.webhook_retry_s = 0.05
        await http.post(f"{fake.url}/_fake/mode", json={"throttled": True})  # it stays queued
        endpoint = (await http.post(f"{fake.url}/v2/serverless", json=ENDPOINT_BODY)).json()["id"]
        job = (await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": {}, "webhook": hook})).json()
        assert not received  # nothing while it waits
        await http.post(f"{fake.url}/v2/{endpoint}/cancel/{job['id']}")
        async with asyncio.timeout(10):
            while len(fake.webhook_posts) < 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert fake.webhook_posts == [(job["id"], 500), (job["id"], 200)]  # no third post after a 200
        assert [json.loads(body)["status"] for body in received] == ["CANCELLED", "CANCELLED"]
        assert json.loads(received[0])["id"] == job["id"]
        bad = await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": {}, "webhook": 5})
        assert bad.status_code == 400
