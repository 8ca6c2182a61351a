"""The results page of a 10,000 training x 1,000 eval job (the gateway's maximums) in real
Chromium: heatmap, top examples and the job's files, with no error in the page.

The job is real: submitted through the gateway, run by compute-local's child with the real
gpu_core pipeline on the tiny model (1 epoch, one new token, no few-shot: about 30 s here), its
scores.npy and adapter moved by the scheduler into the real store. Nothing is built by hand.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.specs import tracin_spec
from devstack.stack import Stack

from .support import Screenshots, page_api_client, sign_in

pytestmark = pytest.mark.browser

N_TRAIN, N_EVAL = 10_000, 1_000
RENDER_TIMEOUT_MS = 60_000


def large_spec() -> dict:
    """The issue's job (TracIn, 1 epoch, one new token, no few-shot), in batches of 64."""
    spec = tracin_spec(N_TRAIN, N_EVAL)
    spec["hyperparams"]["batch_size"] = 64
    return spec


def test_results_page_of_a_10000_x_1000_job(page, stack: Stack, shots: Screenshots) -> None:
    console_errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
    sign_in(page, "scaler")
    client = page_api_client(page, stack.gateway_url)
    client.http.timeout = 120
    job_id = client.submit(large_spec())["job_id"]
    assert list(client.events(job_id))[-1]["state"] == "completed"
    result = client.results(job_id)
    assert "scores" not in result["influence"] or result["influence"]["scores"] is None

    started = time.monotonic()
    page.goto(f"/#/jobs/{job_id}")
    page.locator("#heatmap .main-svg").first.wait_for(timeout=RENDER_TIMEOUT_MS)
    page.locator("#top-examples article").first.wait_for()
    render_s = time.monotonic() - started
    print(f"results page of {N_EVAL} x {N_TRAIN}: heatmap and top examples in {render_s:.1f} s")
    subset = page.locator("#heatmap-subset").inner_text()
    assert "50 eval × 200 training examples" in subset and "1,000 × 10,000" in subset, subset
    # The heatmap draws the pipeline's submatrix, and its first cell is that score.
    heatmap = result["influence"]["heatmap"]
    assert page.evaluate("document.querySelector('#heatmap').data[0].z.length") == len(heatmap["eval_ids"])
    assert page.evaluate("document.querySelector('#heatmap').data[0].x[0]") == heatmap["train_ids"][0]

    # Top examples and outputs a page at a time; more on request, and any one by search.
    assert page.locator("#top-examples article").count() == 25
    assert page.locator("#outputs-table tbody tr").count() == 25
    first = page.locator("#top-examples article").first
    first_id = first.get_attribute("data-eval-id")
    top = result["influence"]["top_k"][first_id]
    assert first.locator("ol.helpful li").count() == len(top["helpful"])
    assert top["helpful"][0]["id"] in first.locator("ol.helpful li").first.inner_text()
    prompts = {e["id"]: e["prompt"] for e in large_spec()["eval_data"]}
    assert prompts[first_id] in first.locator("h4").inner_text()
    page.locator("#top-more").click()
    assert page.locator("#top-examples article").count() == 50
    page.get_by_label("Find an eval example").fill("e999")
    page.locator('#top-examples article[data-eval-id="e999"]').wait_for()
    assert page.locator("#top-examples article").count() == 1
    page.locator("#heatmap").scroll_into_view_if_needed()
    shots.take("heatmap")
    page.locator("#download-heading").scroll_into_view_if_needed()
    shots.take("downloads")

    # The page's own download of scores.npy: the bytes the store holds, the pipeline's matrix.
    # With the keyboard, as in the other tests: focus the button, press Enter.
    page.get_by_role("button", name="Download scores.npy").focus()
    with page.expect_download(timeout=RENDER_TIMEOUT_MS) as scores_download:
        page.keyboard.press("Enter")
    downloaded = Path(scores_download.value.path()).read_bytes()
    assert scores_download.value.suggested_filename == "scores.npy"
    (stored,) = (stack.data_dir / "artifacts" / "jobs" / job_id).glob("scores.npy")
    assert downloaded == stored.read_bytes()
    (child_scores,) = (stack.data_dir / "compute-local" / "jobs").glob("*/artifacts/scores.npy")
    matrix = np.load(io.BytesIO(downloaded))
    assert matrix.shape == (N_EVAL, N_TRAIN) and np.array_equal(matrix, np.load(child_scores))

    with page.expect_download() as csv_download:
        page.get_by_role("button", name="Download CSV (top examples)").click()
    rows = list(csv.DictReader(io.StringIO(Path(csv_download.value.path()).read_text())))
    expected = sum(len(t["helpful"]) + len(t["harmful"]) for t in result["influence"]["top_k"].values())
    assert len(rows) == expected and rows[0]["eval_id"] == "e0" and rows[0]["rank"] == "1"
    assert page.get_by_role("button", name="Download adapter/adapter_model.safetensors").is_visible()
    assert not console_errors, console_errors
