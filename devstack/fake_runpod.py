"""A fake RunPod for tests and the local stack, written from shared/reference/runpod.md.

One HTTP server plays every RunPod host (point every base URL at it): REST v2
(``/v2/serverless``...), the job API (``/v2/{endpoint}/run|status|stream|cancel|health``),
GraphQL (``/graphql``, ``myself`` only) and the worker-side routes that the runpod SDK's
production worker loop calls (``/job-take``, ``/job-stream``, ``/job-done``, ``/job-stop``,
``/ping``).

The worker is the real one: the first job of an endpoint starts
services/compute-runpod/worker/handler.py as a subprocess (a cold start) with the
``RUNPOD_WEBHOOK_*`` variables pointing here, so ``runpod.serverless.start`` runs its own job
loop, iterates the handler, posts each yield, the final output (aggregate or not), errors in the
SDK's own shapes, and honours stop signals exactly as on RunPod. The worker stays up for the
endpoint's next jobs (as a warm worker does) until the endpoint is deleted or the fake stops.
The ``/run``, ``/stream``, ``/status`` and ``/cancel`` answers are built from what the SDK
posted.

What the fake keeps from RunPod's servers: Bearer auth (401 unknown key; 403 for a restricted key
on GraphQL and endpoint management), API-create defaults, the Endpoint object without
``templateId``, PATCH as a partial update whose container changes (image, env, args) roll out as
workers cycle, templates (``GET /v2/templates/{id}``), queueing (``IN_QUEUE`` until a worker
takes the job), ``/stream`` draining (each poll returns only new chunks, long-polling briefly
when empty) with chunks over 1 MB split,
results kept ``retention_s`` after completion then 404, ``policy.ttl`` and
``policy.executionTimeout`` (``TIMED_OUT``, and the worker is told to stop the job), cancel
(``CANCELLED``; a running job gets a stop signal), the job API's rate limits per key, endpoint
and route (429), the payload limits (``/run`` input and a job's final output at 10 MB: a larger
job-done upload is refused with 400 and the job shows ``COMPLETED`` without output, as
runpod-python #309 reports), no GPU (``throttled``: no worker starts or takes a job, jobs stay
``IN_QUEUE``, the workers summary says throttled).

Injectable faults (``fail_next``): any status (401/403/429 with Retry-After/5xx) for the next N
calls of a route; ``graphql_enabled = False`` (GraphQL retired: 410); ``execution_timeout_s``
(forced); per-key balance. Every request is recorded (method, path, query, headers, status) in
``requests``.

In-process: ``async with FakeRunPod(keys={"rpa_...": 25.0}) as fake: fake.url``.
As a process: ``python -m devstack.fake_runpod --key rpa_x=25``; it prints ``FAKE_RUNPOD_URL=...``
and offers the same controls over HTTP under ``/_fake/`` (keys, faults, mode, requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

WORKER_HANDLER = (
    Path(__file__).resolve().parents[1] / "services" / "compute-runpod" / "worker" / "handler.py"
)
MAX_CHUNK_BYTES = 1024 * 1024  # /stream: one chunk
MAX_RUN_PAYLOAD_BYTES = 10 * 1000 * 1000  # /run: the input, and the job's final output
DEFAULT_RETENTION_S = 30 * 60
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
# Job-API limits per user per endpoint (send-requests.mdx): requests per window of seconds.
JOB_RATE_LIMITS: dict[str, tuple[int, float]] = {
    "job.run": (1000, 10.0), "job.status": (2000, 10.0), "job.stream": (2000, 10.0),
    "job.cancel": (100, 10.0),
}
ROUTES = (
    "graphql", "serverless.list", "serverless.create", "serverless.get", "serverless.delete",
    "serverless.workers", "serverless.update", "templates.get",
    "job.run", "job.status", "job.stream", "job.cancel", "job.health",
    "worker.take", "worker.stream", "worker.done", "worker.stop", "worker.ping",
)
WORKER_GPU = "NVIDIA A100 80GB PCIe"
# Runs the handler script as the worker image does (``python handler.py``), first asking Linux to
# kill it when the fake's process dies however it dies, and its forks (the SDK's heartbeat) when
# it dies: the SDK's loops would otherwise retry a vanished server forever. (Not a preexec_fn:
# forking with threads running is not safe.)
_WORKER_LAUNCHER = (
    "import ctypes, os, runpy, signal, sys\n"
    "if sys.platform == 'linux':\n"
    "    def die_with_parent(): ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "    die_with_parent()\n"
    "    os.register_at_fork(after_in_child=die_with_parent)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
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
class _Fault:
    status: int
    remaining: int
    retry_after: float | None


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
    pending: list[Any] = field(default_factory=list)  # chunks not yet drained by /stream
    output: Any = None
    error: str | None = None
    progress: Any = None  # the last progress_update while IN_PROGRESS


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
class _Endpoint:
    config: dict[str, Any]
    owner: str
    queue: deque[str] = field(default_factory=deque)
    worker: FakeWorker | None = None
    release: int = 0  # bumped by a PATCH that changes the container (image, env, args)
    deleted: bool = False


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class FakeRunPod:
    def __init__(
        self,
        keys: dict[str, float] | None = None,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        stream_wait_s: float = 10.0,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        max_payload_bytes: int = MAX_RUN_PAYLOAD_BYTES,
        template_ids: set[str] | None = None,
        handler_path: Path = WORKER_HANDLER,
        worker_env: dict[str, str] | None = None,
        worker_poll_s: float = 5.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.accounts: dict[str, FakeAccount] = {}
        for key, balance in (keys or {}).items():
            self.add_key(key, balance)
        self.retention_s = retention_s
        self.stream_wait_s = stream_wait_s
        self.max_chunk_bytes = max_chunk_bytes
        self.max_payload_bytes = max_payload_bytes
        self.templates: dict[str, dict[str, Any]] = {}
        for template_id in template_ids if template_ids is not None else {"influence-template"}:
            self.add_template(template_id)
        self.throttled = False
        self.graphql_enabled = True
        self.execution_timeout_s: float | None = None
        self.requests: list[RecordedRequest] = []
        self.worker_env = dict(worker_env or {})
        self.worker_poll_s = worker_poll_s
        self._handler_path = handler_path
        self._host, self._port = host, port
        self._faults: dict[str, deque[_Fault]] = {}
        self._calls: dict[tuple[str, str, str], deque[float]] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._workers: dict[str, FakeWorker] = {}
        self._jobs: dict[str, FakeJob] = {}
        self._log_dir = Path(tempfile.mkdtemp(prefix="fake-runpod-workers-"))
        self._stopping = False
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self.port = 0
        self.app = self._build_app()

    # ---- controls ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def settings_env(self) -> dict[str, str]:
        """The compute-runpod base-URL settings pointing at this fake."""
        return {
            "RUNPOD_REST_BASE_URL": f"{self.url}/v2",
            "RUNPOD_JOB_BASE_URL": f"{self.url}/v2",
            "RUNPOD_GRAPHQL_URL": f"{self.url}/graphql",
        }

    def add_key(self, key: str, balance: float = 100.0, scope: str = "all") -> FakeAccount:
        account = self.accounts.get(key) or FakeAccount(key=key)
        account.balance, account.scope = balance, scope
        self.accounts[key] = account
        return account

    def add_template(self, template_id: str, image: str = "", env: dict[str, str] | None = None) -> None:
        """A serverless template of the account (every one runs this fake's worker handler)."""
        self.templates[template_id] = {
            "id": template_id, "name": template_id, "serverless": True,
            "image": image or f"influence/worker:{template_id}", "env": dict(env or {}), "disk": 20,
        }

    def fail_next(
        self, route: str, status: int, times: int = 1, retry_after: float | None = None
    ) -> None:
        """Answer the next ``times`` calls of ``route`` (one of ``ROUTES``) with ``status``."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {', '.join(ROUTES)}")
        self._faults.setdefault(route, deque()).append(_Fault(status, times, retry_after))

    def set_throttled(self, throttled: bool) -> None:
        self.throttled = throttled

    def calls(self, route: str | None = None, method: str | None = None) -> list[RecordedRequest]:
        return [
            r for r in self.requests
            if (route is None or r.route == route) and (method is None or r.method == method)
        ]

    def endpoints(self) -> list[dict[str, Any]]:
        """Every live endpoint as stored, ``templateId`` included (the API hides it)."""
        return [dict(e.config) for e in self._endpoints.values() if not e.deleted]

    def delete_endpoint(self, endpoint_id: str) -> None:
        """What a user deleting the endpoint in RunPod's console does."""
        self._delete(endpoint_id)

    def job(self, job_id: str) -> FakeJob | None:
        return self._jobs.get(job_id)

    def workers(self) -> list[FakeWorker]:
        return list(self._workers.values())

    def worker_log(self, endpoint_id: str) -> str:
        """Everything the endpoint's workers printed (the SDK's log lines), for diagnosis."""
        return "\n".join(
            w.log_path.read_text(errors="replace") for w in self._workers.values()
            if w.endpoint_id == endpoint_id and w.log_path.exists()
        )

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> FakeRunPod:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        self._monitor = asyncio.create_task(self._watch())
        return self

    async def stop(self) -> None:
        self._stopping = True
        for worker in list(self._workers.values()):
            _kill(worker)
        if self._monitor is not None:
            self._monitor.cancel()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        await asyncio.to_thread(lambda: [w.process.wait() for w in self._workers.values()])
        shutil.rmtree(self._log_dir, ignore_errors=True)

    async def __aenter__(self) -> FakeRunPod:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the platform: workers, timeouts -------------------------------------------------

    def _start_worker(self, endpoint: _Endpoint) -> None:
        """A cold start: the worker image's command, with the webhook URLs of this fake."""
        worker_id = f"w{uuid.uuid4().hex[:12]}"
        secret = secrets.token_hex(16)
        base, query = self.url, f"gpu={WORKER_GPU.replace(' ', '+')}"
        env = {
            **os.environ,
            # The output limit as the worker image knows it (RunPod's, or this fake's lowered one).
            "INFLUENCE_OUTPUT_LIMIT_BYTES": str(int(self.max_payload_bytes * 0.95)),
            **self.worker_env,
            **{str(k): str(v) for k, v in (endpoint.config.get("env") or {}).items()},
            "PYTHONUNBUFFERED": "1",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_ENDPOINT_ID": endpoint.config["id"],
            "RUNPOD_AI_API_KEY": secret,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?{query}",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?{query}",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?{query}",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?{query}",
        }
        log_path = self._log_dir / f"{worker_id}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_LAUNCHER, str(self._handler_path)],
                cwd=self._handler_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = FakeWorker(worker_id, endpoint.config["id"], secret, process, log_path, endpoint.release)
        self._workers[worker_id] = worker
        endpoint.worker = worker

    async def _watch(self) -> None:
        """What RunPod does on its own: scale up, time out, notice crashed workers."""
        while not self._stopping:
            now = time.monotonic()
            for job in list(self._jobs.values()):
                if job.status == "IN_PROGRESS" and now - (job.started_at or now) > self._timeout_for(job):
                    self._finish(job, "TIMED_OUT")
                    self._stop_on_worker(job)
            for endpoint in self._endpoints.values():
                worker = endpoint.worker
                if worker is not None and worker.process.poll() is not None:
                    self._worker_died(endpoint, worker)
                elif worker is not None and worker.release < endpoint.release and not any(
                    j.worker_id == worker.id and j.status == "IN_PROGRESS" for j in self._jobs.values()
                ):
                    _kill(worker)  # the new release rolls out as workers cycle
                if endpoint.worker is None and endpoint.queue and not self.throttled and not endpoint.deleted:
                    self._start_worker(endpoint)
            await asyncio.sleep(0.1)

    def _worker_died(self, endpoint: _Endpoint, worker: FakeWorker) -> None:
        endpoint.worker = None
        for job in self._jobs.values():
            if job.worker_id == worker.id and job.status == "IN_PROGRESS":
                self._finish(job, "FAILED", error=f"worker exited with code {worker.process.returncode}")

    def _stop_on_worker(self, job: FakeJob) -> None:
        worker = self._workers.get(job.worker_id)
        if worker is not None:
            worker.to_stop.add(job.id)

    def _timeout_for(self, job: FakeJob) -> float:
        forced = self.execution_timeout_s
        return min(job.execution_timeout_s, forced) if forced is not None else job.execution_timeout_s

    def _finish(self, job: FakeJob, status: str, *, error: str | None = None, output: Any = None) -> None:
        job.status, job.finished_at, job.error, job.output = status, time.monotonic(), error, output
        job.progress = None

    def _split(self, output: Any) -> list[Any]:
        """RunPod caps a stream chunk at 1 MB and splits larger outputs into pieces."""
        text = json.dumps(output)
        if len(text.encode()) <= self.max_chunk_bytes:
            return [output]
        step = self.max_chunk_bytes // 4  # characters: up to 4 UTF-8 bytes each
        return [text[i:i + step] for i in range(0, len(text), step)]

    def _delete(self, endpoint_id: str) -> None:
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None:
            return
        endpoint.deleted = True
        for job in self._jobs.values():
            if job.endpoint_id == endpoint_id and job.status not in TERMINAL:
                self._finish(job, "CANCELLED")
        if endpoint.worker is not None:
            _kill(endpoint.worker)

    # ---- HTTP ----------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fake RunPod", docs_url=None, redoc_url=None, openapi_url=None)

        @app.middleware("http")
        async def record(request: Request, call_next: Callable[..., Any]) -> Response:
            entry = RecordedRequest(
                method=request.method, path=request.url.path, query=request.url.query,
                headers=dict(request.headers),
            )
            if not request.url.path.startswith("/_fake/"):
                self.requests.append(entry)
            request.state.record = entry
            response = await call_next(request)
            entry.status = response.status_code
            return response

        @app.exception_handler(_Refused)
        async def refused(_request: Request, exc: _Refused) -> Response:
            return exc.response

        self._graphql_routes(app)
        self._management_routes(app)
        self._job_routes(app)
        self._worker_routes(app)
        self._control_routes(app)
        return app

    def _graphql_routes(self, app: FastAPI) -> None:
        @app.post("/graphql")
        async def graphql(request: Request) -> Response:
            account = self._gate(request, "graphql", anonymous_ok=True)
            if not self.graphql_enabled:
                return JSONResponse(
                    {"errors": [{"message": "the GraphQL API has been retired; use REST v2"}]},
                    status_code=410,
                )
            body = await _json_body(request)
            query = str(body.get("query", "")) if isinstance(body, dict) else ""
            if "myself" not in query:
                return JSONResponse({"errors": [{"message": "the fake supports only myself"}]})
            if account is None:
                return JSONResponse({"data": {"myself": None}})
            return JSONResponse({"data": {"myself": {
                "id": account.account_id, "clientBalance": account.balance,
                "currentSpendPerHr": 0.0, "spendLimit": 80,
            }}})

    def _management_routes(self, app: FastAPI) -> None:
        """REST v2 serverless endpoints."""

        @app.get("/v2/serverless")
        async def list_endpoints(request: Request) -> Response:
            account = self._gate(request, "serverless.list", manage=True)
            own = [_public(e.config) for e in self._endpoints.values()
                   if e.owner == account.key and not e.deleted]
            return JSONResponse({"endpoints": own})

        @app.post("/v2/serverless")
        async def create_endpoint(request: Request) -> Response:
            account = self._gate(request, "serverless.create", manage=True)
            body = await _json_body(request)
            problem = self._validate_create(body)
            if problem is not None:
                return problem
            endpoint_id = uuid.uuid4().hex[:14]
            config = {
                "workers": {"min": 0, "max": 3, "idleTimeout": 10}, "timeout": 300000,
                "flashboot": "OFF", **body,
                "id": endpoint_id, "createdAt": datetime.now(UTC).isoformat(),
                "requestUrls": {
                    name: f"{self.url}/v2/{endpoint_id}/{path}" for name, path in (
                        ("run", "run"), ("runSync", "runsync"), ("status", "status"),
                        ("stream", "stream"), ("cancel", "cancel"), ("retry", "retry"),
                        ("purgeQueue", "purge-queue"), ("health", "health"),
                    )
                },
            }
            self._endpoints[endpoint_id] = _Endpoint(config=config, owner=account.key)
            return JSONResponse(_public(config), status_code=201)

        @app.get("/v2/serverless/{endpoint_id}")
        async def get_endpoint(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "serverless.get", manage=True)
            return JSONResponse(_public(self._own_endpoint(account, endpoint_id).config))

        @app.patch("/v2/serverless/{endpoint_id}")
        async def update_endpoint(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "serverless.update", manage=True)
            endpoint = self._own_endpoint(account, endpoint_id)
            body = await _json_body(request)
            fixed = {"id", "createdAt", "requestUrls", "templateId", "type"}
            if not isinstance(body, dict) or fixed & set(body):
                return _problem(422, f"a PATCH may not change {', '.join(sorted(fixed))}")
            if "gpu" in body and not (body["gpu"] or {}).get("pools"):
                return _problem(422, "gpu.pools must list at least one pool")
            if any(body.get(k) != endpoint.config.get(k) for k in ("image", "env", "args") if k in body):
                endpoint.release += 1
            endpoint.config.update(body)  # nested objects are replaced whole
            return JSONResponse(_public(endpoint.config))

        @app.get("/v2/templates/{template_id}")
        async def get_template(request: Request, template_id: str) -> Response:
            self._gate(request, "templates.get", manage=True)
            template = self.templates.get(template_id)
            if template is None:
                return _problem(404, f"template {template_id} not found")
            return JSONResponse(template)

        @app.delete("/v2/serverless/{endpoint_id}")
        async def delete_endpoint(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "serverless.delete", manage=True)
            self._own_endpoint(account, endpoint_id)
            self._delete(endpoint_id)
            return Response(status_code=204)

        @app.get("/v2/serverless/{endpoint_id}/workers")
        async def workers(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "serverless.workers", manage=True)
            endpoint = self._own_endpoint(account, endpoint_id)
            worker = endpoint.worker
            running = sum(
                j.status == "IN_PROGRESS" for j in self._jobs.values() if j.endpoint_id == endpoint_id
            )
            summary = {
                "running": min(running, 1),
                "idle": int(worker is not None and worker.took_first_job and not running),
                "initializing": int(worker is not None and not worker.took_first_job),
                "throttled": int(self.throttled and bool(endpoint.queue)),
                "unhealthy": 0,
            }
            summary["total"] = sum(summary.values())
            listed = [{"id": worker.id, "status": "RUNNING" if running else "IDLE"}] if worker else []
            return JSONResponse({"workers": listed, "summary": summary, "endpointVersion": 1})

    def _job_routes(self, app: FastAPI) -> None:
        """The job API (api.runpod.ai/v2/{endpoint}/...)."""

        @app.post("/v2/{endpoint_id}/run")
        async def run(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "job.run", endpoint_id=endpoint_id)
            endpoint = self._own_endpoint(account, endpoint_id, job_api=True)
            raw = await request.body()
            if len(raw) > self.max_payload_bytes:
                return JSONResponse(
                    {"error": f"request body of {len(raw)} bytes exceeds the /run limit of "
                              f"{self.max_payload_bytes} bytes"}, status_code=400,
                )
            body = await _json_body(request)
            if not isinstance(body, dict) or "input" not in body:
                return JSONResponse({"error": "input is required"}, status_code=400)
            policy = body.get("policy") or {}
            timeout_ms = policy.get("executionTimeout") or endpoint.config.get("timeout") or 600000
            ttl_ms = policy.get("ttl") or 24 * 3600 * 1000
            job = FakeJob(
                id=f"{uuid.uuid4()}-u1", endpoint_id=endpoint_id, input=body["input"],
                execution_timeout_s=float(timeout_ms) / 1000,
                expires_at=time.monotonic() + float(ttl_ms) / 1000,
            )
            self._jobs[job.id] = job
            endpoint.queue.append(job.id)
            return JSONResponse({"id": job.id, "status": "IN_QUEUE"})

        @app.get("/v2/{endpoint_id}/status/{job_id}")
        async def status(request: Request, endpoint_id: str, job_id: str) -> Response:
            account = self._gate(request, "job.status", endpoint_id=endpoint_id)
            self._own_endpoint(account, endpoint_id, job_api=True)
            return JSONResponse(self._status_body(self._live_job(endpoint_id, job_id)))

        @app.get("/v2/{endpoint_id}/stream/{job_id}")
        async def stream(request: Request, endpoint_id: str, job_id: str) -> Response:
            account = self._gate(request, "job.stream", endpoint_id=endpoint_id)
            self._own_endpoint(account, endpoint_id, job_api=True)
            wait_s = self.stream_wait_s
            if "wait" in request.query_params:
                wait_s = min(max(int(request.query_params["wait"]), 1000), 300000) / 1000
            deadline = time.monotonic() + wait_s
            while True:
                job = self._live_job(endpoint_id, job_id)
                if job.pending or job.status in TERMINAL or time.monotonic() >= deadline:
                    chunks, job.pending = job.pending, []
                    return JSONResponse({
                        "status": job.status, "stream": [{"output": c} for c in chunks]
                    })
                await asyncio.sleep(0.05)

        @app.post("/v2/{endpoint_id}/cancel/{job_id}")
        async def cancel(request: Request, endpoint_id: str, job_id: str) -> Response:
            account = self._gate(request, "job.cancel", endpoint_id=endpoint_id)
            endpoint = self._own_endpoint(account, endpoint_id, job_api=True)
            job = self._live_job(endpoint_id, job_id)
            if job.status == "IN_QUEUE" and job.id in endpoint.queue:
                endpoint.queue.remove(job.id)
            if job.status == "IN_PROGRESS":
                self._stop_on_worker(job)
            if job.status not in TERMINAL:
                self._finish(job, "CANCELLED")
            return JSONResponse({"id": job.id, "status": job.status})

        @app.get("/v2/{endpoint_id}/health")
        async def health(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "job.health")
            endpoint = self._own_endpoint(account, endpoint_id, job_api=True)
            jobs = [j for j in self._jobs.values() if j.endpoint_id == endpoint_id]
            counts = {s: sum(j.status == s for j in jobs) for s in
                      ("COMPLETED", "FAILED", "IN_PROGRESS", "IN_QUEUE")}
            return JSONResponse({
                "jobs": {"completed": counts["COMPLETED"], "failed": counts["FAILED"],
                         "inProgress": counts["IN_PROGRESS"], "inQueue": counts["IN_QUEUE"],
                         "retried": 0},
                "workers": {"idle": int(endpoint.worker is not None and not counts["IN_PROGRESS"]),
                            "running": min(counts["IN_PROGRESS"], 1)},
            })

    def _worker_routes(self, app: FastAPI) -> None:
        """What the SDK's worker loop calls (URLs from the RUNPOD_WEBHOOK_* variables)."""

        @app.get("/job-take/{worker_id}")
        async def take(request: Request, worker_id: str) -> Response:
            worker = self._worker(request, "worker.take", worker_id)
            endpoint = self._endpoints[worker.endpoint_id]
            deadline = time.monotonic() + self.worker_poll_s
            while not self._stopping and not endpoint.deleted and time.monotonic() < deadline:
                job = self._next_job(endpoint) if not self.throttled else None
                if job is not None:
                    job.status, job.started_at, job.worker_id = "IN_PROGRESS", time.monotonic(), worker.id
                    worker.took_first_job = True
                    return JSONResponse({"id": job.id, "input": job.input})
                await asyncio.sleep(0.05)
            return Response(status_code=204)

        @app.post("/job-stream/{worker_id}/{job_id}")
        async def stream(request: Request, worker_id: str, job_id: str) -> Response:
            self._worker(request, "worker.stream", worker_id)
            # The SDK labels the body form-urlencoded; it is JSON.
            body = json.loads(await request.body() or b"null")
            job = self._jobs.get(job_id)
            if job is not None and job.status == "IN_PROGRESS" and isinstance(body, dict):
                job.pending.extend(self._split(body.get("output")))
            return JSONResponse({})

        @app.post("/job-done/{worker_id}/{job_id}")
        async def done(request: Request, worker_id: str, job_id: str) -> Response:
            self._worker(request, "worker.done", worker_id)
            raw = await request.body()
            job = self._jobs.get(job_id)
            if len(raw) > self.max_payload_bytes:
                # The upload fails and the client sees COMPLETED without output (#309).
                if job is not None and job.status == "IN_PROGRESS":
                    self._finish(job, "COMPLETED")
                return JSONResponse({"error": "payload too large"}, status_code=400)
            body = json.loads(raw or b"null")
            if job is None or job.status != "IN_PROGRESS" or not isinstance(body, dict):
                return JSONResponse({})
            if body.get("status") == "IN_PROGRESS":  # runpod.serverless.progress_update
                job.progress = body.get("output")
            elif body.get("error"):
                self._finish(job, "FAILED", error=str(body["error"]))
            else:
                self._finish(job, "COMPLETED", output=body.get("output"))
            return JSONResponse({})

        @app.get("/job-stop/{worker_id}")
        async def stop(request: Request, worker_id: str) -> Response:
            worker = self._worker(request, "worker.stop", worker_id)
            deadline = time.monotonic() + self.worker_poll_s
            while not self._stopping and time.monotonic() < deadline:
                if worker.to_stop:
                    jobs, worker.to_stop = sorted(worker.to_stop), set()
                    return JSONResponse({"jobsToStop": jobs})
                await asyncio.sleep(0.05)
            return Response(status_code=204)

        @app.get("/ping/{worker_id}")
        async def ping(request: Request, worker_id: str) -> Response:
            self._worker(request, "worker.ping", worker_id).last_ping = time.monotonic()
            return JSONResponse({})

    def _control_routes(self, app: FastAPI) -> None:
        """The controls of a fake running as its own process (tests in other processes)."""

        @app.post("/_fake/keys")
        async def add_key(request: Request) -> Response:
            body = await _json_body(request)
            account = self.add_key(str(body["key"]), float(body.get("balance", 100.0)),
                                   str(body.get("scope", "all")))
            return JSONResponse({"account_id": account.account_id})

        @app.post("/_fake/faults")
        async def fault(request: Request) -> Response:
            body = await _json_body(request)
            self.fail_next(str(body["route"]), int(body["status"]), int(body.get("times", 1)),
                           body.get("retry_after"))
            return JSONResponse({"ok": True})

        @app.post("/_fake/mode")
        async def mode(request: Request) -> Response:
            body = await _json_body(request)
            if "throttled" in body:
                self.set_throttled(bool(body["throttled"]))
            if "execution_timeout_s" in body:
                self.execution_timeout_s = body["execution_timeout_s"]
            if "retention_s" in body:
                self.retention_s = float(body["retention_s"])
            if "graphql" in body:
                self.graphql_enabled = bool(body["graphql"])
            if "max_payload_bytes" in body:
                self.max_payload_bytes = int(body["max_payload_bytes"])
            return JSONResponse({"throttled": self.throttled,
                                 "execution_timeout_s": self.execution_timeout_s,
                                 "retention_s": self.retention_s,
                                 "graphql": self.graphql_enabled,
                                 "max_payload_bytes": self.max_payload_bytes})

        @app.post("/_fake/templates")
        async def add_template(request: Request) -> Response:
            body = await _json_body(request)
            self.add_template(str(body["id"]), str(body.get("image", "")), body.get("env"))
            return JSONResponse(self.templates[str(body["id"])])

        @app.get("/_fake/requests")
        async def requests() -> Response:
            return JSONResponse({"requests": [r.__dict__ for r in self.requests]})

        @app.get("/_fake/endpoints")
        async def endpoints() -> Response:
            return JSONResponse({"endpoints": self.endpoints()})

        @app.delete("/_fake/endpoints/{endpoint_id}")
        async def console_delete(endpoint_id: str) -> Response:
            self.delete_endpoint(endpoint_id)
            return Response(status_code=204)

    # ---- request checks ------------------------------------------------------------------

    def _gate(
        self, request: Request, route: str, *, manage: bool = False, anonymous_ok: bool = False,
        endpoint_id: str = "",
    ) -> FakeAccount:
        """Record the route, answer an injected fault, check the key (and its scope) and the
        job API's rate limit."""
        request.state.record.route = route
        self._injected_fault(route)
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not key and route == "graphql":
            key = request.query_params.get("api_key", "")
        if not key and anonymous_ok:
            return None  # type: ignore[return-value]
        account = self.accounts.get(key)
        if account is None:
            raise _Refused(_problem(401, "missing bearer token" if not key else "invalid api key"))
        if account.scope == "restricted" and (manage or route == "graphql"):
            raise _Refused(_problem(403, "this API key does not have access to this resource"))
        if route in JOB_RATE_LIMITS:
            limit, window_s = JOB_RATE_LIMITS[route]
            recent = self._calls.setdefault((key, endpoint_id, route), deque())
            now = time.monotonic()
            while recent and now - recent[0] > window_s:
                recent.popleft()
            if len(recent) >= limit:
                raise _Refused(JSONResponse({"error": "rate limit exceeded"}, status_code=429))
            recent.append(now)
        return account

    def _injected_fault(self, route: str) -> None:
        faults = self._faults.get(route)
        if not faults:
            return
        fault = faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            faults.popleft()
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        raise _Refused(_problem(fault.status, "injected fault", headers))

    def _worker(self, request: Request, route: str, worker_id: str) -> FakeWorker:
        """The worker calling, known by its id and the key RunPod gave it (RUNPOD_AI_API_KEY)."""
        request.state.record.route = route
        self._injected_fault(route)
        worker = self._workers.get(worker_id)
        if worker is None or request.headers.get("authorization") != worker.secret:
            raise _Refused(JSONResponse({"error": "unknown worker"}, status_code=401))
        return worker

    def _next_job(self, endpoint: _Endpoint) -> FakeJob | None:
        while endpoint.queue:
            job = self._jobs.get(endpoint.queue.popleft())
            if job is None or job.status != "IN_QUEUE":
                continue
            if time.monotonic() > job.expires_at:
                del self._jobs[job.id]
                continue
            return job
        return None

    def _own_endpoint(self, account: FakeAccount, endpoint_id: str, job_api: bool = False) -> _Endpoint:
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None or endpoint.deleted or endpoint.owner != account.key:
            if job_api:
                raise _Refused(JSONResponse({"error": "endpoint not found"}, status_code=404))
            raise _Refused(_problem(404, f"endpoint {endpoint_id} not found"))
        return endpoint

    def _live_job(self, endpoint_id: str, job_id: str) -> FakeJob:
        """The job, unless it is unknown, expired (ttl) or past result retention: then 404."""
        job = self._jobs.get(job_id)
        now = time.monotonic()
        if job is not None and job.endpoint_id == endpoint_id:
            if job.status not in TERMINAL and now > job.expires_at:
                self._stop_on_worker(job)
                del self._jobs[job_id]
            elif job.finished_at is not None and now - job.finished_at > self.retention_s:
                del self._jobs[job_id]
            else:
                return job
        raise _Refused(JSONResponse({"error": "request does not exist"}, status_code=404))

    def _status_body(self, job: FakeJob) -> dict[str, Any]:
        now = time.monotonic()
        started = job.started_at or now
        body: dict[str, Any] = {
            "id": job.id, "status": job.status,
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

    def _validate_create(self, body: Any) -> Response | None:
        if not isinstance(body, dict):
            return _problem(422, "the body must be a JSON object")
        errors = [f"{name} is required" for name in ("name", "type", "scaling") if name not in body]
        if "image" not in body and "templateId" not in body:
            errors.append("image is required unless templateId is given")
        if ("gpu" in body) == ("cpu" in body):
            return _problem(400, "exactly one of gpu or cpu must be given")
        if "gpu" in body and not (body["gpu"] or {}).get("pools"):
            errors.append("gpu.pools must list at least one pool")
        if errors:
            return _problem(422, "the request does not match the schema", errors=errors)
        if "templateId" in body and body["templateId"] not in self.templates:
            return _problem(404, f"template {body['templateId']} not found")
        return None


def _public(config: dict[str, Any]) -> dict[str, Any]:
    """The Endpoint object as REST v2 returns it: the template is resolved at create time and
    not part of it."""
    return {k: v for k, v in config.items() if k != "templateId"}


def _kill(worker: FakeWorker) -> None:
    """RunPod terminating a worker: the whole process group (the SDK forks a heartbeat)."""
    if worker.process.poll() is None:
        try:
            os.killpg(worker.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _problem(status: int, detail: str, headers: dict[str, str] | None = None,
             errors: list[str] | None = None) -> JSONResponse:
    titles = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
              422: "Unprocessable Entity", 429: "Too Many Requests"}
    body: dict[str, Any] = {"title": titles.get(status, "Error"), "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers,
                        media_type="application/problem+json")


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        raise _Refused(_problem(400, "the body is not JSON")) from None


async def _serve(args: argparse.Namespace) -> None:
    keys = {}
    for item in args.key:
        key, _, balance = item.partition("=")
        keys[key] = float(balance) if balance else 100.0
    fake = FakeRunPod(keys, retention_s=args.retention_s, host=args.host, port=args.port,
                      template_ids={args.template_id})
    async with fake:
        print(f"FAKE_RUNPOD_URL={fake.url}", flush=True)  # noqa: T201 - the parent reads it
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.fake_runpod", description="A fake RunPod on loopback."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", action="append", default=[], help="KEY or KEY=BALANCE_USD")
    parser.add_argument("--retention-s", type=float, default=DEFAULT_RETENTION_S)
    parser.add_argument("--template-id", default="influence-template")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
