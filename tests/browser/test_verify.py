"""Verify on the results page in real Chromium against the real stack: pick an eval example,
see the estimate before anything is submitted, run the counterfactual check, and read the chart
and the answers before and after. Screenshots go to artifacts/screenshots/."""

from __future__ import annotations

import pytest

from benchmarks.planted import duplicate_of, planted_duplicate_spec
from devstack.stack import Stack

from .support import SCREENSHOTS, Screenshots, page_api_client, sign_in

pytestmark = pytest.mark.browser

JOB_TIMEOUT_MS = 120_000
N_TRAIN, N_EVAL, EPOCHS = 16, 4, 30


def test_verify_shows_the_estimate_then_the_loss_changes_and_answers(
    page, stack: Stack, shots: Screenshots
) -> None:
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    sign_in(page, "verifier")
    client = page_api_client(page, stack.gateway_url)
    job_id = client.submit(planted_duplicate_spec("datainf", N_TRAIN, N_EVAL, EPOCHS))["job_id"]
    assert list(client.events(job_id))[-1]["state"] == "completed"
    checks = f"/api/jobs/{job_id}/counterfactual"

    page.goto(f"/#/jobs/{job_id}")
    page.locator("#top-examples").wait_for(timeout=JOB_TIMEOUT_MS)
    # Picking an eval example on the results page makes it Verify's default.
    page.locator('.top-card[data-eval-id="e2"]').click()
    page.get_by_role("button", name="Verify…").click()
    selected = page.locator("#verify-eval-ids").evaluate("s => [...s.selectedOptions].map(o => o.value)")
    assert selected == ["e2"]
    page.locator("#verify-estimate", has_text="3 retrainings").wait_for()
    estimate = page.locator("#verify-estimate").inner_text()
    assert "on hosted (local" in estimate and "$0 (free)" in estimate
    # The estimate follows the form; nothing has been submitted yet.
    page.get_by_label("Random controls").fill("3")
    page.locator("#verify-estimate", has_text="4 retrainings").wait_for()
    assert client.request("GET", checks).json()["counterfactual_jobs"] == []
    assert page.get_by_role("button", name="Run the check").is_enabled()
    # The Verify card only: a full-page shot resizes the viewport, and the charts' relayout
    # afterwards would move the Run button under the click.
    page.locator("#verify").screenshot(path=str(SCREENSHOTS / f"{shots.prefix}-00-estimate.png"))

    page.get_by_role("button", name="Run the check").click()
    page.locator("#verify-result:visible, #verify-error:visible").first.wait_for(timeout=JOB_TIMEOUT_MS)
    assert page.locator("#verify-error").is_hidden(), page.locator("#verify-error").inner_text()
    summary = page.locator("#verify-summary").inner_text()
    assert "further than every random control for 1 of 1 eval examples (100%)" in summary
    duplicate = f"t{duplicate_of(2, N_TRAIN, N_EVAL)}"
    assert page.locator("#verify-result code", has_text=duplicate).count() >= 1
    # One group of bars per checked eval example: the top-k removed and each of the 3 controls.
    page.locator("#verify-chart .plot-container").wait_for()
    assert page.locator("#verify-chart g.trace.bars").count() == 4
    row = page.locator('#verify-answers tr[data-eval-id="e2"]')
    assert row.locator("q.before").count() == 1 and row.locator("q.after").count() == 1
    assert row.locator("td", has_text="✓ yes").count() == 1

    listed = client.request("GET", checks).json()["counterfactual_jobs"]
    assert len(listed) == 1 and listed[0]["status"] == "completed"
    check = client.request("GET", f"{checks}/{listed[0]['counterfactual_job_id']}").json()["result"]
    assert check["removed_ids"] == [duplicate] and [x["id"] for x in check["examples"]] == ["e2"]
    answer_cells = row.locator("q")
    assert answer_cells.nth(0).inner_text() == check["examples"][0]["original_output"]
    assert answer_cells.nth(1).inner_text() == check["examples"][0]["without_top_k_output"]
    shots.take("result")
    assert not console_errors, console_errors
