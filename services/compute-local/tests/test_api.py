"""The ComputeProvider calls that need no experiment run: credentials, account, estimate, health,
metrics and the errors for bad input; plus settings validation."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from compute_local.config import DeviceSlots, Settings
from compute_local.server import SERVICE_NAME, ComputeLocalServer, start_service
from influence.v1 import compute_pb2, compute_pb2_grpc
from service_runtime.settings import SettingsError

SPEC = json.dumps(
    {
        "training_data": [{"prompt": "a", "completion": "b"}],
        "eval_data": [{"prompt": "a", "expected": "b"}],
    }
).encode()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ComputeLocalServer]:
    settings = Settings.load(
        compute_local_port=0,
        compute_local_metrics_port=0,
        compute_local_work_dir=tmp_path / "work",
        compute_local_devices="cpu,cuda:0",
        compute_local_cpu_slots=3,
        compute_local_torch_threads=1,
    )
    running = await start_service(settings, registry=CollectorRegistry())
    yield running
    await running.stop()


# Same shape as keyvault's conftest channel/stub fixtures: each binds its own server type and
# stub class; no test package is shared between the two services.
@pytest.fixture
async def channel(service: ComputeLocalServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> compute_pb2_grpc.ComputeProviderStub:
    return compute_pb2_grpc.ComputeProviderStub(channel)


async def test_readiness_is_serving_once_started(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_needs_no_credentials_and_no_account_setup(
    stub: compute_pb2_grpc.ComputeProviderStub,
) -> None:
    verified = await stub.VerifyCredentials(compute_pb2.VerifyCredentialsRequest(api_key="anything"))
    assert verified.valid and verified.account_id == "local"
    prepared = await stub.PrepareAccount(compute_pb2.PrepareAccountRequest(model_params_b=0.01))
    assert prepared.status == "ready" and not prepared.created


async def test_estimate_is_free_and_labelled_local(stub: compute_pb2_grpc.ComputeProviderStub) -> None:
    response = await stub.Estimate(compute_pb2.EstimateRequest(spec_json=SPEC, backend="hosted"))
    estimate = response.estimate
    assert (estimate.provider, estimate.backend) == ("local", "hosted")
    assert estimate.estimated_cost_usd == 0 and estimate.usd_per_second == 0
    assert estimate.estimated_time_s > 0


async def test_bad_input_gets_invalid_argument_naming_the_problem(
    stub: compute_pb2_grpc.ComputeProviderStub,
) -> None:
    bad_spec = json.dumps({"training_data": [], "eval_data": [{"prompt": "a", "expected": "b"}]}).encode()
    cases = [
        (stub.Submit, compute_pb2.SubmitRequest(job_id="j", spec_json=bad_spec), "training_data"),
        (stub.Submit, compute_pb2.SubmitRequest(job_id="j", spec_json=b"{no"), "invalid experiment spec"),
        (stub.Submit, compute_pb2.SubmitRequest(job_id="", spec_json=SPEC), "job_id"),
        (stub.Submit, compute_pb2.SubmitRequest(job_id="j" * 300, spec_json=SPEC), "job_id"),
        (stub.Estimate, compute_pb2.EstimateRequest(spec_json=SPEC, backend="moon"), "backend"),
        (stub.Estimate, compute_pb2.EstimateRequest(spec_json=bad_spec), "training_data"),
    ]
    for method, request, named in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await method(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in error.value.details()


async def test_unknown_job_is_not_found(stub: compute_pb2_grpc.ComputeProviderStub) -> None:
    calls = [
        stub.GetStatus(compute_pb2.GetStatusRequest(provider_job_id="local-nope")),
        stub.GetStatus(compute_pb2.GetStatusRequest(job_id="never-submitted")),
        stub.GetResult(compute_pb2.GetResultRequest(provider_job_id="local-nope")),
        stub.Cancel(compute_pb2.CancelRequest(provider_job_id="local-nope")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_metrics_endpoint_reports_the_queue(service: ComputeLocalServer) -> None:
    assert service.metrics_port
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{service.metrics_port}/metrics")
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in response.text.splitlines()
        if line.startswith("compute_local_")
    }
    assert samples["compute_local_slots"] == 4  # 3 CPU slots and the GPU's one
    assert samples["compute_local_queue_depth"] == 0
    assert samples["compute_local_running_jobs"] == 0
    assert samples['compute_local_jobs_finished_total{state="failed"}'] == 0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"COMPUTE_LOCAL_DEVICES": "gpu0"}, "COMPUTE_LOCAL_DEVICES"),
        ({"COMPUTE_LOCAL_DEVICES": "cuda:0,cuda:0"}, "COMPUTE_LOCAL_DEVICES"),
        ({"COMPUTE_LOCAL_DEVICES": " , "}, "COMPUTE_LOCAL_DEVICES"),
        ({"COMPUTE_LOCAL_PORT": "70000"}, "COMPUTE_LOCAL_PORT"),
        ({"COMPUTE_LOCAL_METRICS_PORT": "-2"}, "COMPUTE_LOCAL_METRICS_PORT"),
        ({"COMPUTE_LOCAL_TORCH_THREADS": "0"}, "COMPUTE_LOCAL_TORCH_THREADS"),
        ({"COMPUTE_LOCAL_CPU_SLOTS": "0"}, "COMPUTE_LOCAL_CPU_SLOTS"),
        ({"COMPUTE_LOCAL_CPU_SLOTS": "auto"}, "COMPUTE_LOCAL_CPU_SLOTS"),
        ({"COMPUTE_LOCAL_DEVICES": "cuda:0", "COMPUTE_LOCAL_CPU_SLOTS": "2"}, "COMPUTE_LOCAL_CPU_SLOTS"),
        ({"COMPUTE_LOCAL_RESULT_RETENTION_S": "-1"}, "COMPUTE_LOCAL_RESULT_RETENTION_S"),
        ({"COMPUTE_LOCAL_CANCEL_GRACE_S": "soon"}, "COMPUTE_LOCAL_CANCEL_GRACE_S"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
    ],
)
def test_a_bad_setting_names_its_variable(
    env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=named):
        Settings.load()


def test_settings_defaults_and_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings.load()
    assert (defaults.address, defaults.compute_local_metrics_port, defaults.compute_local_devices) == (
        "127.0.0.1:50053",
        9093,
        ("cpu",),
    )
    assert defaults.compute_local_work_dir == Path(".data/compute-local")
    assert defaults.compute_local_result_retention_s == 7 * 24 * 3600
    cores = os.cpu_count() or 1
    # One CPU job at a time, on every core.
    assert defaults.device_slots == (DeviceSlots("cpu", 1, cores),)
    monkeypatch.setenv("COMPUTE_LOCAL_DEVICES", "cuda:0, cuda:1")
    monkeypatch.setenv("COMPUTE_LOCAL_TORCH_THREADS", "3")
    monkeypatch.setenv("COMPUTE_LOCAL_WORK_DIR", "")  # empty means unset
    parsed = Settings.load()
    assert parsed.compute_local_devices == ("cuda:0", "cuda:1")
    assert parsed.device_slots == (DeviceSlots("cuda:0", 1, 3), DeviceSlots("cuda:1", 1, 3))
    assert parsed.compute_local_work_dir == Path(".data/compute-local")


def test_cpu_slots_share_the_cores_and_gpus_keep_one_job(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = os.cpu_count() or 1
    monkeypatch.setenv("COMPUTE_LOCAL_DEVICES", "cpu,cuda:0")
    monkeypatch.setenv("COMPUTE_LOCAL_CPU_SLOTS", "2")
    assert Settings.load().device_slots == (
        DeviceSlots("cpu", 2, max(1, cores // 2)),
        DeviceSlots("cuda:0", 1, cores),
    )
    # More slots than cores: one thread each, never none.
    monkeypatch.setenv("COMPUTE_LOCAL_CPU_SLOTS", str(cores + 1))
    assert Settings.load().device_slots[0] == DeviceSlots("cpu", cores + 1, 1)
    # An explicit thread count is every child's, whatever the slots.
    monkeypatch.setenv("COMPUTE_LOCAL_TORCH_THREADS", "5")
    assert {d.threads for d in Settings.load().device_slots} == {5}
