"""Migrations, settings, readiness, compute settings, key verification and estimates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlparse

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from influence.v1 import common_pb2, compute_pb2, scheduler_pb2
from scheduler.config import Settings
from scheduler.db import apply_migrations, load_migrations
from service_runtime.settings import SettingsError

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_migrations_are_versioned_and_idempotent(database_url):
    versions = [m.version for m in load_migrations()]
    assert versions == sorted(versions) and versions[0] == 1
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(apply_migrations(conn) for conn in conns))
        assert sorted(applied, key=len) == [[], [], versions]
        assert await apply_migrations(conns[0]) == []
        recorded = await conns[0].fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [row["version"] for row in recorded] == versions
        tables = {
            row["tablename"]
            for row in await conns[0].fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"profiles", "jobs", "job_events", "schema_migrations"} <= tables
        with pytest.raises(asyncpg.CheckViolationError):
            await conns[0].execute("INSERT INTO profiles (user_id, compute_backend) VALUES ('u', 'gpu')")
    finally:
        for conn in conns:
            await conn.close()


def test_bad_settings_name_the_variable(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://localhost/db")
    monkeypatch.setenv("HOSTED_PROVIDER", "azure")
    monkeypatch.setenv("SCHEDULER_POLL_INTERVAL_S", "-1")
    with pytest.raises(SettingsError) as caught:
        Settings.load()
    assert "HOSTED_PROVIDER" in str(caught.value)
    assert "SCHEDULER_POLL_INTERVAL_S" in str(caught.value)
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("HOSTED_PROVIDER")
    monkeypatch.delenv("SCHEDULER_POLL_INTERVAL_S")
    with pytest.raises(SettingsError, match="DATABASE_URL: is required"):
        Settings.load()
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2@localhost/db")
    monkeypatch.setenv("COMPUTE_RUNPOD_ADDR", "not an address")
    with pytest.raises(SettingsError) as caught:
        Settings.load()
    assert "COMPUTE_RUNPOD_ADDR" in str(caught.value) and "hunter2" not in str(caught.value)


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service="influence.v1.Scheduler"))
        return response.status


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_not_serving_while_database_is_unreachable(start):
    running = await start(
        wait_ready=False, database_url=f"postgresql://postgres@127.0.0.1:{_closed_port()}/nothing"
    )
    assert await _health(running.app.port) == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.GetComputeSettings(scheduler_pb2.GetComputeSettingsRequest(user_id="alice"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


class _DatabaseProxy:
    """A TCP front for the embedded PostgreSQL's Unix socket that the test can cut and restore."""

    def __init__(self, socket_path: str) -> None:
        self._socket_path = socket_path
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_unix_connection(self._socket_path)
        self._writers.update((client_w, server_w))
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()


@pytest.fixture
async def db_proxy(database_url) -> AsyncIterator[tuple[_DatabaseProxy, str]]:
    parsed = urlparse(database_url)
    socket_dir = parse_qs(parsed.query)["host"][0]
    proxy = _DatabaseProxy(os.path.join(socket_dir, ".s.PGSQL.5432"))
    await proxy.open()
    yield proxy, f"postgresql://postgres@127.0.0.1:{proxy.port}{parsed.path}"
    await proxy.cut()


async def test_readiness_follows_the_database(start, db_proxy, h):
    proxy, dsn = db_proxy
    running = await start(database_url=dsn)
    assert await _health(running.app.port) == SERVING

    await proxy.cut()
    await asyncio.wait_for(running.app.wait_serving(False), 20)
    assert await _health(running.app.port) == NOT_SERVING

    await proxy.open()
    await asyncio.wait_for(running.app.wait_serving(True), 20)
    assert await _health(running.app.port) == SERVING
    job = await running.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json())
    )
    events = await h.watch_all(running.stub, "alice", job.id)
    assert events[-1].type == "status" and b"completed" in events[-1].event_json


async def test_readiness_is_not_serving_while_the_pool_is_starved(start):
    running = await start(scheduler_db_pool_size=2, scheduler_db_acquire_timeout_s=0.3)
    _, store = running.app.require()
    async with contextlib.AsyncExitStack() as held:
        for _ in range(2):  # every connection of the pool busy (a stuck statement each)
            await held.enter_async_context(store.connection())
        await asyncio.wait_for(running.app.wait_serving(False), 10)
        assert await _health(running.app.port) == NOT_SERVING
    await asyncio.wait_for(running.app.wait_serving(True), 10)
    assert await _health(running.app.port) == SERVING


async def test_jobs_running_through_a_database_restart_still_complete(start, provider, db_proxy, h):
    """Every connection dropped while jobs run (as a PostgreSQL restart does), the database away
    for a second: the dispatcher and the poller wait and go on; nothing is lost or duplicated."""
    proxy, dsn = db_proxy
    provider.servicer.plan = h.plan(events=h.progress_events(6), hold_at=2)
    running = await start(database_url=dsn)
    jobs = [
        await running.stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id=f"r{i}", spec_json=h.spec_json()))
        for i in range(3)
    ]
    for job in jobs:
        await h.until_submitted(provider.servicer, job.id)
    await proxy.cut()
    provider.servicer.plan.release.set()  # the jobs go on at the provider meanwhile
    await asyncio.sleep(1.0)
    await proxy.open()
    for job in jobs:
        events = await asyncio.wait_for(h.watch_all(running.stub, job.user_id, job.id), 30)
        assert [event.seq for event in events] == list(range(1, len(events) + 1))
        assert [e.message for e in events if e.type == "progress"] == [f"step {i} of 6" for i in range(1, 7)]
        assert json.loads(events[-1].event_json)["state"] == "completed"
    assert sorted(provider.servicer.submit_calls) == sorted(job.id for job in jobs)


async def test_compute_settings(scheduler):
    stub = scheduler.stub
    settings = await stub.GetComputeSettings(scheduler_pb2.GetComputeSettingsRequest(user_id="alice"))
    assert (settings.backend, settings.endpoint_status, settings.hosted_provider) == (
        "hosted",
        "none",
        "local",
    )
    settings = await stub.SetComputeBackend(
        scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod")
    )
    assert settings.backend == "runpod"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="gpu"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'gpu'" in caught.value.details()
    again = await stub.GetComputeSettings(scheduler_pb2.GetComputeSettingsRequest(user_id="alice"))
    assert again.backend == "runpod"


async def test_verify_provider_key_forwards_and_never_stores(scheduler, provider, h, database_url):
    stub = scheduler.stub
    good = await stub.VerifyProviderKey(
        scheduler_pb2.VerifyProviderKeyRequest(user_id="alice", provider="runpod", api_key=h.good_key)
    )
    assert good.valid and good.balance_usd == 25.0
    bad_key = "rpa_WRONGKEY99999999"
    bad = await stub.VerifyProviderKey(
        scheduler_pb2.VerifyProviderKeyRequest(user_id="alice", provider="runpod", api_key=bad_key)
    )
    assert not bad.valid and bad.message == "Invalid RunPod API key"
    assert bad.failure == common_pb2.KEY_FAILURE_INVALID
    assert provider.servicer.verified_keys == [h.good_key, bad_key]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.VerifyProviderKey(
            scheduler_pb2.VerifyProviderKeyRequest(user_id="alice", provider="modal", api_key=h.good_key)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    conn = await asyncpg.connect(database_url)
    try:
        dump = str(await conn.fetch("SELECT * FROM profiles")) + str(await conn.fetch("SELECT * FROM jobs"))
    finally:
        await conn.close()
    assert h.good_key not in dump and bad_key not in dump


async def test_estimates_active_backend_first(scheduler, h):
    stub = scheduler.stub
    await stub.SetComputeBackend(scheduler_pb2.SetComputeBackendRequest(user_id="alice", backend="runpod"))
    response = await stub.EstimateJob(
        scheduler_pb2.EstimateJobRequest(user_id="alice", spec_json=h.spec_json())
    )
    assert response.active_backend == "runpod"
    assert [(e.backend, e.provider) for e in response.estimates] == [
        ("runpod", "runpod"),
        ("hosted", "local"),
    ]
    assert response.estimates[0].estimated_cost_usd == 0.5
    assert list(response.notes) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EstimateJob(
            scheduler_pb2.EstimateJobRequest(user_id="alice", spec_json=h.spec_json(eval_data="x"))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "eval_data" in caught.value.details()


async def test_metrics_count_jobs_and_provider_errors(scheduler, provider, h):
    def errors() -> float:
        return (
            REGISTRY.get_sample_value(
                "scheduler_provider_errors_total", {"provider": "local", "code": "UNAVAILABLE"}
            )
            or 0.0
        )

    before = errors()
    provider.servicer.fail_next = {"GetStatus": [(grpc.StatusCode.UNAVAILABLE, "down")]}
    job = await scheduler.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json())
    )
    await h.watch_all(scheduler.stub, "alice", job.id)
    assert await scheduler.app.check_health()
    assert REGISTRY.get_sample_value("scheduler_jobs", {"state": "completed"}) == 1
    assert REGISTRY.get_sample_value("scheduler_queue_depth") == 0
    assert errors() == before + 1


def test_migrate_command(database_url):
    env = {**os.environ, "DATABASE_URL": database_url}
    command = [sys.executable, "-m", "scheduler", "migrate"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    from scheduler.db import load_migrations

    versions = [migration.version for migration in load_migrations()]
    assert f'"applied": {json.dumps(versions)}' in first.stderr
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and '"applied": []' in second.stderr
    bad = subprocess.run(
        command, env={**env, "SCHEDULER_PORT": "http"}, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "SCHEDULER_PORT" in bad.stderr


@pytest.mark.parametrize(
    "failure",
    [
        common_pb2.KEY_FAILURE_INVALID,
        common_pb2.KEY_FAILURE_NO_FUNDS,
        common_pb2.KEY_FAILURE_NO_PERMISSION,
        common_pb2.KEY_FAILURE_UNREACHABLE,
    ],
)
async def test_key_refusal_reason_is_passed_on_unchanged_and_key_scrubbed(scheduler, provider, failure):
    key = "rpa_REFUSED0123456789"
    provider.servicer.refusals[key] = compute_pb2.VerifyCredentialsResponse(
        valid=False, failure=failure, message=f"refused: RunPod echoed {key}"
    )
    verdict = await scheduler.stub.VerifyProviderKey(
        scheduler_pb2.VerifyProviderKeyRequest(user_id="alice", provider="runpod", api_key=key)
    )
    assert (verdict.valid, verdict.failure) == (False, failure)
    assert verdict.message == "refused: RunPod echoed [REDACTED]"


async def test_an_unreachable_cloud_is_named_not_the_scheduler(start, provider, h):
    """compute-runpod is up but RunPod is not: the answer carries compute-runpod's own message
    and names the failed component in trailing metadata; a compute service that cannot be
    reached at all is named as such."""
    scheduler = await start()
    cloud_down = "Cannot reach RunPod (api.runpod.io): ConnectError"
    provider.servicer.fail_next = {"VerifyCredentials": [(grpc.StatusCode.UNAVAILABLE, cloud_down)]}
    request = scheduler_pb2.VerifyProviderKeyRequest(user_id="alice", provider="runpod", api_key=h.good_key)
    # A first call opens the channel, so the scripted failure arrives on a connected one.
    await scheduler.stub.EstimateJob(
        scheduler_pb2.EstimateJobRequest(user_id="alice", spec_json=h.spec_json())
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.VerifyProviderKey(request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == cloud_down
    assert ("x-failed-component", "compute-runpod") in tuple(caught.value.trailing_metadata())

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    unreachable = await start(compute_runpod_addr=f"127.0.0.1:{closed_port}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unreachable.stub.VerifyProviderKey(request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details().startswith("the compute-runpod service could not be reached")
    assert ("x-failed-component", "compute-runpod") in tuple(caught.value.trailing_metadata())


async def test_the_health_check_asks_the_database_cheaply_and_counts_jobs_seldom(start):
    # Checked every 0.1 s here (the conftest's db interval): each check is a SELECT 1; counting
    # every job row for the gauges happens once per SCHEDULER_JOB_GAUGES_INTERVAL_S.
    running = await start(scheduler_job_gauges_interval_s=3600)
    _, store = running.app.require()
    counted = 0
    count_by_status = store.count_by_status

    async def counting() -> dict[str, int]:
        nonlocal counted
        counted += 1
        return await count_by_status()

    store.count_by_status = counting  # type: ignore[method-assign]
    for _ in range(5):
        assert await running.app.check_health()
    assert counted == 0


async def test_stop_abandons_a_step_that_never_ends_and_names_it(start, monkeypatch, caplog):
    """asyncpg's pool close waits for every connection to come back: one that never does must
    not keep the scheduler from stopping (CI once timed out in a scheduler's stop)."""
    from scheduler import server as server_module

    monkeypatch.setattr(server_module, "STOP_STEP_S", 0.5)
    running = await start()
    pool = running.app._pool
    await pool.acquire()  # a connection never released
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level("WARNING", logger="scheduler.server"):
        await running.app.stop(0)
    assert loop.time() - started < 5
    abandoned = [getattr(record, "component", "") for record in caplog.records]
    assert "scheduler.stop.database pool" in abandoned
    assert pool.is_closing()  # terminated: its connections are closed, not awaited
