"""The job page of a sharded experiment in real Chromium against the real stack (compute-local,
tiny model): the parts (training job, each index shard, the merge) with the state and progress of
each, live over SSE and once it completed. Screenshots go to artifacts/screenshots/."""

from __future__ import annotations

import pytest

from devstack.stack import Stack

from .support import Screenshots, page_api_client, sample_spec, sign_in

pytestmark = pytest.mark.browser

JOB_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def stack_services() -> tuple[str, ...]:
    return ("keyvault", "compute-local", "scheduler", "gateway")


def test_the_job_page_shows_each_part_of_a_sharded_experiment(page, stack: Stack, shots: Screenshots) -> None:
    sign_in(page, "sharder")
    client = page_api_client(page, stack.gateway_url)
    spec = sample_spec(n_train=16, n_eval=2, epochs=2)
    spec["hyperparams"]["batch_size"] = 4
    spec["influence_method"] = "trackstar"
    spec["influence"] = {"top_k": 3, "shards": 2}
    job_id = client.submit(spec)["job_id"]
    page.goto(f"/#/jobs/{job_id}")
    parts = page.locator("#job-parts")
    parts.get_by_role("heading", name="Parts (2 index shards)").wait_for(timeout=JOB_TIMEOUT_MS)
    names = ["Training job", "Index shard 1 of 2", "Index shard 2 of 2", "Merge"]
    rows = parts.locator("tbody tr")
    rows.first.wait_for(timeout=JOB_TIMEOUT_MS)
    assert [rows.nth(i).locator("th").inner_text() for i in range(rows.count())] == names
    # A shard is shown with its own state while it runs (or waits its turn on the one CPU slot).
    shard = parts.locator("tr[data-kind=index_shard][data-shard='0']")
    shard.locator("td.part-status", has_text="running").or_(
        shard.locator("td.part-status", has_text="completed")
    ).first.wait_for(timeout=JOB_TIMEOUT_MS)
    shots.take("sharded-running")
    page.locator("#job-status", has_text="completed").wait_for(timeout=JOB_TIMEOUT_MS)
    page.locator("#job-parts td.part-status", has_text="completed").nth(3).wait_for(timeout=JOB_TIMEOUT_MS)
    statuses = parts.locator("td.part-status").all_inner_texts()
    assert statuses == ["completed"] * 4
    meters = parts.locator("progress")
    assert [meters.nth(i).get_attribute("value") for i in range(4)] == ["100"] * 4
    assert parts.locator("tbody tr td.num").all_inner_texts() == ["1"] * 4
    shots.take("sharded-completed")
