"""A fake RunPod for tests and the local stack, written from shared/reference/runpod.md.

One HTTP server plays all three RunPod hosts (point every base URL at it):
  REST v2 (``/v2/serverless``...), the job API (``/v2/{endpoint}/run|status|stream|cancel``) and
  GraphQL (``/graphql``, ``myself`` only).
What it keeps from the real platform: Bearer auth (401 unknown key; 403 for a restricted key on
GraphQL and endpoint management), API-create defaults, ``IN_QUEUE -> IN_PROGRESS -> COMPLETED``,
``/stream`` draining (each poll returns only new chunks, long-polling briefly when empty), chunks
over 1 MB split into string pieces, results kept ``retention_s`` after completion then 404,
``policy.ttl`` and ``policy.executionTimeout`` (``TIMED_OUT``), one worker per endpoint.
Jobs run the REAL worker handler (services/compute-runpod/worker/handler.py) in a thread,
iterating its generator the way the SDK does: each yield is a stream chunk ``{"output": x}``, a
yielded ``{"error": msg}`` or a raise makes the job FAILED (the error goes to /status only), the
aggregate output is the list of yields and the generator's return value is ignored.

Injectable faults (``fail_next``): any status (401/403/429 with Retry-After/5xx) for the next N
calls of a route; ``throttled`` (no GPU: jobs stay IN_QUEUE, workers summary throttled);
``execution_timeout_s`` (jobs run past it end TIMED_OUT); per-key balance. Every request is
recorded (method, path, query, headers, status) in ``requests``.

In-process: ``async with FakeRunPod(keys={"rpa_...": 25.0}) as fake: fake.url``.
As a process: ``python -m devstack.fake_runpod --key rpa_x=25``; it prints ``FAKE_RUNPOD_URL=...``
and offers the same controls over HTTP under ``/_fake/`` (keys, faults, mode, requests).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator
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
MAX_CHUNK_BYTES = 1024 * 1024
DEFAULT_RETENTION_S = 30 * 60
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
ROUTES = (
    "graphql", "serverless.list", "serverless.create", "serverless.get", "serverless.delete",
    "serverless.workers", "job.run", "job.status", "job.stream", "job.cancel", "job.health",
)

Handler = Callable[[dict[str, Any]], Iterator[Any]]


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
    pending: list[Any] = field(default_factory=list)  # chunks not yet drained by /stream
    output: list[Any] | None = None
    error: str | None = None
    cancel_requested: bool = False


@dataclass
class _Endpoint:
    config: dict[str, Any]
    owner: str
    queue: queue.Queue[str] = field(default_factory=queue.Queue)
    worker: threading.Thread | None = None
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
        template_ids: set[str] | None = None,
        handler_path: Path = WORKER_HANDLER,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._lock = threading.RLock()
        self.accounts: dict[str, FakeAccount] = {}
        for key, balance in (keys or {}).items():
            self.add_key(key, balance)
        self.retention_s = retention_s
        self.stream_wait_s = stream_wait_s
        self.max_chunk_bytes = max_chunk_bytes
        self.template_ids = template_ids if template_ids is not None else {"influence-template"}
        self.throttled = False
        self.execution_timeout_s: float | None = None
        self.requests: list[RecordedRequest] = []
        self._handler_path = handler_path
        self._handler: Handler | None = None
        self._host, self._port = host, port
        self._faults: dict[str, deque[_Fault]] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._jobs: dict[str, FakeJob] = {}
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
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
        with self._lock:
            account = self.accounts.get(key) or FakeAccount(key=key)
            account.balance, account.scope = balance, scope
            self.accounts[key] = account
            return account

    def fail_next(
        self, route: str, status: int, times: int = 1, retry_after: float | None = None
    ) -> None:
        """Answer the next ``times`` calls of ``route`` (one of ``ROUTES``) with ``status``."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {', '.join(ROUTES)}")
        with self._lock:
            self._faults.setdefault(route, deque()).append(_Fault(status, times, retry_after))

    def set_throttled(self, throttled: bool) -> None:
        with self._lock:
            self.throttled = throttled
            self._wake.notify_all()

    def calls(self, route: str | None = None, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r for r in self.requests
                if (route is None or r.route == route) and (method is None or r.method == method)
            ]

    def endpoints(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e.config) for e in self._endpoints.values() if not e.deleted]

    def delete_endpoint(self, endpoint_id: str) -> None:
        """What a user deleting the endpoint in RunPod's console does."""
        with self._lock:
            self._delete(endpoint_id)

    def job(self, job_id: str) -> FakeJob | None:
        with self._lock:
            return self._jobs.get(job_id)

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
        return self

    async def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self._jobs.values():
                job.cancel_requested = True
            self._wake.notify_all()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        workers = [e.worker for e in self._endpoints.values() if e.worker is not None]
        await asyncio.to_thread(lambda: [w.join(timeout=60) for w in workers])

    async def __aenter__(self) -> FakeRunPod:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the worker ----------------------------------------------------------------------

    def _load_handler(self) -> Handler:
        if self._handler is None:
            spec = importlib.util.spec_from_file_location("influence_runpod_worker", self._handler_path)
            if spec is None or spec.loader is None:
                raise RuntimeError(f"cannot load the worker handler {self._handler_path}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._handler = module.handler
        return self._handler

    def _ensure_worker(self, endpoint: _Endpoint) -> None:
        if endpoint.worker is None:
            endpoint.worker = threading.Thread(
                target=self._work, args=(endpoint,), name=f"fake-runpod-{endpoint.config['id']}",
                daemon=True,
            )
            endpoint.worker.start()

    def _work(self, endpoint: _Endpoint) -> None:
        while True:
            with self._lock:
                while not self._stopping and not endpoint.deleted and (
                    self.throttled or endpoint.queue.empty()
                ):
                    self._wake.wait()
                if self._stopping or endpoint.deleted:
                    return
                job = self._jobs.get(endpoint.queue.get_nowait())
                if job is None or job.status != "IN_QUEUE":
                    continue
                job.status, job.started_at = "IN_PROGRESS", time.monotonic()
            self._run(job)

    def _run(self, job: FakeJob) -> None:
        aggregate: list[Any] = []
        try:
            generator = self._load_handler()({"id": job.id, "input": job.input})
            try:
                for output in generator:
                    with self._lock:
                        if job.cancel_requested or job.status != "IN_PROGRESS":
                            return
                        if time.monotonic() - (job.started_at or 0) > self._timeout_for(job):
                            self._finish(job, "TIMED_OUT")
                            return
                        if isinstance(output, dict) and "error" in output:
                            self._finish(job, "FAILED", error=str(output["error"]))
                            return
                        aggregate.append(output)
                        job.pending.extend(self._split(output))
            finally:
                generator.close()
        except Exception as exc:  # noqa: BLE001 - the SDK reports a raising handler as FAILED
            error = json.dumps({
                "error_type": f"<class '{type(exc).__name__}'>", "error_message": str(exc),
                "error_traceback": traceback.format_exc(), "hostname": "fake-runpod",
                "worker_id": f"worker-{job.endpoint_id}", "runpod_version": "fake",
            })
            with self._lock:
                self._finish(job, "FAILED", error=error)
            return
        with self._lock:
            if job.status == "IN_PROGRESS":
                self._finish(job, "COMPLETED", output=aggregate)

    def _timeout_for(self, job: FakeJob) -> float:
        forced = self.execution_timeout_s
        return min(job.execution_timeout_s, forced) if forced is not None else job.execution_timeout_s

    def _finish(self, job: FakeJob, status: str, *, error: str | None = None,
                output: list[Any] | None = None) -> None:
        job.status, job.finished_at, job.error, job.output = status, time.monotonic(), error, output

    def _split(self, output: Any) -> list[Any]:
        """RunPod caps a stream chunk at 1 MB and splits larger outputs into pieces."""
        text = json.dumps(output)
        if len(text.encode()) <= self.max_chunk_bytes:
            return [output]
        step = self.max_chunk_bytes // 4  # characters: up to 4 UTF-8 bytes each
        return [text[i:i + step] for i in range(0, len(text), step)]

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
                with self._lock:
                    self.requests.append(entry)
            request.state.record = entry
            response = await call_next(request)
            entry.status = response.status_code
            return response

        @app.exception_handler(_Refused)
        async def refused(_request: Request, exc: _Refused) -> Response:
            return exc.response

        @app.post("/graphql")
        async def graphql(request: Request) -> Response:
            account = self._gate(request, "graphql", anonymous_ok=True)
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

        @app.get("/v2/serverless")
        async def list_endpoints(request: Request) -> Response:
            account = self._gate(request, "serverless.list", manage=True)
            with self._lock:
                own = [dict(e.config) for e in self._endpoints.values()
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
            with self._lock:
                self._endpoints[endpoint_id] = _Endpoint(config=config, owner=account.key)
            return JSONResponse(config, status_code=201)

        @app.get("/v2/serverless/{endpoint_id}")
        async def get_endpoint(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "serverless.get", manage=True)
            endpoint = self._own_endpoint(account, endpoint_id)
            return JSONResponse(dict(endpoint.config))

        @app.delete("/v2/serverless/{endpoint_id}")
        async def delete_endpoint(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "serverless.delete", manage=True)
            self._own_endpoint(account, endpoint_id)
            with self._lock:
                self._delete(endpoint_id)
            return Response(status_code=204)

        @app.get("/v2/serverless/{endpoint_id}/workers")
        async def workers(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "serverless.workers", manage=True)
            endpoint = self._own_endpoint(account, endpoint_id)
            with self._lock:
                jobs = [j for j in self._jobs.values() if j.endpoint_id == endpoint_id]
                queued = any(j.status == "IN_QUEUE" for j in jobs)
                running = sum(j.status == "IN_PROGRESS" for j in jobs)
                throttled = 1 if self.throttled and queued else 0
                idle = 1 if endpoint.worker is not None and not running and not throttled else 0
            summary = {"running": running, "idle": idle, "initializing": 0,
                       "throttled": throttled, "unhealthy": 0}
            summary["total"] = sum(summary.values())
            return JSONResponse({"workers": [], "summary": summary, "endpointVersion": 1})

        @app.post("/v2/{endpoint_id}/run")
        async def run(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "job.run")
            endpoint = self._own_endpoint(account, endpoint_id, job_api=True)
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
            with self._lock:
                self._jobs[job.id] = job
                endpoint.queue.put(job.id)
                self._ensure_worker(endpoint)
                self._wake.notify_all()
            return JSONResponse({"id": job.id, "status": "IN_QUEUE"})

        @app.get("/v2/{endpoint_id}/status/{job_id}")
        async def status(request: Request, endpoint_id: str, job_id: str) -> Response:
            account = self._gate(request, "job.status")
            self._own_endpoint(account, endpoint_id, job_api=True)
            with self._lock:
                job = self._live_job(endpoint_id, job_id)
                return JSONResponse(self._status_body(job))

        @app.get("/v2/{endpoint_id}/stream/{job_id}")
        async def stream(request: Request, endpoint_id: str, job_id: str) -> Response:
            account = self._gate(request, "job.stream")
            self._own_endpoint(account, endpoint_id, job_api=True)
            wait_s = self.stream_wait_s
            if "wait" in request.query_params:
                wait_s = min(max(int(request.query_params["wait"]), 1000), 300000) / 1000
            deadline = time.monotonic() + wait_s
            while True:
                with self._lock:
                    job = self._live_job(endpoint_id, job_id)
                    if job.pending or job.status in TERMINAL or time.monotonic() >= deadline:
                        chunks, job.pending = job.pending, []
                        return JSONResponse({
                            "status": job.status, "stream": [{"output": c} for c in chunks]
                        })
                await asyncio.sleep(0.05)

        @app.post("/v2/{endpoint_id}/cancel/{job_id}")
        async def cancel(request: Request, endpoint_id: str, job_id: str) -> Response:
            account = self._gate(request, "job.cancel")
            self._own_endpoint(account, endpoint_id, job_api=True)
            with self._lock:
                job = self._live_job(endpoint_id, job_id)
                if job.status not in TERMINAL:
                    job.cancel_requested = True
                    self._finish(job, "CANCELLED")
                return JSONResponse({"id": job.id, "status": job.status})

        @app.get("/v2/{endpoint_id}/health")
        async def health(request: Request, endpoint_id: str) -> Response:
            account = self._gate(request, "job.health")
            self._own_endpoint(account, endpoint_id, job_api=True)
            with self._lock:
                jobs = [j for j in self._jobs.values() if j.endpoint_id == endpoint_id]
                counts = {s: sum(j.status == s for j in jobs) for s in
                          ("COMPLETED", "FAILED", "IN_PROGRESS", "IN_QUEUE")}
            return JSONResponse({
                "jobs": {"completed": counts["COMPLETED"], "failed": counts["FAILED"],
                         "inProgress": counts["IN_PROGRESS"], "inQueue": counts["IN_QUEUE"],
                         "retried": 0},
                "workers": {"idle": 0, "running": counts["IN_PROGRESS"]},
            })

        self._add_control_routes(app)
        return app

    def _add_control_routes(self, app: FastAPI) -> None:
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
            return JSONResponse({"throttled": self.throttled,
                                 "execution_timeout_s": self.execution_timeout_s,
                                 "retention_s": self.retention_s})

        @app.get("/_fake/requests")
        async def requests() -> Response:
            with self._lock:
                recorded = [r.__dict__ for r in self.requests]
            return JSONResponse({"requests": recorded})

        @app.delete("/_fake/endpoints/{endpoint_id}")
        async def console_delete(endpoint_id: str) -> Response:
            self.delete_endpoint(endpoint_id)
            return Response(status_code=204)

    # ---- request checks ------------------------------------------------------------------

    def _gate(
        self, request: Request, route: str, *, manage: bool = False, anonymous_ok: bool = False
    ) -> FakeAccount:
        """Record the route, answer an injected fault, check the key (and its scope)."""
        request.state.record.route = route
        with self._lock:
            faults = self._faults.get(route)
            if faults:
                fault = faults[0]
                fault.remaining -= 1
                if fault.remaining <= 0:
                    faults.popleft()
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = f"{fault.retry_after:g}"
                raise _Refused(_problem(fault.status, "injected fault", headers))
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
        return account

    def _own_endpoint(self, account: FakeAccount, endpoint_id: str, job_api: bool = False) -> _Endpoint:
        with self._lock:
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
                job.cancel_requested = True
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
            body["workerId"] = f"worker-{job.endpoint_id}"
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
        if "templateId" in body and body["templateId"] not in self.template_ids:
            return _problem(404, f"template {body['templateId']} not found")
        return None

    def _delete(self, endpoint_id: str) -> None:
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None:
            return
        endpoint.deleted = True
        for job in self._jobs.values():
            if job.endpoint_id == endpoint_id and job.status not in TERMINAL:
                job.cancel_requested = True
                self._finish(job, "CANCELLED")
        self._wake.notify_all()


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
