"""A new user's first run: sign in, "Load the sample experiment", start with the model's presets,
and the fine-tuned model beats the base model. The page's limits and bounds come from the
gateway: this module's stack runs with a lower GATEWAY_MAX_TEXT_CHARS, and the page follows it."""

from __future__ import annotations

import json

import pytest

from devstack.stack import REPO_ROOT, Stack

from .support import Screenshots, page_api_client, sign_in

pytestmark = pytest.mark.browser

SAMPLE = json.loads((REPO_ROOT / "examples" / "sample.json").read_text())
MAX_TEXT_CHARS = 40
JOB_TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def stack_overrides() -> dict[str, str]:
    # Every text of the sample is shorter than this.
    return {"GATEWAY_MAX_TEXT_CHARS": str(MAX_TEXT_CHARS)}


def test_sample_experiment_with_presets_beats_the_base_model(page, stack: Stack, shots: Screenshots) -> None:
    sign_in(page, "newcomer")
    page.get_by_role("link", name="New experiment").first.click()
    page.get_by_role("button", name="Load the sample experiment").wait_for()
    # Choosing the tiny model (the first) filled in its presets: the sample's hyperparameters.
    hyperparams = SAMPLE["hyperparams"]
    assert page.get_by_label("Epochs").input_value() == str(hyperparams["epochs"])
    assert float(page.get_by_label("Learning rate").input_value()) == hyperparams["learning_rate"]
    assert page.get_by_label("LoRA target modules").input_value() == ", ".join(hyperparams["target_modules"])
    shots.take("new-experiment-presets")

    page.get_by_role("button", name="Load the sample experiment").click()
    page.locator("#file-train-summary", has_text="26 training examples").wait_for()
    page.locator("#file-eval-summary", has_text="8 eval examples").wait_for()
    page.locator("#estimate-table").wait_for()
    shots.take("sample-loaded")

    page.get_by_role("button", name="Start experiment").click()
    page.wait_for_url("**/#/jobs/*")
    job_id = page.url.rsplit("/", 1)[-1]
    page.locator("#metrics-table").wait_for(timeout=JOB_TIMEOUT_MS)
    assert page.locator("#job-status").inner_text() == "completed"
    shots.take("sample-results")

    client = page_api_client(page, stack.gateway_url)
    spec = client.request("GET", f"/api/jobs/{job_id}/spec").json()
    assert {key: spec["hyperparams"][key] for key in hyperparams} == hyperparams
    assert [t["id"] for t in spec["training_data"]] == [t["id"] for t in SAMPLE["training_data"]]
    eval_results = client.results(job_id)["eval_results"]
    metrics = {run: answer["metrics"]["exact_match_rate"] for run, answer in eval_results.items()}
    assert metrics["finetuned"] > metrics["base"], metrics
    exact = page.locator("#metrics-table tbody tr").first.inner_text()
    assert f"{metrics['finetuned'] * 100:.1f}%" in exact and f"{metrics['base'] * 100:.1f}%" in exact


def test_the_page_takes_limits_and_bounds_from_the_gateway(page, stack: Stack, tmp_path) -> None:
    sign_in(page, "limits")
    page.get_by_role("link", name="New experiment").first.click()
    page.get_by_role("button", name="Load the sample experiment").wait_for()

    long_prompt = tmp_path / "train.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "x" * (MAX_TEXT_CHARS + 1), "completion": " y"}) + "\n")
    page.get_by_label("Training data (JSONL or CSV)").set_input_files(str(long_prompt))
    page.locator("#file-train-errors li", has_text=f"the limit is {MAX_TEXT_CHARS}").wait_for()

    # gpu_core: learning_rate > 0 (exclusive), epochs <= 100.
    page.get_by_role("button", name="Load the sample experiment").click()
    # The sample is fetched, then fills the form: edit only after it has landed.
    page.locator("#file-train-summary", has_text="Sample experiment").wait_for()
    page.get_by_label("Learning rate").fill("0")
    page.locator("#estimate", has_text="Learning rate: Must be greater than 0").wait_for()
    assert page.get_by_role("button", name="Start experiment").is_disabled()
    page.get_by_label("Learning rate").fill("0.004")
    assert page.get_by_label("Epochs").get_attribute("max") == "100"
    page.get_by_label("Epochs").fill("101")
    assert page.get_by_role("button", name="Start experiment").is_disabled()
    page.get_by_label("Epochs").fill("100")
    assert page.get_by_role("button", name="Start experiment").is_enabled()
    methods = page.locator('input[name="influence_method"]')
    config = page_api_client(page, stack.gateway_url).request("GET", "/api/config").json()
    assert methods.evaluate_all("inputs => inputs.map(i => i.value)") == [
        m["value"] for m in config["influence_methods"]
    ]
