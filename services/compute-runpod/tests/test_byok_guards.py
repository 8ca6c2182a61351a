"""Issue 24 on compute-runpod: each job's execution timeout set from its estimate, a warning in
the estimate of a job over the endpoint's timeout, RunPod's own timing of a finished job, and the
researcher's Hugging Face token handed to their worker in the job input only."""

from __future__ import annotations

import json
import logging
import secrets

import pytest
from runpod_testkit import GATEWAY_TOKEN, SMALL_SPEC, Stack, spec_bytes

import cost_model
from compute_runpod.costs import gpu_pools
from influence.v1 import common_pb2, compute_pb2, keyvault_pb2

HOSTED = common_pb2.Account(user_id="operator-tier-user", hosted=True)


def user(user_id: str, endpoint_id: str = "") -> common_pb2.Account:
    return common_pb2.Account(user_id=user_id, endpoint_id=endpoint_id, hosted=False)


@pytest.mark.parametrize(
    ("estimated_time_s", "timeout_s"), [(0, 7200), (100, 600), (1000, 2000), (10_000, 7200)]
)
async def test_each_job_gets_its_estimate_with_headroom_as_execution_timeout(
    stack: Stack, estimated_time_s: float, timeout_s: int
) -> None:
    """RUNPOD_TIMEOUT_HEADROOM 2, at least RUNPOD_MIN_EXECUTION_TIMEOUT_S (600), at most the
    endpoint's RUNPOD_EXECUTION_TIMEOUT_S (7200); no estimate: the endpoint's."""
    stack.fake.set_throttled(True)  # the submission is what is checked: no worker needs to run
    submitted = await stack.stub.Submit(
        compute_pb2.SubmitRequest(
            job_id=f"job-timeout-{estimated_time_s}",
            account=HOSTED,
            spec_json=spec_bytes(),
            estimated_time_s=estimated_time_s,
        )
    )
    assert stack.fake.job(submitted.provider_job_id).execution_timeout_s == timeout_s


async def test_the_schedulers_webhook_url_is_sent_as_runs_webhook(stack: Stack) -> None:
    """SubmitRequest.webhook_url becomes /run's ``webhook`` (RunPod posts there when the job
    ends); without one, /run has none."""
    stack.fake.set_throttled(True)
    hook = "https://dash.example.org/api/webhooks/runpod/job-hook/" + secrets.token_urlsafe(32)
    with_hook = await stack.stub.Submit(
        compute_pb2.SubmitRequest(job_id="job-hook", account=HOSTED, spec_json=spec_bytes(), webhook_url=hook)
    )
    without = await stack.stub.Submit(
        compute_pb2.SubmitRequest(job_id="job-no-hook", account=HOSTED, spec_json=spec_bytes())
    )
    assert stack.fake.job(with_hook.provider_job_id).webhook == hook
    assert stack.fake.job(without.provider_job_id).webhook == ""


async def test_an_estimate_over_the_execution_timeout_warns(stack: Stack) -> None:
    many = [{"prompt": f"question {i} " * 40, "completion": "answer " * 40} for i in range(3000)]
    big = spec_bytes(model_id="google/gemma-3-27b", training_data=many, hyperparams={"epochs": 30})
    answer = await stack.stub.Estimate(compute_pb2.EstimateRequest(spec_json=big, backend="runpod"))
    assert answer.estimate.estimated_time_s > 7200
    (warning,) = [note for note in answer.estimate.notes if note.startswith("Over the execution timeout")]
    assert "RunPod stops any job of this endpoint after 2 h" in warning
    small = await stack.stub.Estimate(compute_pb2.EstimateRequest(spec_json=spec_bytes(), backend="runpod"))
    assert not [note for note in small.estimate.notes if "execution timeout" in note]


async def test_the_estimate_shows_the_range_the_job_can_be_billed_at(stack: Stack) -> None:
    """gemma-3-12b in 4-bit fits from a 24 GB pool up: the endpoint offers those within the price
    band, and the estimate prices the cheapest, so the note gives the most expensive too."""
    spec = spec_bytes(model_id="google/gemma-3-12b", hyperparams={"quantization": "4bit"})
    answer = (
        await stack.stub.Estimate(compute_pb2.EstimateRequest(spec_json=spec, backend="runpod"))
    ).estimate
    pools = gpu_pools(0.0, "4bit", "google/gemma-3-12b")
    table = cost_model.price_table("runpod")
    assert pools[0] == answer.gpu and len(pools) > 1
    top_rate = table.gpus[pools[-1]].usd_per_second
    # The band (RUNPOD_POOL_PRICE_BAND, 3x) bounds the dearest pool: no more 15x the estimate.
    assert answer.usd_per_second < top_rate <= 3 * answer.usd_per_second
    (note,) = [n for n in answer.notes if n.startswith("Billed at the GPU RunPod assigns")]
    assert f"among the {len(pools)} pools that fit within 3x the cheapest one's price" in note
    assert f"({answer.gpu}, priced here) to ${top_rate:.6f}/s ({pools[-1]})" in note


async def test_the_researchers_hf_token_reaches_the_worker_only(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hf_token = "hf_" + secrets.token_hex(17)
    await stack.store_key("u-hf", stack.user_key)
    await stack.keyvault.StoreKey(
        keyvault_pb2.StoreKeyRequest(user_id="u-hf", provider="huggingface", plaintext=hf_token),
        metadata=(("x-caller-token", GATEWAY_TOKEN),),
    )
    prepared = await stack.stub.PrepareAccount(compute_pb2.PrepareAccountRequest(account=user("u-hf")))
    account = user("u-hf", prepared.endpoint_id)
    submitted = await stack.stub.Submit(
        compute_pb2.SubmitRequest(
            job_id="job-hf", account=account, spec_json=spec_bytes(), estimated_cost_usd=0.01
        )
    )
    job = stack.fake.job(submitted.provider_job_id)
    assert job.input["hf_token"] == hf_token
    assert job.input["training_data"][0]["prompt"] == SMALL_SPEC["training_data"][0]["prompt"]
    final, events, _ = await stack.wait_terminal(submitted.provider_job_id, account)
    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.error
    # RunPod's own timing of the job: executionTime and delayTime from /status.
    assert final.usage.source == "RunPod executionTime"
    assert final.usage.gpu_seconds > 0 and final.usage.delay_seconds >= 0
    result = await stack.stub.GetResult(
        compute_pb2.GetResultRequest(provider_job_id=submitted.provider_job_id, account=account)
    )
    seen = [final.SerializeToString(), result.result_json, *(e.SerializeToString() for e in events)]
    assert not [blob for blob in seen if hf_token.encode() in blob]
    assert hf_token not in caplog.text
    # What the worker sent back to RunPod (every yield, the aggregate output) holds no token.
    assert hf_token not in json.dumps(stack.fake.job(submitted.provider_job_id).output)
