"""Verify and Training data on the results page in real Chromium against the real stack (one
stack for both). Verify: pick an eval example, see the estimate before anything is submitted,
run the counterfactual check, and read the chart and the answers before and after. Training
data: rank, select, estimate, run a curation, read its result card. Screenshots go to
artifacts/screenshots/."""

from __future__ import annotations

import pyarrow.parquet as pq
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


def test_training_data_ranks_selects_runs_and_shows_the_result_card(
    page, stack: Stack, shots: Screenshots
) -> None:
    """The Training data card of a finished experiment: the ranked table and its sort, a
    selection by ticking rows, the estimate, Run, and the result card with its figures."""
    from benchmarks.curate import task_spec

    sign_in(page, "curator")
    client = page_api_client(page, stack.gateway_url)
    spec = task_spec("tracin", n_train=12, n_eval=3).model_dump(mode="json", exclude_none=True)
    spec["hyperparams"]["epochs"] = 1
    job_id = client.submit(spec)["job_id"]
    assert list(client.events(job_id))[-1]["state"] == "completed"
    ranked = client.request(
        "GET", f"/api/jobs/{job_id}/training-examples", params={"sort": "harmful", "limit": 12}
    ).json()["examples"]

    page.goto(f"/#/jobs/{job_id}")
    page.locator("#training-details > summary").click()
    rows = page.locator("#training-table tbody tr")
    rows.first.wait_for(timeout=JOB_TIMEOUT_MS)
    assert [
        int(r) for r in page.locator("#training-table tbody tr td:nth-child(2)").all_inner_texts()
    ] == list(range(1, 13))
    page.locator("#training-sort").select_option("harmful")
    page.locator("#training-table caption", has_text="most harmful first").wait_for()
    shown = page.locator("#training-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.trainId)")
    assert shown == [row["id"] for row in ranked]
    worst = page.locator("#training-table tbody tr td:nth-child(6)").all_inner_texts()
    assert worst == [f"{row['worst_harm']:.2f}" for row in ranked]

    picked = shown[:2]
    for train_id in picked:
        page.get_by_label(f"select {train_id}", exact=True).check()
    page.locator("#training-estimate", has_text="Drops 2 examples; 2 retrainings").wait_for()
    assert client.request("GET", f"/api/jobs/{job_id}/curations").json()["curations"] == []
    page.locator("#training-data").screenshot(path=str(SCREENSHOTS / f"{shots.prefix}-00-selection.png"))

    page.locator("#training-run").click()
    page.locator("#curation-result:visible, #training-error:visible").first.wait_for(timeout=JOB_TIMEOUT_MS)
    assert page.locator("#training-error").is_hidden(), page.locator("#training-error").inner_text()
    heading = page.locator("#curation-result-heading").inner_text()
    assert heading.startswith("Dropped 2 training examples (10 trained on), 1 seed, 1 random control")
    (curation,) = client.request("GET", f"/api/jobs/{job_id}/curations").json()["curations"]
    result = client.request("GET", f"/api/jobs/{job_id}/curations/{curation['curation_job_id']}").json()[
        "result"
    ]
    assert sorted(result["selected_ids"]) == sorted(picked)
    loss_row = page.locator("#curation-figures tbody tr", has_text="Mean eval loss").locator("td")
    assert loss_row.nth(4).inner_text() == f"{result['loss']['p_value']:.3f}"
    with page.expect_download() as download:
        page.locator("#curation-download-parquet").click()
    downloaded = pq.read_table(download.value.path()).to_pylist()
    assert [row["id"] for row in downloaded] == [
        e["id"] for e in spec["training_data"] if e["id"] not in picked
    ]
    assert page.locator("#curation-new-experiment").get_attribute("href") == (
        f"#/new/{job_id}/{curation['curation_job_id']}"
    )
    page.locator("#training-data").screenshot(path=str(SCREENSHOTS / f"{shots.prefix}-01-result.png"))
