"""The dashboard in real Chromium against the real stack: sign in, upload, estimate, submit,
live progress, results, CSV download, bring-your-own RunPod key, keyboard use, no external
requests. Screenshots of every page visited go to artifacts/screenshots/."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from devstack.client import GatewayClient
from devstack.stack import REPO_ROOT, FakeRunPodProcess, Stack

from .support import (
    BROKE_RUNPOD_KEY,
    GOOD_RUNPOD_KEY,
    ExternalRequests,
    Screenshots,
    page_api_client,
    sample_spec,
    sign_in,
)

pytestmark = pytest.mark.browser

EXAMPLES = REPO_ROOT / "examples"
DASHBOARD_EXAMPLES = REPO_ROOT / "services" / "gateway" / "gateway" / "dashboard" / "static" / "examples"
JOB_TIMEOUT_MS = 120_000


def wait_until_finished(page) -> None:
    """The progress bar at 100% and the job's status final (after the stream's end event)."""
    page.wait_for_function(
        "document.querySelector('#job-progress')?.value === 100 && ['completed', 'failed', 'cancelled']"
        ".includes(document.querySelector('#job-status')?.textContent)",
        timeout=JOB_TIMEOUT_MS,
    )


def runpod_job_completes(page, gateway_url: str) -> GatewayClient:
    """A small experiment of the signed-in user runs on RunPod and its page shows it completed."""
    client = page_api_client(page, gateway_url)
    job_id = client.submit(sample_spec(n_train=4, n_eval=2, epochs=1))["job_id"]
    assert client.job(job_id)["backend"] == "runpod"
    page.goto(f"/#/jobs/{job_id}")
    wait_until_finished(page)
    assert page.locator("#job-status").inner_text() == "completed"
    return client


def test_experiment_from_upload_to_results_and_csv(page, stack: Stack, shots: Screenshots) -> None:
    page.goto("/")
    page.get_by_role("heading", name="Sign in", exact=True).wait_for()
    shots.take("sign-in")
    sign_in(page, "researcher")
    shots.take("experiments-empty")

    page.get_by_role("link", name="New experiment").first.click()
    page.get_by_label("Model", exact=True).wait_for()
    # The price table fills in from /api/models after the form renders.
    page.locator("#model-prices tbody tr").first.wait_for()
    # The active backend's prices, and the other backend's greyed.
    assert "(active)" in page.locator("#model-prices thead").inner_text()
    assert page.locator("#model-prices td.inactive").count() >= 1

    page.get_by_label("Training data (JSONL or CSV)").set_input_files(str(EXAMPLES / "train.jsonl"))
    page.get_by_label("Eval data (JSONL or CSV)").set_input_files(str(EXAMPLES / "eval.jsonl"))
    page.locator("#file-train-summary", has_text="26 training examples").wait_for()
    page.locator("#file-eval-summary", has_text="8 eval examples").wait_for()
    page.get_by_label("Epochs").fill("1")
    page.get_by_label("Max sequence length (tokens)").fill("48")
    page.get_by_label("Max new tokens per answer").fill("4")
    page.get_by_label("Learning rate").fill("0.003")
    page.get_by_label("Top influential examples to keep").fill("3")
    page.get_by_label("TracIn").check()

    estimate = page.locator("#estimate-table")
    estimate.wait_for()
    text = estimate.inner_text()
    assert "(active)" in text and "/s" in text and "$" in text, text
    shots.take("new-experiment-with-estimate")

    page.get_by_role("button", name="Start experiment").click()
    page.wait_for_url("**/#/jobs/*")
    job_id = page.url.rsplit("/", 1)[-1]
    page.locator("#job-progress").wait_for()
    shots.take("job-progress")
    wait_until_finished(page)
    assert page.locator("#job-status").inner_text() == "completed"
    assert page.locator("#job-epoch").inner_text() == "Epoch 1 / 1."
    # What it really cost on compute-local (host time), beside the estimate (issue 24, item 4).
    actual = page_api_client(page, stack.gateway_url).job(job_id)["actual"]
    assert actual is not None and actual["gpu_seconds"] > 0
    cost = page.locator("#job-actual-cost", has_text="GPU-seconds")
    cost.wait_for()
    assert cost.inner_text().startswith(f"{actual['gpu_seconds']:.1f} GPU-seconds on {actual['gpu']}")
    cost.screenshot(path=str(shots.path("job-actual-cost-local")))

    # Results: three evaluations side by side, the heatmap, the top examples with their text.
    page.locator("#heatmap .main-svg").first.wait_for(timeout=JOB_TIMEOUT_MS)
    headers = page.locator("#metrics-table thead").inner_text()
    for run in ("Base model", "Few-shot", "Fine-tuned"):
        assert run in headers
    assert page.locator("#outputs-table tbody tr").count() == 8
    assert page.locator("#top-examples article").count() == 8
    dup_apple = page.locator('#top-examples article[data-eval-id="dup-apple"]')
    assert "Color of apple?" in dup_apple.locator("h4").inner_text()
    assert dup_apple.locator("ol.helpful li").count() >= 1
    first_helpful = dup_apple.locator("ol.helpful li").first.inner_text()
    assert "Color of" in first_helpful or "Sound of" in first_helpful, first_helpful
    assert page.locator("#loss-chart .main-svg").count() >= 1

    # Hovering a heatmap cell shows both texts and the score.
    page.locator("#heatmap").scroll_into_view_if_needed()
    box = page.locator("#heatmap .nsewdrag").first.bounding_box()
    assert box is not None
    # The top-left cell: the first eval example against the first training example.
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    page.mouse.move(box["x"] + box["width"] * 0.01, box["y"] + box["height"] * 0.04, steps=3)
    hover = page.locator("#heatmap .hoverlayer .hovertext")
    hover.wait_for()
    hover_text = hover.text_content() or ""
    assert "score:" in hover_text and "eval dup-apple" in hover_text and "→" in hover_text, hover_text
    shots.take("results")

    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download CSV (influence scores)").click()
    csv_text = Path(download_info.value.path()).read_text()
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    result = page_api_client(page, stack.gateway_url).results(job_id)
    influence = result["influence"]
    assert len(rows) == len(influence["eval_ids"]) * len(influence["train_ids"]) == 8 * 26
    first = rows[0]
    assert first["eval_id"] == influence["eval_ids"][0]
    assert first["train_id"] == influence["train_ids"][0]
    assert first["eval_prompt"] == "Color of apple?" and first["train_prompt"] == "Color of apple?"
    assert float(first["score"]) == pytest.approx(influence["scores"][0][0])

    with page.expect_download() as json_info:
        page.get_by_role("button", name="Download JSON").click()
    downloaded = json.loads(Path(json_info.value.path()).read_text())
    assert downloaded["result"]["influence"]["scores"] == influence["scores"]

    page.get_by_role("link", name="Experiments").click()
    row = page.locator("#jobs-table tbody tr", has_text=job_id[:8])
    row.wait_for()
    assert "completed" in row.inner_text() and "tracin" in row.inner_text()
    shots.take("experiments-list")


def test_a_reload_resumes_progress_after_the_last_event(page, stack: Stack, shots: Screenshots) -> None:
    sign_in(page, "reloader")
    client = page_api_client(page, stack.gateway_url)
    spec = sample_spec(n_train=6, n_eval=2, epochs=1)
    job_id = client.submit(spec)["job_id"]
    page.goto(f"/#/jobs/{job_id}")
    page.locator("#job-progress").wait_for()
    wait_until_finished(page)
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    # A job still running resumes from its cached seq; a finished one needs no stream at all.
    page.evaluate(
        "id => sessionStorage.setItem(`influence.progress.${id}`,"
        " JSON.stringify({lastSeq: 5, progress: 0.1, stage: 'training', message: '', epoch: null,"
        " totalEpochs: null, etaS: null, startedAt: null, loss: []}))",
        job_id,
    )
    page.reload()
    wait_until_finished(page)
    assert not [url for url in seen if "/events" in url and "after=0" in url]
    shots.take("job-after-reload")


def test_upload_errors_name_the_line_and_field(page, tmp_path: Path, shots: Screenshots) -> None:
    sign_in(page, "careless")
    page.goto("/#/new")
    bad = tmp_path / "train.jsonl"
    bad.write_text(
        '{"id": "a", "prompt": "Color of apple?", "completion": " red"}\n'
        '{"id": "b", "prompt": "Color of lime?"}\n'
        "{not json\n"
        '{"id": "a", "prompt": "Color of plum?", "completion": " purple", "label": 1}\n'
    )
    page.get_by_label("Training data (JSONL or CSV)").set_input_files(str(bad))
    errors = page.locator("#file-train-errors")
    errors.locator("li").first.wait_for()
    text = errors.inner_text()
    assert 'line 2: field "completion" is missing' in text
    assert "line 3: not valid JSON" in text
    assert 'line 4: unknown field "label"' in text
    assert 'line 4: field "id" repeats "a" (first on line 1)' in text

    bad_csv = tmp_path / "eval.csv"
    bad_csv.write_text('id,prompt,expected\ne1,"Colour of banana?",yellow\ne2,"Sound of duck?",\n')
    page.get_by_label("Eval data (JSONL or CSV)").set_input_files(str(bad_csv))
    page.locator("#file-eval-errors li").first.wait_for()
    assert 'line 3: field "expected" is empty' in page.locator("#file-eval-errors").inner_text()
    assert page.get_by_role("button", name="Start experiment").is_disabled()

    # The downloadable CSV example is itself a valid upload.
    page.get_by_label("Eval data (JSONL or CSV)").set_input_files(str(DASHBOARD_EXAMPLES / "eval.csv"))
    page.locator("#file-eval-summary", has_text="8 eval examples, all valid").wait_for()
    assert page.locator("#file-eval-errors li").count() == 0
    shots.take("upload-errors")


def test_bring_your_own_runpod_key(
    page, stack: Stack, fake_runpod: FakeRunPodProcess, shots: Screenshots
) -> None:
    page.on("dialog", lambda dialog: dialog.accept())
    sign_in(page, "byok")
    page.get_by_role("link", name="Settings").click()
    page.get_by_role("heading", name="Compute", exact=True).wait_for()
    assert page.get_by_label("Hosted (free tier)").is_checked()
    page.locator("#cost-table").wait_for()
    assert "runpod" in page.locator("#cost-table").inner_text().lower()

    page.get_by_label("Bring your own GPU (RunPod)").check()
    notice = page.locator("#key-notice").inner_text()
    assert "full access" in notice and "one serverless endpoint" in notice
    assert page.locator("#key-uses li").count() >= 10  # every RunPod call, one per line
    key_page = page.get_by_role("link", name="RunPod's API keys page")
    assert key_page.get_attribute("href") == "https://console.runpod.io/user/credentials"
    assert page.get_by_role("link", name="runpod.io").get_attribute("href") == "https://runpod.io"
    key_field = page.get_by_label("RunPod API key")
    assert key_field.get_attribute("type") == "password"
    shots.take("settings-runpod-empty")

    key_field.fill("rpa_this_key_does_not_exist")
    page.get_by_role("button", name="Save & Verify").click()
    page.locator("#key-error", has_text="Invalid API key").wait_for()
    assert key_field.input_value() == ""

    key_field.fill(BROKE_RUNPOD_KEY)
    page.get_by_role("button", name="Save & Verify").click()
    page.locator("#key-error", has_text="no funds").wait_for()
    shots.take("settings-key-refused")

    key_field.fill(GOOD_RUNPOD_KEY)
    page.get_by_role("button", name="Show").click()
    assert key_field.get_attribute("type") == "text"
    page.get_by_role("button", name="Save & Verify").click()
    page.locator("#key-saved", has_text=f"ending in {GOOD_RUNPOD_KEY[-4:]}").wait_for()
    assert key_field.input_value() == "" and key_field.get_attribute("type") == "password"
    assert GOOD_RUNPOD_KEY not in page.content()
    assert page.get_by_label("Bring your own GPU (RunPod)").is_checked()
    page.locator('#step-key[data-state="done"]').wait_for()
    assert page.locator("#step-ready").get_attribute("data-state") == "pending"
    shots.take("settings-key-saved")

    # The endpoint is created on the first experiment; then the status reads ready.
    client = runpod_job_completes(page, stack.gateway_url)
    shots.take("runpod-job-completed")
    page.get_by_role("link", name="Settings").click()
    page.locator('#step-ready[data-state="done"]').wait_for()
    assert page.locator("#step-endpoint").get_attribute("data-state") == "done"
    assert GOOD_RUNPOD_KEY not in page.content()
    shots.take("settings-ready")

    # The endpoint as RunPod lists it: id, GPU pools, workers, a link to it; then deleted here.
    endpoint_id = client.request("GET", "/api/settings/runpod-endpoint").json()["endpoint_id"]
    listed = [e["id"] for e in fake_runpod.control("GET", "endpoints")["endpoints"]]  # type: ignore[index]
    assert endpoint_id in listed
    assert page.locator("#endpoint-id").inner_text() == endpoint_id
    assert page.locator("#endpoint-pools").inner_text()
    assert "at most 1" in page.locator("#endpoint-workers").inner_text()
    console = page.get_by_role("link", name="Open it in RunPod's console")
    assert (
        console.get_attribute("href") == f"https://console.runpod.io/serverless/user/endpoint/{endpoint_id}"
    )
    shots.take("settings-endpoint")
    page.get_by_role("button", name="Delete endpoint").click()
    page.locator("#status", has_text="RunPod endpoint deleted").wait_for()
    assert page.locator("#step-ready").get_attribute("data-state") == "pending"
    assert page.locator("#step-endpoint").get_attribute("data-state") == "pending"
    assert page.locator("#endpoint-id").count() == 0
    listed = [e["id"] for e in fake_runpod.control("GET", "endpoints")["endpoints"]]  # type: ignore[index]
    assert endpoint_id not in listed
    assert [r["status"] for r in fake_runpod.requests("serverless.delete")] == [204]
    shots.take("settings-endpoint-deleted")

    # While on Hosted, the stored key can still be removed.
    page.get_by_label("Hosted (free tier)").check()
    page.locator("#runpod-panel").wait_for(state="hidden")
    assert page.locator("#remove-key").is_visible()

    page.get_by_role("button", name="Remove API key").click()
    page.locator("#status", has_text="RunPod key removed").wait_for()
    assert page.get_by_label("Hosted (free tier)").is_checked()
    assert page.locator("#runpod-panel").is_hidden()
    assert page.locator("#saved-key").text_content() == "No key saved."
    assert client.request("GET", "/api/settings/runpod-key").json()["has_key"] is False
    assert GOOD_RUNPOD_KEY not in page.content()
    shots.take("settings-key-removed")


def test_keyboard_only_sign_in(page, shots: Screenshots) -> None:
    page.goto("/")
    page.get_by_role("heading", name="Sign in", exact=True).wait_for()
    for _ in range(8):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement?.id") == "username":
            break
    assert page.evaluate("document.activeElement?.id") == "username"
    page.keyboard.type("keys-only")
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Experiments", exact=True).wait_for()
    # The navigation is reachable and usable with the keyboard too.
    for _ in range(8):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement?.textContent") == "Settings":
            break
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Compute", exact=True).wait_for()
    shots.take("keyboard-settings")


def test_every_field_has_a_label(page, stack: Stack, shots: Screenshots) -> None:
    sign_in(page, "labels")
    client = page_api_client(page, stack.gateway_url)
    job_id = client.submit(sample_spec(n_train=3, n_eval=1, epochs=1))["job_id"]
    for route in ("#/new", "#/settings", f"#/jobs/{job_id}"):
        page.goto(f"/{route}")
        page.locator("main h1").wait_for()
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('main input, main select, main textarea, main progress')]
                 .filter(field => !(field.labels && field.labels.length) && !field.getAttribute('aria-label'))
                 .map(field => field.id || field.name || field.outerHTML)"""
        )
        assert unlabelled == [], f"{route}: {unlabelled}"
        shots.take(route.strip("#/").replace("/", "-"))


def test_pages_load_nothing_from_outside_the_gateway(
    page, stack: Stack, external_requests: ExternalRequests, shots: Screenshots
) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    sign_in(page, "offline")
    pages = (("#/new", "New experiment"), ("#/settings", "Settings"), ("#/jobs", "Experiments"))
    for route, heading in pages:
        page.goto(f"/{route}")
        page.get_by_role("heading", name=heading, exact=True).wait_for()
    page.goto("/#/new")
    page.locator("#model-prices").wait_for()
    page.evaluate("import('/static/js/ui.js').then(ui => ui.loadPlotly())")
    page.wait_for_function("Boolean(window.Plotly)")
    shots.take("offline-new")
    assert any(url.endswith("/static/vendor/plotly.min.js") for url in requested)
    assert requested and not external_requests.seen

    # The guard itself notices a request to another host (and the page fixture then fails).
    outcome = page.evaluate("fetch('http://example.invalid/x').then(() => 'loaded', () => 'blocked')")
    assert outcome == "blocked"
    assert external_requests.seen == ["http://example.invalid/x"]
    external_requests.seen.clear()


def test_dashboard_example_files_match_the_repository_samples() -> None:
    for name in ("train.jsonl", "eval.jsonl", "sample.json"):
        assert (DASHBOARD_EXAMPLES / name).read_text() == (EXAMPLES / name).read_text(), name
    for kind, answer in (("train", "completion"), ("eval", "expected")):
        jsonl = [json.loads(line) for line in (EXAMPLES / f"{kind}.jsonl").read_text().splitlines() if line]
        rows = list(csv.DictReader(io.StringIO((DASHBOARD_EXAMPLES / f"{kind}.csv").read_text())))
        assert rows == [{"id": r["id"], "prompt": r["prompt"], answer: r[answer]} for r in jsonl]


def test_experiments_page_shows_usage_against_the_limits(page, stack: Stack, shots: Screenshots) -> None:
    sign_in(page, "usage-reader")
    client = page_api_client(page, stack.gateway_url)
    job_id = client.submit(sample_spec(n_train=2, n_eval=1, epochs=1))["job_id"]
    list(client.events(job_id))
    page.reload()
    page.locator("#usage").wait_for()
    shots.take("experiments-with-usage")
    assert page.locator("#usage-heading").inner_text() == "Your usage (Hosted (free tier))"

    def limit(name: str) -> str:
        return page.locator(f'#usage [data-limit="{name}"]').inner_text()

    assert limit("active_jobs") == "active (queued or running) jobs on the hosted backend: 0 of 3"
    assert limit("submissions_per_hour") == "hosted submissions in the last hour: 1 of 20"
    used = limit("gpu_seconds_per_month")
    assert used.startswith("hosted GPU-seconds this month: ") and used.endswith(" of 36,000"), used
    assert client.request("GET", "/api/usage").json()["limits"][2]["used"] > 0


def test_experiment_tracking_settings(page, stack: Stack, shots: Screenshots) -> None:
    """Settings -> Experiment tracking: a W&B project and key (shown by its last 4 only, never
    in the page), an MLflow URI refused with the reason, then both removed."""
    wandb_key = "wandbkey-0123456789abcdefghijKEY9"
    sign_in(page, "tracker")
    page.get_by_role("link", name="Settings").click()
    page.get_by_role("heading", name="Experiment tracking").wait_for()
    assert page.locator("#wandb-saved").inner_text() == "Not set."
    page.get_by_label("W&B project").fill("lr-sweeps")
    key_field = page.get_by_label("W&B API key")
    assert key_field.get_attribute("type") == "password"
    key_field.fill(wandb_key)
    page.get_by_role("button", name="Save W&B").click()
    page.locator("#wandb-saved", has_text="with the key ending in KEY9").wait_for()
    assert key_field.input_value() == "" and wandb_key not in page.content()

    page.get_by_label("MLflow tracking URI").fill("http://user:secret@mlflow.example")
    page.get_by_role("button", name="Save MLflow").click()
    page.locator("#tracking-message .error", has_text="must not contain a user name or password").wait_for()
    shots.take("settings-tracking")

    page.get_by_role("button", name="Remove W&B").click()
    page.locator("#wandb-saved", has_text="Not set.").wait_for()
    client = page_api_client(page, stack.gateway_url)
    assert client.request("GET", "/api/settings/tracking").json()["wandb"]["has_key"] is False
