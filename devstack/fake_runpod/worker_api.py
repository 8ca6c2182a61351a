"""What the runpod SDK's worker loop calls (``/job-take``, ``/job-stream``, ``/job-done``,
``/job-stop``, ``/ping``), at the URLs of its ``RUNPOD_WEBHOOK_*`` variables."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

if TYPE_CHECKING:
    from devstack.fake_runpod.fake import FakeRunPod


def add_worker_routes(app: FastAPI, fake: FakeRunPod) -> None:
    """What the SDK's worker loop calls (URLs from the RUNPOD_WEBHOOK_* variables)."""

    @app.get("/job-take/{worker_id}")
    async def take(request: Request, worker_id: str) -> Response:
        worker = fake.calling_worker(request, "worker.take", worker_id)
        endpoint = fake.endpoint_states[worker.endpoint_id]
        deadline = time.monotonic() + fake.worker_poll_s
        while not fake.stopping and not endpoint.deleted and time.monotonic() < deadline:
            job = fake.next_job(endpoint) if not fake.throttled else None
            if job is not None:
                job.status, job.started_at, job.worker_id = "IN_PROGRESS", time.monotonic(), worker.id
                pools = (endpoint.config.get("gpu") or {}).get("pools") or [""]
                job.gpu_pool = str(pools[0])
                worker.took_first_job = True
                return JSONResponse({"id": job.id, "input": job.input})
            await asyncio.sleep(0.05)
        return Response(status_code=204)

    @app.post("/job-stream/{worker_id}/{job_id}")
    async def stream(request: Request, worker_id: str, job_id: str) -> Response:
        fake.calling_worker(request, "worker.stream", worker_id)
        # The SDK labels the body form-urlencoded; it is JSON.
        body = json.loads(await request.body() or b"null")
        job = fake.jobs_by_id.get(job_id)
        if job is not None and job.status == "IN_PROGRESS" and isinstance(body, dict):
            job.pending.extend(fake.split_output(body.get("output")))
        return JSONResponse({})

    @app.post("/job-done/{worker_id}/{job_id}")
    async def done(request: Request, worker_id: str, job_id: str) -> Response:
        fake.calling_worker(request, "worker.done", worker_id)
        raw = await request.body()
        job = fake.jobs_by_id.get(job_id)
        if len(raw) > fake.max_payload_bytes:
            # The upload fails and the client sees COMPLETED without output (#309).
            if job is not None and job.status == "IN_PROGRESS":
                fake.finish(job, "COMPLETED")
            return JSONResponse({"error": "payload too large"}, status_code=400)
        body = json.loads(raw or b"null")
        if job is None or job.status != "IN_PROGRESS" or not isinstance(body, dict):
            return JSONResponse({})
        if body.get("status") == "IN_PROGRESS":  # runpod.serverless.progress_update
            job.progress = body.get("output")
        elif body.get("error"):
            fake.finish(job, "FAILED", error=str(body["error"]))
        else:
            fake.finish(job, "COMPLETED", output=body.get("output"))
        return JSONResponse({})

    @app.get("/job-stop/{worker_id}")
    async def stop(request: Request, worker_id: str) -> Response:
        worker = fake.calling_worker(request, "worker.stop", worker_id)
        deadline = time.monotonic() + fake.worker_poll_s
        while not fake.stopping and time.monotonic() < deadline:
            if worker.to_stop:
                jobs, worker.to_stop = sorted(worker.to_stop), set()
                return JSONResponse({"jobsToStop": jobs})
            await asyncio.sleep(0.05)
        return Response(status_code=204)

    @app.get("/ping/{worker_id}")
    async def ping(request: Request, worker_id: str) -> Response:
        fake.calling_worker(request, "worker.ping", worker_id).last_ping = time.monotonic()
        return JSONResponse({})
