"""The client's pure parts: the SSE parser, artifact names that must stay inside the download
directory, and the progress line of ``influence submit --follow``."""

from __future__ import annotations

import io

import pytest

from influence_client import models
from influence_client.cli import ProgressBar
from influence_client.client import SseParser, _safe_artifact_name


def test_sse_parser_yields_data_events_and_skips_comments() -> None:
    parser = SseParser()
    lines = [
        "retry: 3000",
        "",
        ": heartbeat",
        "",
        "id: 4",
        'data: {"type":"progress","seq":4}',
        "",
        "event: end",
        'data: {"job_id":"j","status":"completed"}',
        "",
    ]
    parsed = [event for event in map(parser.feed, lines) if event is not None]
    assert parsed == [
        ("message", {"type": "progress", "seq": 4}),
        ("end", {"job_id": "j", "status": "completed"}),
    ]


@pytest.mark.parametrize("name", ["../secrets", "/etc/passwd", "adapter/../../x", "", "a\\b"])
def test_artifact_names_outside_the_directory_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a relative path"):
        _safe_artifact_name(name)


def test_nested_artifact_names_are_kept() -> None:
    assert _safe_artifact_name("adapter/adapter_model.safetensors") == "adapter/adapter_model.safetensors"


def test_progress_line_shows_stage_epoch_loss_and_eta() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, interactive=False)
    bar.started -= 30  # 30 s in at 50 %: 30 s to go
    event = models.JobEvent.model_validate(
        {
            "type": "progress",
            "seq": 9,
            "stage": "training",
            "progress": 0.5,
            "epoch": 3,
            "total_epochs": 10,
            "loss": 1.23456,
        }
    )
    bar.update(event)
    line = out.getvalue()
    assert line.startswith("training") and "[############------------]" in line
    assert " 50%" in line and "epoch 3/10" in line and "loss 1.2346" in line and "ETA 0:30" in line
    bar.update(event)  # same stage, no new progress: no second line in a log
    assert out.getvalue().count("\n") == 1
