"""The fake RunPod's records (accounts, jobs, workers, endpoints), its limits, and the error
answers every route shares."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

MAX_CHUNK_BYTES = 1024 * 1024  # /stream: one chunk
MAX_RUN_PAYLOAD_BYTES = 10 * 1000 * 1000  # /run: the input, and the job's final output
DEFAULT_RETENTION_S = 30 * 60
# An account's workers across all its endpoints, by balance (docs: serverless/workers/overview.mdx):
# 5, then this many from each balance up.
WORKER_QUOTA_BY_BALANCE = ((900.0, 60), (700.0, 50), (500.0, 40), (300.0, 30), (200.0, 20), (100.0, 10))
DEFAULT_WORKER_QUOTA = 5
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
# Job-API limits per user per endpoint (send-requests.mdx): requests per window of seconds.
JOB_RATE_LIMITS: dict[str, tuple[int, float]] = {
    "job.run": (1000, 10.0),
    "job.status": (2000, 10.0),
    "job.stream": (2000, 10.0),
    "job.cancel": (100, 10.0),
}
ROUTES = (
    "graphql",
    "serverless.list",
    "serverless.create",
    "serverless.get",
    "serverless.delete",
    "serverless.workers",
    "serverless.update",
    "templates.get",
    "job.run",
    "job.status",
    "job.stream",
    "job.cancel",
    "job.health",
    "worker.take",
    "worker.stream",
    "worker.done",
    "worker.stop",
    "worker.ping",
)


@dataclass
class FakeAccount:
    key: str
    balance: float = 100.0
    scope: str = "all"  # "all" | "restricted": a restricted key may run jobs, not manage
    account_id: str = field(default_factory=lambda: f"user_{uuid.uuid4().hex[:10]}")


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    route: str = ""
    status: int = 0


@dataclass
class Fault:
    status: int
    remaining: int
    retry_after: float | None


@dataclass
class AcceptedFault:
    """A /run that creates its job, then answers ``status`` or holds its answer ``hang_s``."""

    status: int
    hang_s: float
    remaining: int


@dataclass
class FakeJob:
    id: str
    endpoint_id: str
    input: Any
    execution_timeout_s: float
    expires_at: float  # policy.ttl, counted from submission
    status: str = "IN_QUEUE"
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str = ""
    # The GPU pool the job ran on: RunPod assigns any pool the endpoint lists that has a free GPU;
    # here every pool has one, so the first listed (the dashboard lists them cheapest first).
    gpu_pool: str = ""
    pending: list[Any] = field(default_factory=list)  # chunks not yet drained by /stream
    output: Any = None
    error: str | None = None
    progress: Any = None  # the last progress_update while IN_PROGRESS
    webhook: str = ""  # /run's "webhook": posted the /status body when the job finishes


@dataclass
class FakeWorker:
    """One worker: the real handler under the SDK's loop, in its own process group."""

    id: str
    endpoint_id: str
    secret: str
    process: subprocess.Popen[bytes]
    log_path: Path
    release: int = 0  # the endpoint's container release it runs
    took_first_job: bool = False
    last_ping: float | None = None
    to_stop: set[str] = field(default_factory=set)


@dataclass
class EndpointState:
    config: dict[str, Any]
    owner: str
    queue: deque[str] = field(default_factory=deque)
    workers: list[FakeWorker] = field(default_factory=list)  # up to ``workers.max``, oldest first
    release: int = 0  # bumped by a PATCH that changes the container (image, env, args)
    deleted: bool = False


class Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def public_endpoint(config: dict[str, Any]) -> dict[str, Any]:
    """The Endpoint object as REST v2 returns it: the template is resolved at create time and
    not part of it."""
    return {k: v for k, v in config.items() if k != "templateId"}


def problem(
    status: int, detail: str, headers: dict[str, str] | None = None, errors: list[str] | None = None
) -> JSONResponse:
    titles = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden",
        404: "Not Found",
        422: "Unprocessable Entity",
        429: "Too Many Requests",
    }
    body: dict[str, Any] = {"title": titles.get(status, "Error"), "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        raise Refused(problem(400, "the body is not JSON")) from None
