"""A finished job's real cost beside its estimate (issue 24, item 4), in real Chromium against the
real stack: a BYOK job on the test fake of RunPod (its worker runs the real pipeline), then the
job page and the experiments list; and the dashboard's BYOK controls: the Hugging Face token in
Settings, the spend cap and the over-the-execution-timeout warning on the new-job page.
Screenshots go to artifacts/screenshots/the_job_page_shows_* and hugging_face_token_*."""

from __future__ import annotations

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

import cost_model
from devstack.stack import FakeRunPodProcess, Stack

from .support import GOOD_RUNPOD_KEY, Screenshots, page_api_client, sample_spec, sign_in

pytestmark = pytest.mark.browser

JOB_TIMEOUT_MS = 120_000
# The endpoint's execution timeout for this module: under the sample experiment's RunPod estimate
# (about 110 s), over a small job's run on the fake.
EXECUTION_TIMEOUT_S = 100
HF_TOKENS = ("hf_FirstTokenOfTheResearcherAbCd", "hf_SecondTokenOfTheResearcherWxYz")


@pytest.fixture(scope="module")
def stack_overrides() -> dict[str, str]:
    # Hosted jobs go to compute-modal running the Modal function in process (the real pipeline).
    return {
        "RUNPOD_EXECUTION_TIMEOUT_S": str(EXECUTION_TIMEOUT_S),
        "HOSTED_PROVIDER": "modal",
        "COMPUTE_MODAL_BACKEND": "inprocess",
    }


@pytest.fixture(scope="module")
def stack_services() -> tuple[str, ...]:
    return ("keyvault", "compute-modal", "compute-runpod", "scheduler", "gateway")


def test_the_job_page_shows_what_the_job_really_cost_beside_its_estimate(
    page, stack: Stack, fake_runpod: FakeRunPodProcess, shots: Screenshots
) -> None:
    sign_in(page, "cost-watcher")
    client = page_api_client(page, stack.gateway_url)
    saved = client.request("POST", "/api/settings/runpod-key", json={"api_key": GOOD_RUNPOD_KEY})
    assert saved.status_code == 200, saved.text
    job_id = client.submit(sample_spec(n_train=6, n_eval=2, epochs=1))["job_id"]

    page.goto(f"/#/jobs/{job_id}")
    cost = page.locator("#job-actual-cost")
    cost.filter(has_text="Shown when the job ends").or_(cost.filter(has_text="GPU-seconds")).wait_for()
    page.locator("#job-status", has_text="completed").wait_for(timeout=JOB_TIMEOUT_MS)
    cost.filter(has_text="GPU-seconds").wait_for()

    job = client.job(job_id)
    actual = job["actual"]
    assert actual is not None and actual["source"].startswith("RunPod executionTime")
    shown = cost.inner_text()
    assert shown.startswith(
        f"{actual['gpu_seconds']:.1f} GPU-seconds on {actual['gpu']} at ${actual['usd_per_second']:.6f}/s"
    )
    assert f"on {job['estimated_gpu']}" in shown.split("(estimate", 1)[1]
    shots.take("job_page")
    cost.screenshot(path=str(shots.path("job_page_cost")))

    page.goto("/#/jobs")
    row = page.locator("#jobs-table tbody tr", has_text=job_id[:8])
    cell = row.locator("td.actual-cost")
    cell.wait_for()
    assert cell.inner_text() != "—"
    assert actual["source"] in (cell.get_attribute("title") or "")
    shots.take("experiments_list")


def test_a_hosted_job_on_modal_shows_its_real_cost_too(page, stack: Stack, shots: Screenshots) -> None:
    sign_in(page, "modal-user")
    client = page_api_client(page, stack.gateway_url)
    job_id = client.submit(sample_spec(n_train=4, n_eval=2, epochs=1))["job_id"]
    assert client.job(job_id)["provider"] == "modal"
    page.goto(f"/#/jobs/{job_id}")
    page.locator("#job-status", has_text="completed").wait_for(timeout=JOB_TIMEOUT_MS)
    cost = page.locator("#job-actual-cost", has_text="GPU-seconds")
    cost.wait_for()
    actual = client.job(job_id)["actual"]
    assert actual is not None and actual["gpu_seconds"] > 0 and actual["cost_usd"] > 0
    assert cost.inner_text().startswith(
        f"{actual['gpu_seconds']:.1f} GPU-seconds on {actual['gpu']} at ${actual['usd_per_second']:.6f}/s"
    )
    shots.take("job_page")


def test_hugging_face_token_spend_cap_and_timeout_warning(page, stack: Stack, shots: Screenshots) -> None:
    sign_in(page, "cap-setter")
    client = page_api_client(page, stack.gateway_url)
    saved = client.request("POST", "/api/settings/runpod-key", json={"api_key": GOOD_RUNPOD_KEY})
    assert saved.status_code == 200, saved.text

    # Settings: store, replace and remove the Hugging Face token; only its last 4 ever shown.
    page.goto("/#/settings")
    status = page.locator("#hf-token-status")
    status.filter(has_text="No token saved.").wait_for()
    field = page.get_by_label("Hugging Face access token")
    assert field.get_attribute("type") == "password"
    for token in HF_TOKENS:
        field.fill(token)
        page.get_by_role("button", name="Save token").click()
        status.filter(has_text=f"Saved token ending in {token[-4:]}").wait_for()
        assert field.input_value() == ""
    assert client.request("GET", "/api/settings/hf-token").json()["last4"] == HF_TOKENS[1][-4:]
    assert not any(token in page.content() for token in HF_TOKENS)
    shots.take("settings")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Remove token").click()
    status.filter(has_text="No token saved.").wait_for()
    assert client.request("GET", "/api/settings/hf-token").json()["has_token"] is False

    # New job on RunPod: estimated over the endpoint's timeout, warned before submitting; capped.
    page.goto("/#/new")
    page.get_by_role("button", name="Load the sample experiment").click()
    page.locator("#estimate", has_text="Over the execution timeout").wait_for()
    page.get_by_label("Spend cap (USD, optional)").fill("0.5")
    warnings: list[str] = []

    def answer(accept: bool):
        def handle(dialog) -> None:
            warnings.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        return handle

    page.once("dialog", answer(False))
    page.get_by_role("button", name="Start experiment").click()
    page.locator("#status", has_text="Not submitted: the estimate is over the execution timeout").wait_for()
    assert client.request("GET", "/api/jobs").json()["jobs"] == []
    shots.take("timeout_warning_declined")
    page.once("dialog", answer(True))
    page.get_by_role("button", name="Start experiment").click()
    page.wait_for_url("**/#/jobs/*")
    assert len(warnings) == 2 and warnings[0].startswith("Over the execution timeout")
    job_id = page.url.rsplit("/", 1)[1]
    job = client.job(job_id)
    assert (job["backend"], job["max_cost_usd"]) == ("runpod", 0.5)
    client.request("POST", f"/api/jobs/{job_id}/cancel")  # the 100-epoch sample need not run here


def test_the_new_job_page_offers_only_the_runpod_gpu_types_that_fit_the_model(
    page, stack: Stack, shots: Screenshots
) -> None:
    """Issue 24 item 7: the RunPod GPU picker lists the pools that hold the chosen model (and
    follows the model), and the estimate prices the pool picked."""
    sign_in(page, "gpu-picker")
    client = page_api_client(page, stack.gateway_url)
    saved = client.request("POST", "/api/settings/runpod-key", json={"api_key": GOOD_RUNPOD_KEY})
    assert saved.status_code == 200, saved.text
    page.goto("/#/new")
    picker = page.get_by_label("RunPod GPU")
    picker.wait_for()

    def offered(pools: list[str]) -> None:
        """Waits until the picker lists exactly Automatic, ``pools`` and any-fitting."""
        expected = ["", *pools, "all-fitting"]
        try:
            page.wait_for_function(
                "expected => [...document.querySelectorAll('#runpod-gpu option')]"
                ".map((o) => o.value).join() === expected",
                arg=",".join(expected),
                timeout=10_000,
            )
        except PlaywrightTimeout:
            listed = picker.locator("option").evaluate_all("options => options.map((o) => o.value)")
            raise AssertionError(f"the picker lists {listed}, not {expected}") from None

    def fitting(model_id: str) -> list[str]:
        # The page sends the model's default quantization (its presets), as its spec will.
        quantization = cost_model.lookup_model(model_id).default_quantization
        params = {"model_id": model_id, "quantization": quantization}
        answer = client.request("GET", "/api/models/runpod-gpus", params=params)
        return [gpu["pool"] for gpu in answer.json()["gpus"]]

    big = fitting("google/gemma-3-27b")
    assert "AMPERE_16" not in big and "ADA_24" not in big and big
    page.get_by_label("Model", exact=True).select_option("google/gemma-3-27b")
    offered(big)
    shots.take("runpod_gpu_picker")

    page.get_by_role("button", name="Load the sample experiment").click()  # the tiny model
    offered(fitting("local/tiny-chat"))
    picker.select_option("ADA_24")
    page.locator("#estimate", has_text="ADA_24, the GPU pool you chose").wait_for()
