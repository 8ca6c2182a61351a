"""Chat-format data in the New experiment page: the gateway detects the format, the data check
shows the templated preview and names the example max_seq_len truncates, and the experiment
runs with the model's chat template."""

from __future__ import annotations

import pytest

from devstack.stack import REPO_ROOT, Stack

from .support import Screenshots, page_api_client, sign_in

pytestmark = pytest.mark.browser

EXAMPLES = REPO_ROOT / "examples"
JOB_TIMEOUT_MS = 120_000
# The inline limit of this module's stack: chat_train.jsonl (27) fits, a larger file is stored.
MAX_TRAIN_EXAMPLES = 30


@pytest.fixture(scope="module")
def stack_overrides() -> dict[str, str]:
    return {"GATEWAY_MAX_TRAIN_EXAMPLES": str(MAX_TRAIN_EXAMPLES)}


def test_chat_upload_shows_format_and_length_report_then_runs(page, stack: Stack, shots: Screenshots) -> None:
    sign_in(page, "chat-researcher")
    page.get_by_role("link", name="New experiment").first.click()
    page.get_by_label("Model", exact=True).wait_for()

    page.get_by_label("Training data (JSONL or CSV)").set_input_files(str(EXAMPLES / "chat_train.jsonl"))
    page.get_by_label("Eval data (JSONL or CSV)").set_input_files(str(EXAMPLES / "chat_eval.jsonl"))
    page.locator("#file-train-format", has_text="Format: chat messages").wait_for()
    page.locator("#file-eval-format", has_text="Format: chat messages").wait_for()
    assert "27 training examples, all valid" in page.locator("#file-train-summary").inner_text()
    page.get_by_label("Epochs").fill("1")
    page.get_by_label("Max new tokens per answer").fill("4")
    page.get_by_label("Top influential examples to keep").fill("3")
    # Single-turn examples are about 85 tokens under the template; the two-turn one is longer.
    page.get_by_label("Max sequence length (tokens)").fill("100")

    truncated = page.locator("#truncated-examples")
    truncated.wait_for()
    assert "chat-two-turns" in truncated.inner_text() and "max_seq_len 100" in truncated.inner_text()
    assert "chat template" in page.locator("#data-template").inner_text()
    rows = page.locator("#length-table tbody tr")
    assert rows.count() == 2 and "1 of 27 over 100" in rows.first.inner_text()
    findings = page.locator("#data-findings").inner_text()
    assert "eval examples copy a training example" in findings and "dup-apple = color-apple" in findings
    page.locator("#data-preview summary").click()
    marked = page.locator("#data-preview mark").all_inner_texts()
    assert marked and marked[0].startswith("red")  # the assistant's answer is what trains
    assert "<|user|>" in page.locator("#data-preview pre").inner_text()
    page.locator("#estimate-table").wait_for()
    shots.take("chat-data-check")

    page.get_by_role("button", name="Start experiment").click()
    page.wait_for_url("**/#/jobs/*")
    job_id = page.url.rsplit("/", 1)[-1]
    page.wait_for_function(
        "['completed', 'failed', 'cancelled'].includes(document.querySelector('#job-status')?.textContent)",
        timeout=JOB_TIMEOUT_MS,
    )
    assert page.locator("#job-status").inner_text() == "completed"
    shots.take("chat-job-done")
    client = page_api_client(page, stack.gateway_url)
    result = client.results(job_id)
    assert result["data"]["template"] == "chat" and result["data"]["training_format"] == "messages"
    spec = client.request("GET", f"/api/jobs/{job_id}/spec").json()
    assert spec["template"] == "auto" and spec["data_format"] == {"training": "messages", "eval": "messages"}


def test_bad_chat_file_names_line_and_field(page, stack: Stack, tmp_path, shots: Screenshots) -> None:
    sign_in(page, "chat-careless")
    page.goto("/#/new")
    bad = tmp_path / "chat.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
        '{"instruction": "hi", "output": "yo"}\n'
    )
    page.get_by_label("Training data (JSONL or CSV)").set_input_files(str(bad))
    errors = page.locator("#file-train-errors")
    errors.locator("li").first.wait_for()
    text = errors.inner_text()
    assert 'chat.jsonl: line 2: field "messages[0].role"' in text
    assert 'line 3: field "messages": the conversation has no assistant turn' in text
    assert "line 4: is Alpaca (instruction / input / output) but line 1 is chat messages" in text
    assert page.get_by_role("button", name="Start experiment").is_disabled()
    shots.take("chat-upload-errors")


def test_dashboard_chat_examples_match_the_repository_samples() -> None:
    dashboard = REPO_ROOT / "services" / "gateway" / "gateway" / "dashboard" / "static" / "examples"
    for name in ("chat_train.jsonl", "chat_eval.jsonl"):
        assert (dashboard / name).read_text() == (EXAMPLES / name).read_text(), name


def test_a_file_over_the_inline_limit_is_stored_as_a_dataset_and_named_by_id(
    page, stack: Stack, tmp_path, shots: Screenshots
) -> None:
    sign_in(page, "big-data")
    page.goto("/#/new")
    page.get_by_label("Model", exact=True).wait_for()
    large = tmp_path / "large.jsonl"
    large.write_text("".join(f'{{"prompt": "{i} + 1 =", "completion": " {i + 1}"}}\n' for i in range(45)))
    page.get_by_label("Training data (JSONL or CSV)").set_input_files(str(large))
    page.get_by_label("Eval data (JSONL or CSV)").set_input_files(str(EXAMPLES / "chat_eval.jsonl"))
    summary = page.locator("#file-train-summary", has_text="Stored as dataset ds_")
    summary.wait_for()
    assert "large.jsonl: 45 training examples, all valid." in summary.inner_text()
    page.locator("#estimate-table").wait_for()
    shots.take("dataset-stored")
    client = page_api_client(page, stack.gateway_url)
    (dataset,) = client.request("GET", "/api/datasets").json()["datasets"]
    assert dataset["count"] == 45 and dataset["dataset_id"] in summary.inner_text()
