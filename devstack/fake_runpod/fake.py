"""``FakeRunPod``: the fake's state and controls, its lifecycle, what the platform does on its own
(workers, timeouts), and the checks every request passes (key, scope, rate limit, faults)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from devstack.fake_runpod.controls import add_control_routes
from devstack.fake_runpod.graphql import add_graphql_routes
from devstack.fake_runpod.jobs import add_job_routes
from devstack.fake_runpod.management import add_management_routes
from devstack.fake_runpod.state import (
    DEFAULT_RETENTION_S,
    DEFAULT_WORKER_QUOTA,
    JOB_RATE_LIMITS,
    MAX_CHUNK_BYTES,
    MAX_RUN_PAYLOAD_BYTES,
    ROUTES,
    TERMINAL,
    WORKER_QUOTA_BY_BALANCE,
    AcceptedFault,
    EndpointState,
    FakeAccount,
    FakeJob,
    FakeWorker,
    Fault,
    RecordedRequest,
    Refused,
    problem,
)
from devstack.fake_runpod.worker_api import add_worker_routes
from devstack.fake_runpod.workers import WORKER_HANDLER, kill_worker, launch_worker


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
        self._faults: dict[str, deque[Fault]] = {}
        self._accepted_faults: deque[AcceptedFault] = deque()
        # Every job /run created, in order, whatever its answer was (tests count paid jobs here).
        self.accepted_runs: list[str] = []
        self._calls: dict[tuple[str, str, str], deque[float]] = {}
        self.endpoint_states: dict[str, EndpointState] = {}
        self.workers_by_id: dict[str, FakeWorker] = {}
        self.jobs_by_id: dict[str, FakeJob] = {}
        self._log_dir = Path(tempfile.mkdtemp(prefix="fake-runpod-workers-"))
        self.stopping = False
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        # RunPod retries a webhook that does not answer 200 up to 2 more times, 10 s apart.
        self.webhook_retry_s = 10.0
        # Every webhook post made: (job id, HTTP status, 0 when the post itself failed).
        self.webhook_posts: list[tuple[str, int]] = []
        self._webhook_tasks: set[asyncio.Task[None]] = set()
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
            "id": template_id,
            "name": template_id,
            "serverless": True,
            "image": image or f"influence/worker:{template_id}",
            "env": dict(env or {}),
            "disk": 20,
        }

    def fail_next(self, route: str, status: int, times: int = 1, retry_after: float | None = None) -> None:
        """Answer the next ``times`` calls of ``route`` (one of ``ROUTES``) with ``status``."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {', '.join(ROUTES)}")
        self._faults.setdefault(route, deque()).append(Fault(status, times, retry_after))

    def fail_after_accept(self, status: int = 0, hang_s: float = 0.0, times: int = 1) -> None:
        """The next ``times`` calls of ``/run`` create the job (it is queued and runs) and then
        answer ``status`` (a 5xx), or hold the answer ``hang_s`` seconds first (past the client's
        timeout): the answer of an accepted job lost on the way, as RunPod's edge can lose it."""
        self._accepted_faults.append(AcceptedFault(status, hang_s, times))

    def accepted_fault(self) -> AcceptedFault | None:
        """The fault for the /run being answered now, if one is armed (one use of it)."""
        if not self._accepted_faults:
            return None
        fault = self._accepted_faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._accepted_faults.popleft()
        return fault

    def set_throttled(self, throttled: bool) -> None:
        self.throttled = throttled

    def calls(self, route: str | None = None, method: str | None = None) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if (route is None or r.route == route) and (method is None or r.method == method)
        ]

    def endpoints(self) -> list[dict[str, Any]]:
        """Every live endpoint as stored, ``templateId`` included (the API hides it)."""
        return [dict(e.config) for e in self.endpoint_states.values() if not e.deleted]

    def delete_endpoint(self, endpoint_id: str) -> None:
        """What a user deleting the endpoint in RunPod's console (or the REST API) does."""
        endpoint = self.endpoint_states.get(endpoint_id)
        if endpoint is None:
            return
        endpoint.deleted = True
        for job in self.jobs_by_id.values():
            if job.endpoint_id == endpoint_id and job.status not in TERMINAL:
                self.finish(job, "CANCELLED")
        for worker in endpoint.workers:
            kill_worker(worker)

    def job(self, job_id: str) -> FakeJob | None:
        return self.jobs_by_id.get(job_id)

    def workers(self) -> list[FakeWorker]:
        return list(self.workers_by_id.values())

    def worker_log(self, endpoint_id: str) -> str:
        """Everything the endpoint's workers printed (the SDK's log lines), for diagnosis."""
        return "\n".join(
            w.log_path.read_text(errors="replace")
            for w in self.workers_by_id.values()
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
        self.stopping = True
        for worker in list(self.workers_by_id.values()):
            kill_worker(worker)
        if self._monitor is not None:
            self._monitor.cancel()
        for task in list(self._webhook_tasks):
            task.cancel()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        await asyncio.to_thread(lambda: [w.process.wait() for w in self.workers_by_id.values()])
        shutil.rmtree(self._log_dir, ignore_errors=True)

    async def __aenter__(self) -> FakeRunPod:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the platform: workers, timeouts -------------------------------------------------

    def _start_worker(self, endpoint: EndpointState) -> None:
        worker = launch_worker(
            endpoint,
            self.url,
            self._handler_path,
            self._log_dir,
            int(self.max_payload_bytes * 0.95),
            self.worker_env,
        )
        self.workers_by_id[worker.id] = worker
        endpoint.workers.append(worker)

    async def _watch(self) -> None:
        """What RunPod does on its own: scale up, time out, notice crashed workers."""
        while not self.stopping:
            now = time.monotonic()
            for job in list(self.jobs_by_id.values()):
                if job.status == "IN_PROGRESS" and now - (job.started_at or now) > self._timeout_for(job):
                    self.finish(job, "TIMED_OUT")
                    self.stop_on_worker(job)
            for endpoint in self.endpoint_states.values():
                for worker in list(endpoint.workers):
                    if worker.process.poll() is not None:
                        self._worker_died(endpoint, worker)
                    elif worker.release < endpoint.release and not self.busy(worker):
                        kill_worker(worker)  # the new release rolls out as workers cycle
                if not self.throttled and not endpoint.deleted and self._wants_worker(endpoint):
                    self._start_worker(endpoint)
            await asyncio.sleep(0.1)

    def busy(self, worker: FakeWorker) -> bool:
        """Whether the worker is running a job now."""
        return any(j.worker_id == worker.id and j.status == "IN_PROGRESS" for j in self.jobs_by_id.values())

    def _wants_worker(self, endpoint: EndpointState) -> bool:
        """RunPod's scaler: ``workers.min`` workers always on (active workers), and for queued
        jobs more, up to ``workers.max``: the first at once (a cold start), the others by the
        endpoint's ``scaling``: ``QUEUE_DELAY`` adds one while a job has waited ``queueDelay``
        seconds with no free worker for it, ``REQUEST_COUNT`` keeps ceil((queued + running jobs)
        / ``requestCount``) (docs: endpoint-configurations.mdx). Never past the account's worker
        quota, set by its balance."""
        workers = endpoint.config.get("workers") or {}
        if len(endpoint.workers) >= int(workers.get("max", 3)):
            return False
        if self._account_workers(endpoint.owner) >= self._worker_quota(endpoint.owner):
            return False
        if len(endpoint.workers) < int(workers.get("min", 0)):
            return True
        now = time.monotonic()
        queued = [
            job
            for job in (self.jobs_by_id.get(job_id) for job_id in endpoint.queue)
            if job is not None and job.status == "IN_QUEUE" and now <= job.expires_at
        ]
        if not queued:
            return False
        if not endpoint.workers:
            return True
        scaling = endpoint.config.get("scaling") or {}
        if scaling.get("type") == "REQUEST_COUNT":
            running = sum(self.busy(worker) for worker in endpoint.workers)
            per_worker = max(1, int(scaling.get("requestCount", 4)))
            return len(endpoint.workers) < -(-(len(queued) + running) // per_worker)
        free = sum(not self.busy(worker) for worker in endpoint.workers)
        waited = now - min(job.submitted_at for job in queued)
        return waited >= float(scaling.get("queueDelay", 4)) and free < len(queued)

    def _account_workers(self, key: str) -> int:
        return sum(len(e.workers) for e in self.endpoint_states.values() if e.owner == key)

    def _worker_quota(self, key: str) -> int:
        account = self.accounts.get(key)
        balance = account.balance if account is not None else 0.0
        quotas = (quota for floor, quota in WORKER_QUOTA_BY_BALANCE if balance >= floor)
        return next(quotas, DEFAULT_WORKER_QUOTA)

    def _worker_died(self, endpoint: EndpointState, worker: FakeWorker) -> None:
        endpoint.workers.remove(worker)
        for job in self.jobs_by_id.values():
            if job.worker_id == worker.id and job.status == "IN_PROGRESS":
                self.finish(job, "FAILED", error=f"worker exited with code {worker.process.returncode}")

    def stop_on_worker(self, job: FakeJob) -> None:
        worker = self.workers_by_id.get(job.worker_id)
        if worker is not None:
            worker.to_stop.add(job.id)

    def _timeout_for(self, job: FakeJob) -> float:
        forced = self.execution_timeout_s
        return min(job.execution_timeout_s, forced) if forced is not None else job.execution_timeout_s

    def finish(self, job: FakeJob, status: str, *, error: str | None = None, output: Any = None) -> None:
        job.status, job.finished_at, job.error, job.output = status, time.monotonic(), error, output
        job.progress = None
        if job.webhook:
            task = asyncio.get_running_loop().create_task(self._post_webhook(job))
            self._webhook_tasks.add(task)
            task.add_done_callback(self._webhook_tasks.discard)

    async def _post_webhook(self, job: FakeJob) -> None:
        """What RunPod does when a job with a ``webhook`` finishes: POST its /status body there;
        anything but a 200 is tried again, up to 2 more times, ``webhook_retry_s`` apart."""
        from devstack.fake_runpod.jobs import status_body  # jobs imports this module

        async with httpx.AsyncClient(timeout=10.0) as http:
            for attempt in range(3):
                if attempt:
                    await asyncio.sleep(self.webhook_retry_s)
                try:
                    answer = await http.post(job.webhook, json=status_body(job))
                    status = answer.status_code
                except httpx.HTTPError:
                    status = 0
                self.webhook_posts.append((job.id, status))
                if status == 200:
                    return

    def split_output(self, output: Any) -> list[Any]:
        """RunPod caps a stream chunk at 1 MB and splits larger outputs into pieces."""
        text = json.dumps(output)
        if len(text.encode()) <= self.max_chunk_bytes:
            return [output]
        step = self.max_chunk_bytes // 4  # characters: up to 4 UTF-8 bytes each
        return [text[i : i + step] for i in range(0, len(text), step)]

    # ---- HTTP ----------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fake RunPod", docs_url=None, redoc_url=None, openapi_url=None)

        @app.middleware("http")
        async def record(request: Request, call_next: Callable[..., Any]) -> Response:
            entry = RecordedRequest(
                method=request.method,
                path=request.url.path,
                query=request.url.query,
                headers=dict(request.headers),
            )
            if not request.url.path.startswith("/_fake/"):
                self.requests.append(entry)
            request.state.record = entry
            response = await call_next(request)
            entry.status = response.status_code
            return response

        @app.exception_handler(Refused)
        async def refused(_request: Request, exc: Refused) -> Response:
            return exc.response

        add_graphql_routes(app, self)
        add_management_routes(app, self)
        add_job_routes(app, self)
        add_worker_routes(app, self)
        add_control_routes(app, self)
        return app

    # ---- request checks ------------------------------------------------------------------

    def gate(
        self,
        request: Request,
        route: str,
        *,
        manage: bool = False,
        anonymous_ok: bool = False,
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
            raise Refused(problem(401, "missing bearer token" if not key else "invalid api key"))
        if account.scope == "restricted" and (manage or route == "graphql"):
            raise Refused(problem(403, "this API key does not have access to this resource"))
        if route in JOB_RATE_LIMITS:
            limit, window_s = JOB_RATE_LIMITS[route]
            recent = self._calls.setdefault((key, endpoint_id, route), deque())
            now = time.monotonic()
            while recent and now - recent[0] > window_s:
                recent.popleft()
            if len(recent) >= limit:
                raise Refused(JSONResponse({"error": "rate limit exceeded"}, status_code=429))
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
        raise Refused(problem(fault.status, "injected fault", headers))

    def calling_worker(self, request: Request, route: str, worker_id: str) -> FakeWorker:
        """The worker calling, known by its id and the key RunPod gave it (RUNPOD_AI_API_KEY)."""
        request.state.record.route = route
        self._injected_fault(route)
        worker = self.workers_by_id.get(worker_id)
        if worker is None or request.headers.get("authorization") != worker.secret:
            raise Refused(JSONResponse({"error": "unknown worker"}, status_code=401))
        return worker

    def next_job(self, endpoint: EndpointState) -> FakeJob | None:
        while endpoint.queue:
            job = self.jobs_by_id.get(endpoint.queue.popleft())
            if job is None or job.status != "IN_QUEUE":
                continue
            if time.monotonic() > job.expires_at:
                del self.jobs_by_id[job.id]
                continue
            return job
        return None

    def own_endpoint(self, account: FakeAccount, endpoint_id: str, job_api: bool = False) -> EndpointState:
        endpoint = self.endpoint_states.get(endpoint_id)
        if endpoint is None or endpoint.deleted or endpoint.owner != account.key:
            if job_api:
                raise Refused(JSONResponse({"error": "endpoint not found"}, status_code=404))
            raise Refused(problem(404, f"endpoint {endpoint_id} not found"))
        return endpoint

    def live_job(self, endpoint_id: str, job_id: str) -> FakeJob:
        """The job, unless it is unknown, expired (ttl) or past result retention: then 404."""
        job = self.jobs_by_id.get(job_id)
        now = time.monotonic()
        if job is not None and job.endpoint_id == endpoint_id:
            if job.status not in TERMINAL and now > job.expires_at:
                self.stop_on_worker(job)
                del self.jobs_by_id[job_id]
            elif job.finished_at is not None and now - job.finished_at > self.retention_s:
                del self.jobs_by_id[job_id]
            else:
                return job
        raise Refused(JSONResponse({"error": "request does not exist"}, status_code=404))
