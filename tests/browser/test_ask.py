"""Ask on the results page in real Chromium against the real stack: type a prompt that copies a
training example's, see the fine-tuned model's answer and the helpful and harmful training
examples with their texts, select part of the answer with the keyboard and attribute only that
span, then with the mouse; earlier queries are listed with the experiment. Screenshots go to
artifacts/screenshots/."""

from __future__ import annotations

import pytest

from benchmarks.planted import planted_duplicate_spec
from devstack.stack import Stack

from .support import Screenshots, page_api_client, sign_in

pytestmark = pytest.mark.browser

JOB_TIMEOUT_MS = 120_000
COPIED = 11


def test_ask_shows_the_answer_its_training_texts_and_a_selected_span(
    page, stack: Stack, shots: Screenshots
) -> None:
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    sign_in(page, "asker")
    client = page_api_client(page, stack.gateway_url)
    spec = planted_duplicate_spec("trackstar", 16, 2, 60)
    job_id = client.submit(spec)["job_id"]
    assert list(client.events(job_id))[-1]["state"] == "completed"
    copied = spec["training_data"][COPIED]

    page.goto(f"/#/jobs/{job_id}")
    page.locator("#ask").wait_for(timeout=JOB_TIMEOUT_MS)
    page.get_by_label("Prompt").fill(copied["prompt"])
    page.get_by_role("button", name="Ask", exact=True).click()
    page.locator("#ask-result:visible, #ask-error:visible").first.wait_for(timeout=JOB_TIMEOUT_MS)
    assert page.locator("#ask-error").is_hidden(), page.locator("#ask-error").inner_text()
    answer = page.locator("#ask-output").input_value()
    assert answer
    top = page.locator("#ask-helpful li").first
    assert top.get_attribute("data-train-id") == f"t{COPIED}"
    assert top.locator("q.train-prompt").inner_text() == copied["prompt"]
    assert top.locator("q.train-answer").inner_text() == copied["completion"]
    assert page.locator("#ask-harmful li").count() == 5
    assert "the whole answer" in page.locator("#ask-counted").inner_text()
    assert page.get_by_role("button", name="Attribute the selection").is_disabled()
    page.locator("#ask").screenshot(path=str(shots.path("answer")))

    # Keyboard: from the start of the answer, Shift+Right selects its first character(s).
    end = max(1, len(answer) // 2)
    box = page.locator("#ask-output")
    box.focus()
    box.press("Home")
    for _ in range(end):
        box.press("Shift+ArrowRight")
    assert page.locator("#ask-selection").inner_text() == (f"Selected “{answer[:end]}” (characters 0–{end}).")
    page.locator("#ask").screenshot(path=str(shots.path("keyboard-selection")))
    page.get_by_role("button", name="Attribute the selection").click()
    page.locator("#ask-counted", has_text=f"characters 0–{end}").wait_for(timeout=JOB_TIMEOUT_MS)
    assert page.locator("#ask-helpful li").first.get_attribute("data-train-id") == f"t{COPIED}"
    assert page.locator("#ask-helpful li q.train-prompt").count() == 5
    page.locator("#ask").screenshot(path=str(shots.path("span-answer")))

    # Mouse: drag across the answer box selects characters in it too.
    bounds = box.bounding_box()
    assert bounds is not None
    first_line = bounds["y"] + 10
    page.mouse.move(bounds["x"] + 4, first_line)
    page.mouse.down()
    page.mouse.move(bounds["x"] + bounds["width"] - 4, first_line, steps=5)
    page.mouse.up()
    start, stop = box.evaluate("b => [b.selectionStart, b.selectionEnd]")
    assert stop > start
    assert page.get_by_role("button", name="Attribute the selection").is_enabled()

    # Both queries are listed with the experiment, newest first, and the API agrees.
    history = page.locator("#ask-history li")
    assert history.count() == 2
    assert f"[0–{end}]" in history.nth(0).inner_text() and copied["prompt"] in history.nth(1).inner_text()
    listed = client.request("GET", f"/api/jobs/{job_id}/queries").json()["queries"]
    assert [q["query_job_id"] for q in listed] == [
        history.nth(i).get_attribute("data-query-job-id") for i in range(2)
    ]
    # An earlier query opens again from the list.
    history.nth(1).get_by_role("button").click()
    page.locator("#ask-counted", has_text="the whole answer").wait_for()
    shots.take("history")
    assert not console_errors, console_errors
