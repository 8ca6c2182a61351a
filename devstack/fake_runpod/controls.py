"""The controls of a fake running as its own process (``/_fake/``: keys, faults, mode, templates,
requests, endpoints), for tests in other processes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from devstack.fake_runpod.state import json_body

if TYPE_CHECKING:
    from devstack.fake_runpod.fake import FakeRunPod


def add_control_routes(app: FastAPI, fake: FakeRunPod) -> None:
    """The controls of a fake running as its own process (tests in other processes)."""

    @app.post("/_fake/keys")
    async def add_key(request: Request) -> Response:
        body = await json_body(request)
        account = fake.add_key(
            str(body["key"]), float(body.get("balance", 100.0)), str(body.get("scope", "all"))
        )
        return JSONResponse({"account_id": account.account_id})

    @app.post("/_fake/faults")
    async def fault(request: Request) -> Response:
        body = await json_body(request)
        if body.get("after_accept"):
            fake.fail_after_accept(
                int(body.get("status", 0)), float(body.get("hang_s", 0.0)), int(body.get("times", 1))
            )
            return JSONResponse({"ok": True})
        fake.fail_next(
            str(body["route"]), int(body["status"]), int(body.get("times", 1)), body.get("retry_after")
        )
        return JSONResponse({"ok": True})

    @app.post("/_fake/mode")
    async def mode(request: Request) -> Response:
        body = await json_body(request)
        if "throttled" in body:
            fake.set_throttled(bool(body["throttled"]))
        if "execution_timeout_s" in body:
            fake.execution_timeout_s = body["execution_timeout_s"]
        if "retention_s" in body:
            fake.retention_s = float(body["retention_s"])
        if "graphql" in body:
            fake.graphql_enabled = bool(body["graphql"])
        if "max_payload_bytes" in body:
            fake.max_payload_bytes = int(body["max_payload_bytes"])
        if "webhook_retry_s" in body:
            fake.webhook_retry_s = float(body["webhook_retry_s"])
        return JSONResponse(
            {
                "throttled": fake.throttled,
                "execution_timeout_s": fake.execution_timeout_s,
                "retention_s": fake.retention_s,
                "graphql": fake.graphql_enabled,
                "max_payload_bytes": fake.max_payload_bytes,
                "webhook_retry_s": fake.webhook_retry_s,
            }
        )

    @app.post("/_fake/templates")
    async def add_template(request: Request) -> Response:
        body = await json_body(request)
        fake.add_template(str(body["id"]), str(body.get("image", "")), body.get("env"))
        return JSONResponse(fake.templates[str(body["id"])])

    @app.get("/_fake/jobs")
    async def jobs() -> Response:
        return JSONResponse(
            {
                "accepted_runs": fake.accepted_runs,
                "jobs": {job_id: job.status for job_id, job in fake.jobs_by_id.items()},
                # The GPU pool each job a worker took ran on.
                "gpu_pools": {
                    job_id: job.gpu_pool for job_id, job in fake.jobs_by_id.items() if job.gpu_pool
                },
                # Every webhook post: [RunPod job id, the HTTP status answered, 0 for no answer].
                "webhook_posts": fake.webhook_posts,
                # Who ran each job a worker took, and when (the fake's monotonic clock, seconds).
                "runs": {
                    job_id: {
                        "worker_id": job.worker_id,
                        "started_at": job.started_at,
                        "finished_at": job.finished_at,
                    }
                    for job_id, job in fake.jobs_by_id.items()
                    if job.started_at is not None
                },
            }
        )

    @app.get("/_fake/jobs/{job_id}/input")
    async def job_input(job_id: str) -> Response:
        """The input a job's worker took, as RunPod holds it (tests check what reached the worker)."""
        job = fake.jobs_by_id.get(job_id)
        if job is None:
            return JSONResponse({"detail": f"no job {job_id}"}, status_code=404)
        return JSONResponse({"input": job.input})

    @app.get("/_fake/requests")
    async def requests() -> Response:
        return JSONResponse({"requests": [r.__dict__ for r in fake.requests]})

    @app.get("/_fake/endpoints")
    async def endpoints() -> Response:
        return JSONResponse({"endpoints": fake.endpoints()})

    @app.delete("/_fake/endpoints/{endpoint_id}")
    async def console_delete(endpoint_id: str) -> Response:
        fake.delete_endpoint(endpoint_id)
        return Response(status_code=204)
