"""A finished job's real cost beside its estimate (issue 24, item 4), in real Chromium against the
real stack: a BYOK job on the test fake of RunPod (its worker runs the real pipeline), then the
job page and the experiments list. Screenshots go to artifacts/screenshots/the_job_page_shows_*."""

from __future__ import annotations

import pytest

from devstack.stack import FakeRunPodProcess, Stack

from .support import GOOD_RUNPOD_KEY, Screenshots, page_api_client, sample_spec, sign_in

pytestmark = pytest.mark.browser

JOB_TIMEOUT_MS = 120_000


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
