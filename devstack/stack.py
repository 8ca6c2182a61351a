"""Starts PostgreSQL and every service as separate processes on loopback, and stops them.

`make run` uses the default ports of docs/services.md; the end-to-end tests use free ports and
a temporary data directory. Secrets that must survive restarts (keyvault's master key, caller
tokens, the local sign-in key) are generated once into ``<data_dir>/secrets.json``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.postgres import EmbeddedPostgres, start_embedded_postgres

REPO_ROOT = Path(__file__).resolve().parents[1]


def _service_of(name: str) -> str:
    """ "scheduler-2" (a replica) -> "scheduler"."""
    return "scheduler" if name.startswith("scheduler-") else name


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # as in docs/services.md, e.g. "compute-local"
    module: str  # python -m <module>
    env_prefix: str  # e.g. COMPUTE_LOCAL
    grpc_service: str  # readiness name; "" for the HTTP gateway


SERVICES = {
    "keyvault": ServiceSpec("keyvault", "keyvault", "KEYVAULT", "influence.v1.KeyVault"),
    "compute-local": ServiceSpec(
        "compute-local", "compute_local", "COMPUTE_LOCAL", "influence.v1.ComputeProvider"
    ),
    "compute-runpod": ServiceSpec(
        "compute-runpod", "compute_runpod", "COMPUTE_RUNPOD", "influence.v1.ComputeProvider"
    ),
    "compute-modal": ServiceSpec(
        "compute-modal", "compute_modal", "COMPUTE_MODAL", "influence.v1.ComputeProvider"
    ),
    "scheduler": ServiceSpec("scheduler", "scheduler", "SCHEDULER", "influence.v1.Scheduler"),
    "gateway": ServiceSpec("gateway", "gateway", "GATEWAY", ""),
}
DEFAULT_PORTS = {
    "gateway": 8080,
    "scheduler": 50051,
    "keyvault": 50052,
    "compute-local": 50053,
    "compute-runpod": 50054,
    "compute-modal": 50055,
}
DEFAULT_METRICS_PORTS = {
    "gateway": 9090,
    "scheduler": 9091,
    "keyvault": 9092,
    "compute-local": 9093,
    "compute-runpod": 9094,
    "compute-modal": 9095,
}


# What a service's log says when its port was taken (Python sockets and uvicorn; gRPC).
_PORT_TAKEN = ("address already in use", "failed to bind to address")


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port that is free now, chosen outside the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is also what it hands every outgoing connection,
    so between picking it and the service binding it, a test's client could take it (CI saw
    "Address already in use"). Ports below the ephemeral range are only ever taken on purpose.
    """
    low, high = _ephemeral_port_range()
    candidates = range(20000, low) if low > 21000 else range(high + 1, 65536)
    for _ in range(200):
        port = random.choice(candidates)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def holds_listening_port(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds the socket listening on ``port``; None where /proc cannot
    tell (not Linux). A health probe alone may be answered by another process on that port."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None if not Path("/proc/self/fd").is_dir() else False
    sockets = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                sockets.add(target[len("socket:[") : -1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in sockets:
                    return True  # 0A: LISTEN
    return False


def load_or_create_secrets(path: Path) -> dict[str, str]:
    """The stack's secrets, kept across runs; any a newer stack needs are added to the file."""
    values: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    wanted = {
        "RUNPOD_KEY_ENCRYPTION_SECRET": lambda: base64.b64encode(secrets.token_bytes(32)).decode(),
        "GATEWAY_LOCAL_JWT_SECRET": lambda: secrets.token_urlsafe(32),
        "gateway_token": lambda: secrets.token_urlsafe(24),
        "scheduler_token": lambda: secrets.token_urlsafe(24),
        "compute_runpod_token": lambda: secrets.token_urlsafe(24),
        # The gateway's token to the scheduler, the scheduler's to the compute services, and
        # compute-modal's to keyvault (it reveals researchers' Hugging Face tokens).
        "gateway_scheduler_token": lambda: secrets.token_urlsafe(24),
        "scheduler_compute_token": lambda: secrets.token_urlsafe(24),
        "compute_modal_token": lambda: secrets.token_urlsafe(24),
    }
    missing = {name: make() for name, make in wanted.items() if name not in values}
    if missing:
        values |= missing
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
        path.chmod(0o600)
    return values


@dataclass
class RunningService:
    spec: ServiceSpec
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Stack:
    """The whole stack. ``extra_env`` reaches every service (e.g. HOSTED_PROVIDER, RunPod URLs)."""

    data_dir: Path
    fixed_ports: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = ("keyvault", "compute-local", "compute-runpod", "scheduler", "gateway")
    # Scheduler processes sharing the jobs table: "scheduler", then "scheduler-2", ...
    scheduler_replicas: int = 1
    postgres: EmbeddedPostgres | None = None
    database_url: str = ""
    running: dict[str, RunningService] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SERVICES:
            self.ports[name] = DEFAULT_PORTS[name] if self.fixed_ports else free_port()
            if name in DEFAULT_METRICS_PORTS:
                self.metrics_ports[name] = DEFAULT_METRICS_PORTS[name] if self.fixed_ports else free_port()
        for replica in self.scheduler_names[1:]:
            offset = 10 * (int(replica.rsplit("-", 1)[1]) - 1)
            self.ports[replica] = DEFAULT_PORTS["scheduler"] + offset if self.fixed_ports else free_port()
            self.metrics_ports[replica] = (
                DEFAULT_METRICS_PORTS["scheduler"] + offset if self.fixed_ports else free_port()
            )
        self.secrets = load_or_create_secrets(self.data_dir / "secrets.json")

    @property
    def scheduler_names(self) -> list[str]:
        return ["scheduler", *(f"scheduler-{n}" for n in range(2, self.scheduler_replicas + 1))]

    @property
    def scheduler_target(self) -> str:
        """What the gateway dials: one address, or every replica's (it balances round robin)."""
        return ",".join(self.address(name) for name in self.scheduler_names)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start_database(self) -> None:
        configured = self.extra_env.get("DATABASE_URL") or os.environ.get("DATABASE_URL")
        if configured:
            self.database_url = configured
            return
        self.postgres = start_embedded_postgres(self.data_dir / "postgres")
        self.database_url = self.postgres.ensure_database("influence")

    def service_env(self, name: str) -> dict[str, str]:
        spec = SERVICES[_service_of(name)]
        s = self.secrets
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DATABASE_URL": self.database_url,
            "HOSTED_PROVIDER": "local",
            "SCHEDULER_ADDR": self.scheduler_target,
            "KEYVAULT_ADDR": self.address("keyvault"),
            "COMPUTE_LOCAL_ADDR": self.address("compute-local"),
            "COMPUTE_RUNPOD_ADDR": (
                self.address("compute-runpod") if "compute-runpod" in self.services else ""
            ),
            "COMPUTE_MODAL_ADDR": (self.address("compute-modal") if "compute-modal" in self.services else ""),
            "RUNPOD_KEY_ENCRYPTION_SECRET": s["RUNPOD_KEY_ENCRYPTION_SECRET"],
            "KEYVAULT_CALLER_TOKENS": (
                f"gateway={s['gateway_token']},scheduler={s['scheduler_token']},"
                f"compute-runpod={s['compute_runpod_token']},compute-modal={s['compute_modal_token']}"
            ),
            # Every gRPC service but the gateway checks its callers (service_runtime.callers).
            "SCHEDULER_CALLER_TOKENS": f"gateway={s['gateway_scheduler_token']}",
            "SCHEDULER_TOKEN": s["gateway_scheduler_token"],
            "COMPUTE_CALLER_TOKENS": f"scheduler={s['scheduler_compute_token']}",
            "COMPUTE_TOKEN": s["scheduler_compute_token"],
            "AUTH_MODE": "local",
            "GATEWAY_LOCAL_JWT_SECRET": s["GATEWAY_LOCAL_JWT_SECRET"],
            "COMPUTE_LOCAL_WORK_DIR": str(self.data_dir / "compute-local"),
            "ARTIFACT_STORE_URL": os.environ.get("ARTIFACT_STORE_URL") or str(self.data_dir / "artifacts"),
            f"{spec.env_prefix}_PORT": str(self.ports[name]),
        }
        if name in self.metrics_ports:
            env[f"{spec.env_prefix}_METRICS_PORT"] = str(self.metrics_ports[name])
        tokens = {
            "gateway": "gateway_token",
            "scheduler": "scheduler_token",
            "compute-runpod": "compute_runpod_token",
            "compute-modal": "compute_modal_token",
        }
        if spec.name in tokens:
            env["KEYVAULT_TOKEN"] = s[tokens[spec.name]]
        if spec.name == "scheduler":
            # Stable per replica, so a restarted replica reclaims its own jobs at once.
            env["SCHEDULER_REPLICA_ID"] = name
        env.update(self.extra_env)
        return env

    def start_service(self, name: str, timeout_s: float = 120.0) -> RunningService:
        spec = SERVICES[_service_of(name)]
        log_dir = self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        log_file = log_path.open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", spec.module],
            cwd=REPO_ROOT,
            env=self.service_env(name),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        service = RunningService(spec, self.ports[name], self.metrics_ports.get(name, 0), process, log_path)
        self.running[name] = service
        self._wait_ready(service, timeout_s)
        return service

    def start(self) -> None:
        self.start_database()
        for name in self.services:
            for instance in self.scheduler_names if name == "scheduler" else [name]:
                self._start_first_time(instance)

    def _start_first_time(self, name: str, attempts: int = 3) -> None:
        """Starts a service; one that lost a free port to another process gets new ports.

        Safe only on the first start: no service started later has been told the old port yet.
        """
        for attempt in range(attempts):
            try:
                self.start_service(name)
                return
            except RuntimeError as exc:
                lost_port = any(sign in str(exc).lower() for sign in _PORT_TAKEN)
                if self.fixed_ports or not lost_port or attempt == attempts - 1:
                    raise
                self.running.pop(name, None)
                self.ports[name] = free_port()
                if name in self.metrics_ports:
                    self.metrics_ports[name] = free_port()

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        service = self.running.pop(name, None)
        if service is None or service.process.poll() is not None:
            return
        service.process.send_signal(sig)
        try:
            service.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()

    def stop(self) -> None:
        for name in reversed(list(self.running)):
            self.stop_service(name)
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None

    def log_text(self, name: str) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_ready(self, service: RunningService, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.spec.name} exited with {service.process.returncode}:\n"
                    + self.log_text(service.spec.name)[-4000:]
                )
            # Another test stack's service may answer on a port this one lost to it.
            if self._is_ready(service) and self._holds_its_port(service):
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"{service.spec.name} not ready after {timeout_s:.0f} s:\n"
            + self.log_text(service.spec.name)[-4000:]
        )

    @staticmethod
    def _holds_its_port(service: RunningService) -> bool:
        return holds_listening_port(service.process.pid, service.port) is not False

    @staticmethod
    def _is_ready(service: RunningService) -> bool:
        if not service.spec.grpc_service:
            import httpx

            try:
                return httpx.get(f"http://{service.address}/healthz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False
        with grpc.insecure_channel(service.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                # types-grpcio-health-checking's HealthStub declares none of the methods it has
                reply = stub.Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(service=service.spec.grpc_service), timeout=1.0
                )
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class SimulatedRunPod:
    """``DEVSTACK_FAKE_RUNPOD=1 make run``: the fake RunPod beside the stack with one funded test
    key, so "Bring your own GPU" can be tried end to end without a RunPod account."""

    fake: FakeRunPodProcess
    test_key: str

    @classmethod
    def start(cls, balance_usd: float = 25.0) -> SimulatedRunPod:
        fake = FakeRunPodProcess.start()
        test_key = f"rpa_SIMULATED_{secrets.token_hex(12).upper()}"
        fake.control("POST", "keys", key=test_key, balance=balance_usd)
        return cls(fake, test_key)

    def stack_env(self) -> dict[str, str]:
        return {**self.fake.settings_env(), "GATEWAY_RUNPOD_SIMULATED": "true"}

    def stop(self) -> None:
        self.fake.stop()


@dataclass
class FakeRunPodProcess:
    """``python -m devstack.fake_runpod`` as a separate process, controlled over ``/_fake/``."""

    process: subprocess.Popen[str]
    url: str

    @classmethod
    def start(cls, extra_env: dict[str, str] | None = None, timeout_s: float = 30.0) -> FakeRunPodProcess:
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack.fake_runpod"],
            cwd=REPO_ROOT,
            env={**os.environ, **(extra_env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if line.startswith("FAKE_RUNPOD_URL="):
                return cls(process, line.strip().split("=", 1)[1])
            if not line and process.poll() is not None:
                break
        process.kill()
        raise RuntimeError("the fake RunPod did not start")

    def settings_env(self, template_id: str = "influence-template") -> dict[str, str]:
        return {
            "RUNPOD_REST_BASE_URL": f"{self.url}/v2",
            "RUNPOD_JOB_BASE_URL": f"{self.url}/v2",
            "RUNPOD_GRAPHQL_URL": f"{self.url}/graphql",
            "RUNPOD_TEMPLATE_ID": template_id,
        }

    def control(self, method: str, path: str, **body: object) -> object:
        import httpx

        reply = httpx.request(method, f"{self.url}/_fake/{path}", json=body or None, timeout=10)
        reply.raise_for_status()
        return reply.json() if reply.content else None

    def requests(self, route: str | None = None) -> list[dict[str, object]]:
        recorded = self.control("GET", "requests")["requests"]  # type: ignore[index]
        return [r for r in recorded if route is None or r["route"] == route]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
