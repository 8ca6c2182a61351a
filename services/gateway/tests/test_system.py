"""Health, readiness, outages, metrics, OpenAPI, dashboard files, models, estimates, settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.config import Settings
from service_runtime.settings import SettingsError


def closed_port_addr() -> str:
    """An address nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_healthz_and_readyz(gateway, upstream) -> None:
    assert (await gateway.client.get("/healthz")).json() == {"status": "ok"}
    ready = await gateway.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"

    await upstream.keyvault_service.set_ready(False)
    not_ready = await gateway.client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["not_ready"] == ["keyvault"]
    assert "keyvault" in not_ready.json()["detail"]


async def test_scheduler_down_is_503_with_a_plain_message(make_gateway, make_spec) -> None:
    gateway = await make_gateway(scheduler_addr=closed_port_addr())
    headers = await gateway.sign_in("alice")
    response = await gateway.client.post("/api/train", json=make_spec(), headers=headers)
    assert response.status_code == 503
    assert response.json() == {
        "detail": "The scheduler is unavailable; your job was not submitted, try again"
    }
    jobs = await gateway.client.get("/api/jobs", headers=headers)
    assert jobs.status_code == 503 and "scheduler is unavailable" in jobs.json()["detail"]
    assert (await gateway.client.get("/healthz")).status_code == 200
    ready = await gateway.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["not_ready"] == ["scheduler"]


async def test_metrics_count_requests_by_route_template(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    job_id = upstream.scheduler.add_job("local:alice")
    await gateway.client.get(f"/api/jobs/{job_id}", headers=headers)
    await gateway.client.get("/api/jobs/someone-elses", headers=headers)
    # /metrics is on the internal metrics port only, not on the public app.
    assert (await gateway.client.get("/metrics")).status_code == 404
    metrics_port = gateway.running.metrics_server.port
    async with httpx.AsyncClient() as internal:
        text = (await internal.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    assert 'http_requests_total{method="GET",route="/api/jobs/{job_id}",status="200"} 1.0' in text
    assert 'http_requests_total{method="GET",route="/api/jobs/{job_id}",status="404"} 1.0' in text
    assert 'http_request_duration_seconds_count{method="GET",route="/api/jobs/{job_id}"} 2.0' in text
    assert job_id not in text


async def test_openapi_documents_the_routes_and_the_spec(gateway) -> None:
    assert (await gateway.client.get("/docs")).status_code == 200
    document = (await gateway.client.get("/openapi.json")).json()
    for path in ("/api/train", "/api/jobs/{job_id}/events", "/api/settings/runpod-key", "/api/models"):
        assert path in document["paths"]
    train_body = document["paths"]["/api/train"]["post"]["requestBody"]["content"]["application/json"]
    assert "training_data" in train_body["schema"]["properties"]
    assert "TrainingExample" in document["components"]["schemas"]


async def test_models_catalog(gateway) -> None:
    assert (await gateway.client.get("/api/models")).status_code == 401
    headers = await gateway.sign_in("alice")
    models = (await gateway.client.get("/api/models", headers=headers)).json()["models"]
    by_id = {model["id"]: model for model in models}
    tiny = by_id["local/tiny-llama"]
    assert set(tiny["prices"]) == {"hosted", "runpod"}
    assert tiny["prices"]["hosted"]["provider"] == "local"
    assert tiny["prices"]["runpod"]["usd_per_second"] > 0
    assert any(model["params_b"] >= 12 for model in models)


async def test_estimate_passes_the_spec_and_returns_both_backends(gateway, upstream, make_spec) -> None:
    headers = await gateway.sign_in("alice")
    response = await gateway.client.post("/api/estimate", json=make_spec(), headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert body["active_backend"] == "hosted"
    assert [estimate["backend"] for estimate in body["estimates"]] == ["hosted", "runpod"]
    assert body["estimates"][1]["estimated_cost_usd"] == pytest.approx(0.0684)
    assert body["estimates"][1]["notes"] == ["includes a cold start"]
    assert body["notes"] == ["modal is not configured on this deployment"]
    assert upstream.scheduler.estimate_requests[-1].user_id == "local:alice"


async def test_dashboard_files_when_present_and_a_message_when_not(tmp_path: Path) -> None:
    settings = Settings.load(auth_mode="local")
    missing = create_app(settings, dashboard_dir=tmp_path / "absent")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(missing), base_url="http://t") as client:
        response = await client.get("/")
        assert response.status_code == 404 and "/docs" in response.json()["detail"]
        assert (await client.get("/static/app.js")).status_code == 404

    (tmp_path / "static").mkdir()
    (tmp_path / "index.html").write_text("<h1>dashboard</h1>")
    (tmp_path / "static" / "app.js").write_text("console.log(1)")
    present = create_app(settings, dashboard_dir=tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(present), base_url="http://t") as client:
        index = await client.get("/")
        assert index.status_code == 200 and "<h1>dashboard</h1>" in index.text
        assert (await client.get("/static/app.js")).text == "console.log(1)"
        assert (await client.get("/static/../index.html")).status_code == 404


def test_bad_settings_name_the_variable() -> None:
    cases = {
        "GATEWAY_PORT": {"gateway_port": 70000},
        "SCHEDULER_ADDR": {"scheduler_addr": "no-port"},
        "JWT_ISSUER": {"auth_mode": "jwt", "jwt_secret": "s" * 40, "jwt_audience": "a"},
        "JWT_SECRET or JWT_JWKS_URL": {"auth_mode": "jwt"},
        "JWT_SECRET": {"jwt_secret": "short"},
        "AUTH_MODE": {"auth_mode": "none"},
    }
    for variable, values in cases.items():
        with pytest.raises(SettingsError, match=variable):
            Settings.load(**values)


def test_entry_point_refuses_a_bad_value() -> None:
    env = {**os.environ, "GATEWAY_MAX_BODY_BYTES": "lots"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "GATEWAY_MAX_BODY_BYTES" in done.stderr


async def test_a_request_before_the_channels_open_is_a_503_not_a_crash() -> None:
    """Without its lifespan (ASGITransport runs none) the app has no upstream channels: a route
    that needs them answers 503 saying so, where it once failed an assert (a 500)."""
    app = create_app(Settings.load(auth_mode="local"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        token = (await client.post("/api/auth/local", json={"username": "early"})).json()["access_token"]
        answer = await client.get("/api/jobs", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 503
    assert answer.json() == {
        "detail": "The gateway is not connected to the scheduler and key vault yet; try again in a moment"
    }
