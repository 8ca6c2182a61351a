"""compute-modal over gRPC against the in-process Modal running the real pipeline on the tiny model."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import grpc
import modal.exception
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from compute_modal.config import Settings
from compute_modal.inprocess import RESULT_RETENTION_S, InProcessModal, load_worker_app
from compute_modal.provider import WAITING_FOR_GPU, ModalProvider
from compute_modal.server import SERVICE_NAME, start_service
from gpu_core.schemas import DEFAULT_LIMITS, STAGES, ExperimentResult
from influence.v1 import common_pb2, compute_pb2
from service_runtime.settings import SettingsError

pytestmark = pytest.mark.timeout(120)
Spec = Callable[..., dict[str, Any]]


def submit_request(job_id: str, spec: dict[str, Any]) -> compute_pb2.SubmitRequest:
    return compute_pb2.SubmitRequest(
        job_id=job_id,
        account=common_pb2.Account(user_id="u1", hosted=True),
        spec_json=json.dumps(spec).encode(),
    )


async def status(h: Any, call_id: str, job_id: str, cursor: str = "") -> compute_pb2.GetStatusResponse:
    return await h.stub.GetStatus(
        compute_pb2.GetStatusRequest(provider_job_id=call_id, job_id=job_id, cursor=cursor)
    )


async def test_spawn_progress_and_result(harness: Any, make_spec: Spec) -> None:
    submitted = await harness.stub.Submit(submit_request("job-ok", make_spec()))
    call_id = submitted.provider_job_id
    assert call_id.startswith("fc-")
    # A resubmit of the same job id does not spawn a second call.
    again = await harness.stub.Submit(submit_request("job-ok", make_spec()))
    assert again.provider_job_id == call_id

    assert await harness.adapter.wait(call_id, timeout=100)
    assert harness.adapter.progress["job-ok"]["state"] == "completed"
    first = await status(harness, call_id, "job-ok", cursor="2")
    assert first.state == common_pb2.JOB_STATE_COMPLETED and first.result_ready
    assert len(first.events) == int(first.cursor) - 2  # only the events after the cursor
    stages = [e.stage for e in first.events]
    assert {"training", "influence"} <= set(stages) <= set(STAGES)
    assert all(e.time.seconds > 0 and json.loads(e.event_json)["stage"] == e.stage for e in first.events)
    # The finished job's progress entry is gone once read; the result stays readable.
    assert "job-ok" not in harness.adapter.progress

    result = await harness.stub.GetResult(
        compute_pb2.GetResultRequest(provider_job_id=call_id, job_id="job-ok")
    )
    parsed = ExperimentResult.model_validate_json(result.result_json)
    assert parsed.influence.method == "tracin" and len(parsed.influence.train_ids) == 6
    again_result = await harness.stub.GetResult(compute_pb2.GetResultRequest(provider_job_id=call_id))
    assert again_result.result_json == result.result_json


async def test_running_job_reports_progress_then_cancel_stops_it(harness: Any, make_spec: Spec) -> None:
    call_id = (await harness.stub.Submit(submit_request("job-cancel", make_spec(epochs=50)))).provider_job_id
    assert await asyncio.to_thread(harness.body_started.wait, 100)
    assert await asyncio.to_thread(harness.store_view().training.wait, 100)

    running = await status(harness, call_id, "job-cancel")
    assert running.state == common_pb2.JOB_STATE_RUNNING and not running.result_ready
    assert running.events and running.cursor != ""
    later = await status(harness, call_id, "job-cancel", cursor=running.cursor)
    assert int(later.cursor) >= int(running.cursor)

    cancelled = await harness.stub.Cancel(
        compute_pb2.CancelRequest(provider_job_id=call_id, job_id="job-cancel")
    )
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    assert await harness.adapter.wait(call_id, timeout=100)
    # The body saw InputCancellation, recorded it and let it propagate; Modal answers RemoteError.
    assert harness.adapter.progress["job-cancel"]["state"] == "cancelled"
    with pytest.raises(modal.exception.RemoteError):
        await harness.adapter.get(call_id)
    assert not [t for t in threading.enumerate() if t.name == "gpu_core-experiment"]

    final = await status(harness, call_id, "job-cancel", cursor=running.cursor)
    assert final.state == common_pb2.JOB_STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await harness.stub.GetResult(compute_pb2.GetResultRequest(provider_job_id=call_id))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "terminated" in error.value.details()


async def test_queued_job_is_submitted_and_can_be_cancelled_before_it_starts(
    harness: Any, make_spec: Spec
) -> None:
    harness.gate.clear()  # no GPU container yet
    call_id = (await harness.stub.Submit(submit_request("job-queued", make_spec()))).provider_job_id
    waiting = await status(harness, call_id, "job-queued")
    assert waiting.state == common_pb2.JOB_STATE_SUBMITTED
    assert waiting.stage_message == WAITING_FOR_GPU and not waiting.events
    await harness.stub.Cancel(compute_pb2.CancelRequest(provider_job_id=call_id, job_id="job-queued"))
    harness.gate.set()
    assert await harness.adapter.wait(call_id, timeout=30)
    assert harness.store_view() is None  # the body never ran
    final = await status(harness, call_id, "job-queued")
    assert final.state == common_pb2.JOB_STATE_CANCELLED


async def test_remote_failure_then_expired_result(harness: Any, make_spec: Spec) -> None:
    # 4-bit needs bitsandbytes on CUDA: the real pipeline fails while loading the model.
    call_id = (
        await harness.stub.Submit(submit_request("job-fail", make_spec(quantization="4bit")))
    ).provider_job_id
    assert await harness.adapter.wait(call_id, timeout=100)
    failed = await status(harness, call_id, "job-fail")
    assert failed.state == common_pb2.JOB_STATE_FAILED
    assert "QuantizationUnavailableError" in failed.error and "4bit" in failed.error
    # It crossed as plain words: compute-modal has no torch to rebuild a pickled exception with.
    outcome = await harness.adapter.get(call_id)
    assert set(outcome) == {"error", "usage"} and outcome["error"] == failed.error
    # The function's own timing of the failed run is the job's usage (priced by the scheduler).
    assert failed.usage.source == "Modal function wall time" and failed.usage.gpu_seconds > 0
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await harness.stub.GetResult(compute_pb2.GetResultRequest(provider_job_id=call_id))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    harness.clock.now += RESULT_RETENTION_S + 1
    for call in (
        status(harness, call_id, "job-fail"),
        harness.stub.GetResult(compute_pb2.GetResultRequest(provider_job_id=call_id)),
        status(harness, "fc-unknown", "job-x"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "kept 7 days" in error.value.details()


async def test_bad_requests_are_named(harness: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await harness.stub.Submit(compute_pb2.SubmitRequest(job_id="j", spec_json=b'{"training_data": []}'))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "training_data" in error.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await status(harness, "fc-x", "j", cursor="abc")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cursor" in error.value.details()


async def test_specs_over_the_default_size_limits_are_accepted(harness: Any, make_spec: Spec) -> None:
    # The gateway enforces the operator's (possibly raised) size limits; a provider refuses none.
    spec = make_spec()
    spec["training_data"][0]["prompt"] = "x" * (DEFAULT_LIMITS.max_text_chars + 1)
    estimate = await harness.stub.Estimate(
        compute_pb2.EstimateRequest(spec_json=json.dumps(spec).encode(), backend="hosted")
    )
    assert estimate.estimate.provider == "modal"
    harness.gate.clear()  # accepted and queued; the body never runs
    call_id = (await harness.stub.Submit(submit_request("job-large", spec))).provider_job_id
    assert call_id.startswith("fc-")
    await harness.stub.Cancel(compute_pb2.CancelRequest(provider_job_id=call_id, job_id="job-large"))
    harness.gate.set()
    assert await harness.adapter.wait(call_id, timeout=30)
    # The worker reads the payload the same way (the job is not started here).
    load_worker_app().job_events(spec).close()


async def test_an_invalid_spec_is_named_without_echoing_its_values(harness: Any, make_spec: Spec) -> None:
    spec = make_spec(epochs="sk-live-do-not-echo")
    spec_json = json.dumps(spec).encode()
    for call in (
        harness.stub.Submit(compute_pb2.SubmitRequest(job_id="j", spec_json=spec_json)),
        harness.stub.Estimate(compute_pb2.EstimateRequest(spec_json=spec_json, backend="hosted")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        details = error.value.details()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hyperparams.epochs" in details
        assert "sk-live-do-not-echo" not in details and "input_value" not in details


async def test_estimates_count_shards_by_the_functions_max_containers(harness: Any, make_spec: Spec) -> None:
    """The deployed function runs at most MODAL_MAX_CONTAINERS containers at once: 16 shards on 3
    take more rounds, so more wall time, than on the default 8; the estimate says which."""
    spec = make_spec() | {
        "training_data": [{"prompt": f"{i} plus one is ", "completion": str(i + 1)} for i in range(20_000)],
        "influence_method": "trackstar",
        "influence": {"shards": 16},
    }
    spec_json = json.dumps(spec).encode()
    default = (
        await harness.stub.Estimate(compute_pb2.EstimateRequest(spec_json=spec_json, backend="hosted"))
    ).estimate
    capped = ModalProvider(
        InProcessModal(), "influence-dashboard", "run_experiment_job", "main", max_containers=3
    ).estimate(spec_json, "hosted")
    assert (default.parallel_jobs, capped.parallel_jobs) == (8, 3)
    assert capped.estimated_time_s > default.estimated_time_s
    assert capped.gpu_seconds == pytest.approx(default.gpu_seconds)
    for bad in ("0", "65", "many"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MODAL_MAX_CONTAINERS", bad)
            with pytest.raises(SettingsError, match="MODAL_MAX_CONTAINERS"):
                Settings.load()


async def test_estimate_uses_modal_prices(harness: Any, make_spec: Spec) -> None:
    # Default hyperparameters (seq 256, batch 8): a 12B model in 4-bit fits the 16 GB class (its
    # required memory within the GPU's, priced as gpu_core.runtime runs it).
    spec = make_spec() | {"model_id": "google/gemma-3-12b", "hyperparams": {"quantization": "4bit"}}
    response = await harness.stub.Estimate(
        compute_pb2.EstimateRequest(spec_json=json.dumps(spec).encode(), backend="hosted")
    )
    estimate = response.estimate
    assert (estimate.provider, estimate.backend) == ("modal", "hosted")
    assert estimate.gpu_memory_gb >= 16 and estimate.prices_as_of
    assert (
        0.9 * estimate.gpu_memory_gb >= estimate.required_memory_gb > 8
    )  # 4-bit 12B weights alone are ~8 GB
    assert estimate.estimated_cost_usd == pytest.approx(
        estimate.estimated_time_s * estimate.usd_per_second, abs=1e-6
    )


async def test_ready_and_verified_with_a_deployed_app(harness: Any) -> None:
    await asyncio.wait_for(harness.service.readiness.checked.wait(), 10)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{harness.service.port}")
    health = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    )
    await channel.close()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    verified = await harness.stub.VerifyCredentials(compute_pb2.VerifyCredentialsRequest())
    assert verified.valid and "deployed" in verified.message


async def test_missing_token_is_a_clear_error_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, make_spec: Spec
) -> None:
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    settings = Settings.load(compute_modal_port=0, compute_modal_metrics_port=-1)
    service = await start_service(settings, registry=CollectorRegistry())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        from influence.v1 import compute_pb2_grpc

        stub = compute_pb2_grpc.ComputeProviderStub(channel)
        verified = await stub.VerifyCredentials(compute_pb2.VerifyCredentialsRequest())
        assert not verified.valid and "MODAL_TOKEN_ID" in verified.message
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Submit(submit_request("job-1", make_spec()))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET" in error.value.details()
        await asyncio.wait_for(service.readiness.checked.wait(), 10)
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        )
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await channel.close()
        await service.stop()


# Same start/connect/close frame as the missing-token test above: each checks a different
# failure's messages and status, which are the point of the test, so they stay inline.
async def test_undeployed_app_is_a_clear_error(make_spec: Spec) -> None:
    settings = Settings.load(compute_modal_port=0, compute_modal_metrics_port=-1)
    service = await start_service(settings, InProcessModal(deployed=False), registry=CollectorRegistry())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        from influence.v1 import compute_pb2_grpc

        stub = compute_pb2_grpc.ComputeProviderStub(channel)
        verified = await stub.VerifyCredentials(compute_pb2.VerifyCredentialsRequest())
        assert not verified.valid and "make modal-deploy" in verified.message
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Submit(submit_request("job-1", make_spec()))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not deployed" in error.value.details()
    finally:
        await channel.close()
        await service.stop()


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPUTE_MODAL_PORT", "99999")
    with pytest.raises(SettingsError, match="COMPUTE_MODAL_PORT"):
        Settings.load()
    monkeypatch.delenv("COMPUTE_MODAL_PORT")
    monkeypatch.setenv("COMPUTE_MODAL_BACKEND", "cloud")
    with pytest.raises(SettingsError, match="COMPUTE_MODAL_BACKEND"):
        Settings.load()


def test_token_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-supersecretvalue")
    settings = Settings.load()
    assert "supersecret" not in repr(settings) and "supersecret" not in str(settings.model_dump())


async def test_each_job_runs_on_the_gpu_its_estimate_priced(harness: Any, make_spec: Spec) -> None:
    """A small and a large catalog model each land on a GPU that fits them, the one their
    estimate priced (Modal's with_options(gpu=...) per call), not one fixed GPU for all."""
    harness.gate.clear()  # queued: the choice of GPU is made at spawn, before any container starts
    small = make_spec() | {"model_id": "Qwen/Qwen2.5-0.5B"}
    large = make_spec() | {"model_id": "google/gemma-3-27b", "hyperparams": {"quantization": "4bit"}}
    placed = {}
    for job_id, spec in (("job-small", small), ("job-large", large)):
        estimate = (
            await harness.stub.Estimate(
                compute_pb2.EstimateRequest(spec_json=json.dumps(spec).encode(), backend="hosted")
            )
        ).estimate
        call_id = (await harness.stub.Submit(submit_request(job_id, spec))).provider_job_id
        await harness.stub.Cancel(compute_pb2.CancelRequest(provider_job_id=call_id, job_id=job_id))
        assert harness.adapter.gpus[job_id] == estimate.gpu
        assert estimate.gpu_memory_gb >= estimate.required_memory_gb
        placed[job_id] = estimate
    assert placed["job-small"].gpu_memory_gb < placed["job-large"].gpu_memory_gb
    assert placed["job-small"].usd_per_second < placed["job-large"].usd_per_second
    harness.gate.set()


async def test_the_operators_modal_gpu_overrides_and_prices_every_job(
    harness: Any, make_spec: Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODAL_GPU", "T4")
    harness.gate.clear()
    spec = make_spec() | {"model_id": "google/gemma-3-27b", "hyperparams": {"quantization": "4bit"}}
    estimate = (
        await harness.stub.Estimate(
            compute_pb2.EstimateRequest(spec_json=json.dumps(spec).encode(), backend="hosted")
        )
    ).estimate
    assert (estimate.gpu, estimate.gpu_memory_gb) == ("T4", 16)
    assert any("MODAL_GPU" in note and "run out of GPU memory" in note for note in estimate.notes)
    call_id = (await harness.stub.Submit(submit_request("job-t4", spec))).provider_job_id
    await harness.stub.Cancel(compute_pb2.CancelRequest(provider_job_id=call_id, job_id="job-t4"))
    assert harness.adapter.gpus["job-t4"] == "T4"
    monkeypatch.setenv("MODAL_GPU", "A7")  # not a Modal GPU: named, never a crash
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Submit(submit_request("job-bad-gpu", make_spec()))
    assert "MODAL_GPU='A7'" in (caught.value.details() or "")
    harness.gate.set()
