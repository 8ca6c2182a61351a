"""End to end with HOSTED_PROVIDER=modal: the hosted tier routed to compute-modal, whose adapter
runs the Modal app's function body in-process (the real gpu_core pipeline on the tiny model)."""

from __future__ import annotations

import time

import pytest

from devstack.client import GatewayClient
from devstack.stack import Stack

from .actual_cost import assert_actual_cost, assert_status_shows_actual
from .test_stack import small_spec

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def modal_stack(tmp_path_factory: pytest.TempPathFactory):
    with Stack(
        data_dir=tmp_path_factory.mktemp("modal-stack"),
        extra_env={
            "HOSTED_PROVIDER": "modal",
            "COMPUTE_MODAL_BACKEND": "inprocess",
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
        },
        services=("keyvault", "compute-modal", "scheduler", "gateway"),
    ) as stack:
        yield stack


def test_hosted_job_runs_on_modal(modal_stack: Stack) -> None:
    client = GatewayClient(modal_stack.gateway_url)
    client.sign_in_locally("carol")
    assert client.request("GET", "/api/settings/compute").json()["hosted_provider"] == "modal"

    estimate = client.request("POST", "/api/estimate", json=small_spec()).json()
    assert estimate["estimates"][0]["provider"] == "modal"
    assert estimate["estimates"][0]["usd_per_second"] > 0

    started = time.time()
    submitted = client.submit(small_spec(n_train=8, n_eval=3))
    events = list(client.events(submitted["job_id"]))
    assert events[-1]["state"] == "completed", events[-1]
    job = client.job(submitted["job_id"])
    assert job["provider"] == "modal" and job["backend"] == "hosted"
    result = client.results(submitted["job_id"])
    assert len(result["influence"]["scores"]) == 3
    assert len(result["influence"]["scores"][0]) == 8
    # The real cost: the function's wall time on the GPU the estimate priced (with_options).
    priced = job["estimated_gpu"]
    assert priced == estimate["estimates"][0]["gpu"]
    actual = assert_actual_cost(job, "modal", priced, "Modal function wall time")
    assert actual["gpu_seconds"] < (time.time() - started)
    assert_status_shows_actual(client, submitted["job_id"], actual)
