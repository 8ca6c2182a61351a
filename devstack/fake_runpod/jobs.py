"""The serverless job API (``/v2/{endpoint}/run|status|stream|cancel|health``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from devstack.fake_runpod.state import TERMINAL, FakeJob, json_body

if TYPE_CHECKING:
    from devstack.fake_runpod.fake import FakeRunPod


def add_job_routes(app: FastAPI, fake: FakeRunPod) -> None:
    """The job API (api.runpod.ai/v2/{endpoint}/...)."""

    @app.post("/v2/{endpoint_id}/run")
    async def run(request: Request, endpoint_id: str) -> Response:
        account = fake.gate(request, "job.run", endpoint_id=endpoint_id)
        endpoint = fake.own_endpoint(account, endpoint_id, job_api=True)
        raw = await request.body()
        if len(raw) > fake.max_payload_bytes:
            return JSONResponse(
                {
                    "error": f"request body of {len(raw)} bytes exceeds the /run limit of "
                    f"{fake.max_payload_bytes} bytes"
                },
                status_code=400,
            )
        body = await json_body(request)
        if not isinstance(body, dict) or "input" not in body:
            return JSONResponse({"error": "input is required"}, status_code=400)
        webhook = body.get("webhook", "")
        if not isinstance(webhook, str):
            return JSONResponse({"error": "webhook must be a URL"}, status_code=400)
        policy = body.get("policy") or {}
        timeout_ms = policy.get("executionTimeout") or endpoint.config.get("timeout") or 600000
        ttl_ms = policy.get("ttl") or 24 * 3600 * 1000
        job = FakeJob(
            id=f"{uuid.uuid4()}-u1",
            endpoint_id=endpoint_id,
            input=body["input"],
            execution_timeout_s=float(timeout_ms) / 1000,
            expires_at=time.monotonic() + float(ttl_ms) / 1000,
            webhook=webhook,
        )
        fake.jobs_by_id[job.id] = job
        endpoint.queue.append(job.id)
        fake.accepted_runs.append(job.id)
        fault = fake.accepted_fault()
        if fault is not None and fault.hang_s:
            await asyncio.sleep(fault.hang_s)
        if fault is not None and fault.status:
            return JSONResponse(
                {"error": "injected fault after the job was accepted"}, status_code=fault.status
            )
        return JSONResponse({"id": job.id, "status": "IN_QUEUE"})

    @app.get("/v2/{endpoint_id}/status/{job_id}")
    async def status(request: Request, endpoint_id: str, job_id: str) -> Response:
        account = fake.gate(request, "job.status", endpoint_id=endpoint_id)
        fake.own_endpoint(account, endpoint_id, job_api=True)
        return JSONResponse(status_body(fake.live_job(endpoint_id, job_id)))

    @app.get("/v2/{endpoint_id}/stream/{job_id}")
    async def stream(request: Request, endpoint_id: str, job_id: str) -> Response:
        account = fake.gate(request, "job.stream", endpoint_id=endpoint_id)
        fake.own_endpoint(account, endpoint_id, job_api=True)
        wait_s = fake.stream_wait_s
        if "wait" in request.query_params:
            wait_s = min(max(int(request.query_params["wait"]), 1000), 300000) / 1000
        deadline = time.monotonic() + wait_s
        while True:
            job = fake.live_job(endpoint_id, job_id)
            if job.pending or job.status in TERMINAL or time.monotonic() >= deadline:
                chunks, job.pending = job.pending, []
                return JSONResponse({"status": job.status, "stream": [{"output": c} for c in chunks]})
            await asyncio.sleep(0.05)

    @app.post("/v2/{endpoint_id}/cancel/{job_id}")
    async def cancel(request: Request, endpoint_id: str, job_id: str) -> Response:
        account = fake.gate(request, "job.cancel", endpoint_id=endpoint_id)
        endpoint = fake.own_endpoint(account, endpoint_id, job_api=True)
        job = fake.live_job(endpoint_id, job_id)
        if job.status == "IN_QUEUE" and job.id in endpoint.queue:
            endpoint.queue.remove(job.id)
        if job.status == "IN_PROGRESS":
            fake.stop_on_worker(job)
        if job.status not in TERMINAL:
            fake.finish(job, "CANCELLED")
        return JSONResponse({"id": job.id, "status": job.status})

    @app.get("/v2/{endpoint_id}/health")
    async def health(request: Request, endpoint_id: str) -> Response:
        account = fake.gate(request, "job.health")
        endpoint = fake.own_endpoint(account, endpoint_id, job_api=True)
        jobs = [j for j in fake.jobs_by_id.values() if j.endpoint_id == endpoint_id]
        counts = {
            s: sum(j.status == s for j in jobs) for s in ("COMPLETED", "FAILED", "IN_PROGRESS", "IN_QUEUE")
        }
        return JSONResponse(
            {
                "jobs": {
                    "completed": counts["COMPLETED"],
                    "failed": counts["FAILED"],
                    "inProgress": counts["IN_PROGRESS"],
                    "inQueue": counts["IN_QUEUE"],
                    "retried": 0,
                },
                "workers": {
                    "idle": sum(not fake.busy(worker) for worker in endpoint.workers),
                    "running": sum(fake.busy(worker) for worker in endpoint.workers),
                },
            }
        )


def status_body(job: FakeJob) -> dict[str, Any]:
    now = time.monotonic()
    started = job.started_at or now
    body: dict[str, Any] = {
        "id": job.id,
        "status": job.status,
        "delayTime": int((started - job.submitted_at) * 1000),
    }
    if job.started_at is not None:
        body["executionTime"] = int(((job.finished_at or now) - job.started_at) * 1000)
        body["workerId"] = job.worker_id
    if job.status == "IN_PROGRESS" and job.progress is not None:
        body["output"] = job.progress
    if job.status == "COMPLETED" and job.output is not None:
        body["output"] = job.output
    if job.error is not None:
        body["error"] = job.error
    return body
