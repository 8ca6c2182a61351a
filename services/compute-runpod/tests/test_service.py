"""compute-runpod over gRPC against the fake RunPod, with keys from the real keyvault."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from runpod_testkit import SMALL_SPEC, Stack, new_key, spec_bytes

import cost_model
from compute_runpod.config import Settings
from compute_runpod.provider import WAITING_FOR_GPU
from compute_runpod.server import start_server
from gpu_core.schemas import ExperimentResult
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc

PRICES = cost_model.price_table("runpod")


def new_key_with(stack: Stack, balance: float) -> str:
    key = new_key()
    stack.fake.add_key(key, balance=balance)
    return key


HOSTED = common_pb2.Account(user_id="operator-tier-user", hosted=True)


def hosted_submit(job_id: str, **spec_changes: Any) -> compute_pb2.SubmitRequest:
    """A Submit of the small spec (with ``spec_changes``) on the operator's hosted account."""
    return compute_pb2.SubmitRequest(job_id=job_id, account=HOSTED, spec_json=spec_bytes(**spec_changes))


def user(user_id: str = "u1", endpoint_id: str = "") -> common_pb2.Account:
    return common_pb2.Account(user_id=user_id, endpoint_id=endpoint_id, hosted=False)


async def rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# ---- credentials ---------------------------------------------------------------------------


async def test_verify_key_being_saved(stack: Stack) -> None:
    answer = await stack.stub.VerifyCredentials(
        compute_pb2.VerifyCredentialsRequest(account=user(), api_key=stack.user_key)
    )
    assert answer.valid and answer.balance_usd == 50.0 and answer.account_id
    assert stack.user_key not in answer.message
    myself = stack.fake.calls("graphql")
    assert [c.headers["authorization"] for c in myself] == [f"Bearer {stack.user_key}"]


async def test_verify_stored_key_from_keyvault(stack: Stack) -> None:
    await stack.store_key("u-stored", stack.user_key)
    answer = await stack.stub.VerifyCredentials(
        compute_pb2.VerifyCredentialsRequest(account=user("u-stored"))
    )
    assert answer.valid and answer.balance_usd == 50.0


async def test_verify_without_stored_key_says_so(stack: Stack) -> None:
    error = await rpc_error(
        stack.stub.VerifyCredentials(compute_pb2.VerifyCredentialsRequest(account=user("nobody")))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "No RunPod API key is saved" in error.details()


async def verify(stack: Stack, key: str) -> compute_pb2.VerifyCredentialsResponse:
    request = compute_pb2.VerifyCredentialsRequest(account=user(), api_key=key)
    return await stack.stub.VerifyCredentials(request)


def assert_refused(answer: compute_pb2.VerifyCredentialsResponse, failure: int) -> None:
    """A refused key is an answer, not an error: valid=false, the reason typed, no balance."""
    assert not answer.valid
    assert answer.failure == failure
    assert (answer.account_id, answer.balance_usd) == ("", 0.0)


async def test_verify_invalid_key(stack: Stack) -> None:
    bad = new_key()
    answer = await verify(stack, bad)
    assert_refused(answer, common_pb2.KEY_FAILURE_INVALID)
    assert answer.message == "Invalid RunPod API key"
    assert stack.fake.calls("serverless.list")[0].status == 401  # REST v2 decides validity
    assert stack.fake.calls("graphql") == []


async def test_key_valid_while_graphql_is_gone_is_accepted_with_a_balance_note(stack: Stack) -> None:
    stack.fake.graphql_enabled = False  # RunPod retires GraphQL in early 2027
    answer = await stack.stub.VerifyCredentials(
        compute_pb2.VerifyCredentialsRequest(account=user(), api_key=stack.user_key)
    )
    assert answer.valid and answer.balance_usd < 0
    assert "balance could not be read" in answer.message and "HTTP 410" in answer.message
    assert "execution timeout (2 h)" in answer.message
    assert [c.status for c in stack.fake.calls("serverless.list")] == [200]
    stack.fake.set_throttled(True)  # what is checked is the submission: no worker needs to start
    # Submitting skips the balance check it cannot make; the execution timeout still applies.
    submitted = await stack.stub.Submit(hosted_submit("job-nographql"))
    assert stack.fake.job(submitted.provider_job_id).execution_timeout_s == 7200
    poor = new_key()
    stack.fake.add_key(poor, balance=0.25)
    await stack.store_key("u-unknown-balance", poor)
    prepared = await stack.stub.PrepareAccount(
        compute_pb2.PrepareAccountRequest(account=user("u-unknown-balance"))
    )
    await stack.stub.Submit(
        compute_pb2.SubmitRequest(
            job_id="job-nographql-byok",
            account=user("u-unknown-balance", prepared.endpoint_id),
            spec_json=spec_bytes(),
            estimated_cost_usd=1.5,
        )
    )
    assert len([c for c in stack.fake.calls("job.run") if c.status == 200]) == 2


async def test_verify_key_lacking_scope(stack: Stack) -> None:
    restricted = new_key()
    stack.fake.add_key(restricted, balance=20.0, scope="restricted")
    answer = await verify(stack, restricted)
    assert_refused(answer, common_pb2.KEY_FAILURE_NO_PERMISSION)
    assert "GraphQL" in answer.message and "serverless Read/Write" in answer.message
    assert restricted not in answer.message


async def test_verify_zero_balance(stack: Stack) -> None:
    broke = new_key()
    stack.fake.add_key(broke, balance=0.0)
    answer = await verify(stack, broke)
    assert_refused(answer, common_pb2.KEY_FAILURE_NO_FUNDS)
    assert answer.message == "Your RunPod balance is $0; add credits at runpod.io"


async def test_verify_while_runpod_fails_says_it_could_not_be_reached(stack: Stack) -> None:
    stack.fake.fail_next("serverless.list", 503, times=4)  # every attempt (RUNPOD_MAX_ATTEMPTS)
    answer = await verify(stack, stack.user_key)
    assert_refused(answer, common_pb2.KEY_FAILURE_UNREACHABLE)
    assert "RunPod answered with a server error (HTTP 503)" in answer.message
    assert [c.status for c in stack.fake.calls("serverless.list")] == [503] * 4
    assert stack.user_key not in answer.message
    # RunPod back: the same key is valid.
    assert (await verify(stack, stack.user_key)).valid


async def test_verify_when_runpod_cannot_be_reached_at_all(
    stack: Stack, make_settings: Callable[..., Settings]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    server = await start_server(
        make_settings(
            runpod_rest_base_url=f"http://127.0.0.1:{closed}/v2",
            runpod_max_attempts=1,
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            answer = await compute_pb2_grpc.ComputeProviderStub(channel).VerifyCredentials(
                compute_pb2.VerifyCredentialsRequest(account=user(), api_key=stack.user_key)
            )
    finally:
        await server.stop()
    assert_refused(answer, common_pb2.KEY_FAILURE_UNREACHABLE)
    assert "RunPod" in answer.message and stack.user_key not in answer.message


# ---- the endpoint --------------------------------------------------------------------------


async def test_endpoint_created_once_then_reused(stack: Stack) -> None:
    await stack.store_key("u-ep", stack.user_key)
    request = compute_pb2.PrepareAccountRequest(account=user("u-ep"))
    first, second = await asyncio.gather(
        stack.stub.PrepareAccount(request), stack.stub.PrepareAccount(request)
    )
    assert first.endpoint_id == second.endpoint_id
    assert sorted([first.created, second.created]) == [False, True]
    creates = stack.fake.calls("serverless.create")
    assert len(creates) == 1
    (endpoint,) = [e for e in stack.fake.endpoints() if e["id"] == first.endpoint_id]
    assert endpoint["name"] == "influence-dashboard" and endpoint["type"] == "QUEUE"
    assert endpoint["templateId"] == "influence-template"
    assert endpoint["gpu"]["pools"] == ["AMPERE_80"]
    assert endpoint["workers"] == {"min": 0, "max": 1, "idleTimeout": 300}
    assert endpoint["scaling"]["type"] == "QUEUE_DELAY"
    assert endpoint["timeout"] == 7_200_000 and endpoint["flashboot"] == "FLASHBOOT"

    again = await stack.stub.PrepareAccount(
        compute_pb2.PrepareAccountRequest(account=user("u-ep", first.endpoint_id))
    )
    assert (again.endpoint_id, again.created, again.status) == (first.endpoint_id, False, "ready")
    assert len(stack.fake.calls("serverless.create")) == 1


async def test_endpoint_recreated_after_deletion(stack: Stack) -> None:
    await stack.store_key("u-del", stack.user_key)
    first = await stack.stub.PrepareAccount(compute_pb2.PrepareAccountRequest(account=user("u-del")))
    stack.fake.delete_endpoint(first.endpoint_id)
    second = await stack.stub.PrepareAccount(
        compute_pb2.PrepareAccountRequest(account=user("u-del", first.endpoint_id))
    )
    assert second.created and second.endpoint_id != first.endpoint_id
    assert [c.status for c in stack.fake.calls("serverless.get")] == [404]


async def test_every_fitting_pool_cheapest_first(stack: Stack) -> None:
    await stack.store_key("u-big", stack.user_key)
    answer = await stack.stub.PrepareAccount(
        compute_pb2.PrepareAccountRequest(account=user("u-big"), model_params_b=70.0, quantization="none")
    )
    (endpoint,) = [e for e in stack.fake.endpoints() if e["id"] == answer.endpoint_id]
    assert endpoint["gpu"]["pools"] == ["HOPPER_141", "BLACKWELL_180"]
    await stack.store_key("u-small", new_key_with(stack, 50.0))
    small = await stack.stub.PrepareAccount(
        compute_pb2.PrepareAccountRequest(account=user("u-small"), model_params_b=7.0, quantization="none")
    )
    (endpoint,) = [e for e in stack.fake.endpoints() if e["id"] == small.endpoint_id]
    pools = endpoint["gpu"]["pools"]
    assert len(pools) > 2 and "AMPERE_16" not in pools
    prices = [PRICES.gpus[pool].usd_per_second for pool in pools]
    assert prices == sorted(prices)


async def test_the_endpoint_pools_start_at_the_gpu_the_estimate_priced(stack: Stack) -> None:
    # The scheduler sends the spec's model id; every catalog model (in its default quantization)
    # is routed to pools that start at the very GPU class its estimate priced.
    for index, card in enumerate(cost_model.model_cards()):
        user_id = f"u-model-{index}"
        await stack.store_key(user_id, new_key_with(stack, 50.0))
        answer = await stack.stub.PrepareAccount(
            compute_pb2.PrepareAccountRequest(
                account=user(user_id), model_id=card.id, quantization=card.default_quantization
            )
        )
        (endpoint,) = [e for e in stack.fake.endpoints() if e["id"] == answer.endpoint_id]
        pools = endpoint["gpu"]["pools"]
        spec = spec_bytes(model_id=card.id, hyperparams={"quantization": card.default_quantization})
        estimate = (
            await stack.stub.Estimate(compute_pb2.EstimateRequest(spec_json=spec, backend="runpod"))
        ).estimate
        assert estimate.gpu in pools, card.id
        assert min(PRICES.gpus[pool].memory_gb for pool in pools) == estimate.gpu_memory_gb, card.id


async def test_a_new_template_reaches_the_existing_endpoint(
    stack: Stack, make_settings: Callable[..., Settings]
) -> None:
    await stack.store_key("u-tpl", stack.user_key)
    first = await stack.stub.PrepareAccount(compute_pb2.PrepareAccountRequest(account=user("u-tpl")))
    stack.fake.add_template("influence-template-v2", image="influence/worker:2.0", env={"A": "1"})
    upgraded = await start_server(make_settings(runpod_template_id="influence-template-v2"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{upgraded.port}") as channel:
            stub = compute_pb2_grpc.ComputeProviderStub(channel)
            request = compute_pb2.PrepareAccountRequest(account=user("u-tpl", first.endpoint_id))
            again = await stub.PrepareAccount(request)
            assert (again.endpoint_id, again.created) == (first.endpoint_id, False)
            (endpoint,) = [e for e in stack.fake.endpoints() if e["id"] == first.endpoint_id]
            assert endpoint["image"] == "influence/worker:2.0"
            assert endpoint["env"] == {"A": "1", "INFLUENCE_TEMPLATE_ID": "influence-template-v2"}
            await stub.PrepareAccount(request)  # already on it: nothing more to change
    finally:
        await upgraded.stop()
    assert [c.status for c in stack.fake.calls("serverless.update")] == [200]
    assert len(stack.fake.calls("serverless.create")) == 1


# ---- jobs ----------------------------------------------------------------------------------


async def test_job_on_users_account_streams_progress_and_result(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await stack.store_key("u-job", stack.user_key)
    prepared = await stack.stub.PrepareAccount(compute_pb2.PrepareAccountRequest(account=user("u-job")))
    account = user("u-job", prepared.endpoint_id)
    # No GPU at first: the researcher is told the job waits for a worker.
    stack.fake.set_throttled(True)
    submit = compute_pb2.SubmitRequest(
        job_id="job-1",
        account=account,
        spec_json=spec_bytes(),
        estimated_cost_usd=0.5,
    )
    submitted = await stack.stub.Submit(submit)
    queued = await stack.stub.GetStatus(
        compute_pb2.GetStatusRequest(
            provider_job_id=submitted.provider_job_id,
            account=account,
        )
    )
    assert queued.state == common_pb2.JOB_STATE_SUBMITTED
    assert queued.stage_message == WAITING_FOR_GPU
    stack.fake.set_throttled(False)

    final, events, _ = await stack.wait_terminal(submitted.provider_job_id, account)
    assert final.state == common_pb2.JOB_STATE_COMPLETED and final.result_ready, final.error
    stages = [e.stage for e in events]
    assert stages[0] == "loading_model" and "training" in stages and "influence" in stages
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] > 0.9
    assert all(json.loads(e.event_json)["type"] == "progress" for e in events)

    result = await stack.stub.GetResult(
        compute_pb2.GetResultRequest(
            provider_job_id=submitted.provider_job_id,
            account=account,
        )
    )
    parsed = ExperimentResult.model_validate_json(result.result_json)
    assert parsed.influence.train_ids == ["t1", "t2", "t3", "t4"]

    (run_call,) = stack.fake.calls("job.run")
    assert run_call.status == 200
    job = stack.fake.job(submitted.provider_job_id)
    assert (
        job is not None
        and job.input["training_data"][0]["prompt"] == (SMALL_SPEC["training_data"][0]["prompt"])
    )
    assert job.execution_timeout_s == 7200

    # A resubmission of the same scheduler job is not sent to RunPod again.
    again = await stack.stub.Submit(submit)
    assert again.provider_job_id == submitted.provider_job_id
    assert len(stack.fake.calls("job.run")) == 1

    # RunPod keeps results for a limited time; afterwards the error says so.
    stack.fake.retention_s = 0.0
    error = await rpc_error(
        stack.stub.GetResult(
            compute_pb2.GetResultRequest(
                provider_job_id=submitted.provider_job_id,
                account=account,
            )
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "30 minutes" in error.details()

    logged = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert stack.user_key not in logged and "runpod job submitted" in logged


@pytest.fixture
def service_overrides(request: pytest.FixtureRequest) -> dict[str, object]:
    return getattr(request, "param", {})


@pytest.mark.parametrize("service_overrides", [{"runpod_queue_timeout_s": 0.2}], indirect=True)
async def test_no_gpu_gives_plain_message_and_cancels(stack: Stack) -> None:
    stack.fake.set_throttled(True)
    submitted = await stack.stub.Submit(hosted_submit("job-nogpu"))
    final, _, _ = await stack.wait_terminal(submitted.provider_job_id, HOSTED, limit_s=30)
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert final.error.startswith("No GPU available on RunPod: none was free in the pools tried (AMPERE_80)")
    assert "nothing was billed" in final.error and "hosted backend" in final.error
    assert stack.fake.calls("serverless.workers")
    assert stack.fake.job(submitted.provider_job_id).status == "CANCELLED"


@pytest.mark.parametrize(
    "service_overrides", [{"runpod_no_gpu_notice_s": 0, "runpod_queue_check_interval_s": 60}], indirect=True
)
async def test_a_job_waiting_for_a_gpu_says_so_with_the_pools_tried(stack: Stack) -> None:
    stack.fake.set_throttled(True)
    submitted = await stack.stub.Submit(hosted_submit("job-waits"))
    for _ in range(3):
        answer = await stack.get_status(submitted.provider_job_id, HOSTED, "")
        assert answer.state == common_pb2.JOB_STATE_SUBMITTED
        assert answer.stage_message.startswith("No GPU free on RunPod in the pools tried (AMPERE_80) for ")
        assert "hosted backend" in answer.stage_message
    # RunPod's rate-limited REST API is asked once per check interval, not on every poll.
    assert len(stack.fake.calls("serverless.workers")) == 1
    stack.fake.set_throttled(False)
    await stack.stub.Cancel(
        compute_pb2.CancelRequest(provider_job_id=submitted.provider_job_id, account=HOSTED)
    )


async def test_execution_timeout_gives_plain_message(stack: Stack) -> None:
    stack.fake.execution_timeout_s = 0.0
    submitted = await stack.stub.Submit(hosted_submit("job-timeout"))
    final, _, _ = await stack.wait_terminal(submitted.provider_job_id, HOSTED, limit_s=120)
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert final.error.startswith("The job exceeded its execution timeout (7200 s)")


async def test_low_balance_is_refused_and_nothing_submitted(stack: Stack) -> None:
    poor = new_key()
    stack.fake.add_key(poor, balance=0.25)
    await stack.store_key("u-poor", poor)
    prepared = await stack.stub.PrepareAccount(compute_pb2.PrepareAccountRequest(account=user("u-poor")))
    error = await rpc_error(
        stack.stub.Submit(
            compute_pb2.SubmitRequest(
                job_id="job-poor",
                account=user("u-poor", prepared.endpoint_id),
                spec_json=spec_bytes(),
                estimated_cost_usd=1.5,
            )
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "$0.25" in error.details() and "$1.50" in error.details()
    assert stack.fake.calls("job.run") == []


async def test_rate_limit_storm_then_one_submission_and_cancel(stack: Stack) -> None:
    stack.fake.set_throttled(True)  # cancelled while queued: no worker needs to start
    stack.fake.fail_next("job.run", 429, times=2, retry_after=0.3)
    started = time.monotonic()
    submitted = await stack.stub.Submit(hosted_submit("job-429"))
    assert time.monotonic() - started >= 0.6  # Retry-After honoured twice
    assert [c.status for c in stack.fake.calls("job.run")] == [429, 429, 200]
    assert stack.fake.job(submitted.provider_job_id) is not None

    cancelled = await stack.stub.Cancel(
        compute_pb2.CancelRequest(
            provider_job_id=submitted.provider_job_id,
            account=HOSTED,
        )
    )
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    assert stack.fake.job(submitted.provider_job_id).status == "CANCELLED"
    status = await stack.stub.GetStatus(
        compute_pb2.GetStatusRequest(
            provider_job_id=submitted.provider_job_id,
            account=HOSTED,
        )
    )
    assert status.state == common_pb2.JOB_STATE_CANCELLED


async def test_cancel_stops_the_gpu_work_mid_training(stack: Stack) -> None:
    """/cancel -> the SDK's stop channel -> the handler is cancelled between yields -> gpu_core
    stops at its next batch; the SDK logs "Job stopped." only after the handler has returned,
    which it does once the experiment thread has ended."""
    submitted = await stack.stub.Submit(
        hosted_submit("job-stop", hyperparams={**SMALL_SPEC["hyperparams"], "epochs": 100})
    )
    job_id, cursor = submitted.provider_job_id, ""
    async with asyncio.timeout(180):
        while True:
            answer = await stack.get_status(job_id, HOSTED, cursor)
            cursor = answer.cursor
            if any(e.stage == "training" and json.loads(e.event_json).get("step") for e in answer.events):
                break
    await stack.stub.Cancel(compute_pb2.CancelRequest(provider_job_id=job_id, account=HOSTED))
    async with asyncio.timeout(60):
        while "Job stopped." not in stack.fake.worker_log(stack.hosted_endpoint):
            await asyncio.sleep(0.2)
    assert [c.status for c in stack.fake.calls("worker.stop") if c.status == 200] == [200]
    assert stack.fake.calls("worker.done") == []  # nothing posted for a stopped job
    assert stack.fake.job(job_id).status == "CANCELLED"


async def test_rate_limit_that_does_not_end_is_resource_exhausted(stack: Stack) -> None:
    stack.fake.fail_next("job.run", 429, times=10, retry_after=0)
    error = await rpc_error(stack.stub.Submit(hosted_submit("job-429x")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(stack.fake.calls("job.run")) == 4  # RUNPOD_MAX_ATTEMPTS
    assert stack.fake.calls("job.run", method="POST")[-1].status == 429


async def test_server_errors_retried_only_where_safe(stack: Stack) -> None:
    stack.fake.fail_next("job.run", 502)
    error = await rpc_error(stack.stub.Submit(hosted_submit("job-502")))
    assert error.code() == grpc.StatusCode.UNKNOWN  # reconciled by the scheduler, not retried
    assert "not sent again" in error.details()
    assert len(stack.fake.calls("job.run")) == 1  # /run is never repeated after a 5xx

    stack.fake.fail_next("graphql", 503, times=2)
    answer = await stack.stub.VerifyCredentials(
        compute_pb2.VerifyCredentialsRequest(account=user(), api_key=stack.user_key)
    )
    assert answer.valid
    assert [c.status for c in stack.fake.calls("graphql")] == [503, 503, 200]


async def test_result_larger_than_a_stream_chunk_arrives_whole(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFLUENCE_RESULT_CHUNK_BYTES", "600")
    stack.fake.max_chunk_bytes = 1024
    submitted = await stack.stub.Submit(hosted_submit("job-big"))
    final, events, _ = await stack.wait_terminal(submitted.provider_job_id, HOSTED)
    assert final.state == common_pb2.JOB_STATE_COMPLETED and final.result_ready, final.error
    assert events
    output = stack.fake.job(submitted.provider_job_id).output
    parts = [c for c in output if isinstance(c, dict) and c.get("type") == "result_part"]
    assert len(parts) > 1 and all(len(json.dumps(p)) <= 1024 for p in parts)
    result = await stack.stub.GetResult(
        compute_pb2.GetResultRequest(
            provider_job_id=submitted.provider_job_id,
            account=HOSTED,
        )
    )
    assert result.result_json == "".join(p["data"] for p in parts).encode()
    ExperimentResult.model_validate_json(result.result_json)


async def test_output_runpod_could_not_upload_is_a_plain_error(stack: Stack) -> None:
    """A worker that does not know the limit: RunPod refuses its final upload and shows the job
    COMPLETED without output (runpod-python #309); the researcher is told the result was lost."""
    stack.fake.max_payload_bytes = 3_000
    stack.fake.worker_env["INFLUENCE_OUTPUT_LIMIT_BYTES"] = str(10**9)
    submitted = await stack.stub.Submit(hosted_submit("job-lost"))
    final, _, _ = await stack.wait_terminal(submitted.provider_job_id, HOSTED)
    assert final.state == common_pb2.JOB_STATE_FAILED
    assert final.error.startswith("The job finished but RunPod returned no output")
    assert stack.fake.job(submitted.provider_job_id).status == "COMPLETED"
    assert {c.status for c in stack.fake.calls("worker.done")} == {400}


async def test_invalid_spec_names_the_field(stack: Stack) -> None:
    error = await rpc_error(stack.stub.Submit(hosted_submit("job-bad", training_data=[])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "training_data" in error.details()
    assert stack.fake.calls("job.run") == []


async def test_estimate_and_health_and_metrics(stack: Stack) -> None:
    answer = await stack.stub.Estimate(compute_pb2.EstimateRequest(spec_json=spec_bytes(), backend="runpod"))
    assert answer.estimate.provider == "runpod" and answer.estimate.estimated_cost_usd >= 0
    health = health_pb2_grpc.HealthStub(stack.channel)
    check = await health.Check(health_pb2.HealthCheckRequest(service="influence.v1.ComputeProvider"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    await stack.stub.VerifyCredentials(
        compute_pb2.VerifyCredentialsRequest(account=user(), api_key=stack.user_key)
    )
    calls = REGISTRY.get_sample_value("runpod_api_requests_total", {"route": "graphql", "status": "200"})
    assert calls is not None and calls >= 1
