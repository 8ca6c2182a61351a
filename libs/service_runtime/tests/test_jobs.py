"""The one conversion of job states and progress events: round trips between the event objects
the services keep and the messages they exchange, and the cases where the six copies it replaced
had drifted apart (timestamps, the default type, type guards)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from influence.v1 import common_pb2, scheduler_pb2
from service_runtime.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    event_dict,
    event_message,
    is_terminal_event,
    job_state,
    state_name,
    timestamp,
    timestamp_text,
)

MOMENT = datetime(2026, 12, 1, 12, 30, 5, 250000, tzinfo=UTC)


@pytest.mark.parametrize("name", [*ACTIVE_STATES, *TERMINAL_STATES])
def test_every_state_round_trips_in_either_case(name: str) -> None:
    value = job_state(name)
    assert value != common_pb2.JOB_STATE_UNSPECIFIED
    assert state_name(value) == name
    assert job_state(name.upper()) == value  # compute-local and compute-runpod name them so


@pytest.mark.parametrize("name", ["", "unspecified", "JOB_STATE_RUNNING", "timed_out"])
def test_unknown_state_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="is not a job state"):
        job_state(name)


def test_a_state_number_from_a_newer_peer_is_unspecified_not_a_crash() -> None:
    assert state_name(99) == "unspecified"
    assert state_name(common_pb2.JOB_STATE_UNSPECIFIED) == "unspecified"


def test_terminal_event() -> None:
    assert is_terminal_event({"type": "status", "state": "failed"})
    assert not is_terminal_event({"type": "status", "state": "running"})
    assert not is_terminal_event({"type": "progress", "state": "completed"})


def test_progress_event_round_trips_whole() -> None:
    event = {
        "type": "progress",
        "stage": "training",
        "progress": 0.42,
        "message": "epoch 2 of 3",
        "epoch": 2,
        "loss": 1.25,
        "nested": {"ids": ["a", "b"]},
    }
    message = event_message(event, MOMENT, seq=7)
    assert (message.seq, message.type, message.stage, message.progress, message.message) == (
        7,
        "progress",
        "training",
        0.42,
        "epoch 2 of 3",
    )
    assert json.loads(message.event_json) == event
    assert message.time.ToDatetime(tzinfo=UTC) == MOMENT
    # Across the wire and back: the same object, nothing added.
    wire = common_pb2.ProgressEvent.FromString(message.SerializeToString())
    assert event_dict(wire) == event


def test_event_time_from_a_datetime_or_epoch_seconds_or_none() -> None:
    # compute-local and compute-modal date events in epoch seconds, the scheduler by its row.
    assert event_message({}, MOMENT.timestamp()).time == event_message({}, MOMENT).time
    other_zone = MOMENT.astimezone(timezone(timedelta(hours=-5)))
    assert event_message({}, other_zone).time == event_message({}, MOMENT).time
    naive_utc = MOMENT.replace(tzinfo=None)
    assert event_message({}, naive_utc).time == event_message({}, MOMENT).time
    assert not event_message({}, None).HasField("time")


def test_timestamp_text_is_utc_with_z_and_none_when_unset() -> None:
    job = scheduler_pb2.Job(created_at=timestamp(MOMENT.astimezone(timezone(timedelta(hours=2)))))
    assert timestamp_text(job, "created_at") == "2026-12-01T12:30:05.250000Z"
    assert timestamp_text(job, "finished_at") is None
    assert timestamp(None) is None


def test_an_event_without_a_type_is_a_progress_event_both_ways() -> None:
    message = event_message({"stage": "loading_model"}, MOMENT)
    assert message.type == "progress"
    assert event_dict(message)["type"] == "progress"
    # A message whose sender set no type at all reads as progress too.
    assert event_dict(common_pb2.ProgressEvent(event_json=b'{"step": 3}')) == {"step": 3, "type": "progress"}


@pytest.mark.parametrize(
    ("progress", "typed"),
    [
        (0.5, 0.5),
        (1, 1.0),
        ("0.5", 0.0),  # a string is not a figure (compute-local once parsed it, and crashed on "abc")
        ("abc", 0.0),
        (True, 0.0),  # a bool is an int to Python, not a progress
        (None, 0.0),
        (float("nan"), 0.0),
        (float("inf"), 0.0),
        ([0.5], 0.0),
    ],
)
def test_progress_is_typed_only_from_a_finite_number(progress: object, typed: float) -> None:
    message = event_message({"type": "progress", "progress": progress}, MOMENT)
    assert message.progress == typed
    # The full object still carries what the worker sent.
    assert "progress" in json.loads(message.event_json)


def test_text_fields_are_typed_only_from_strings() -> None:
    message = event_message({"type": 3, "stage": {"name": "x"}, "message": ["a"]}, MOMENT)
    assert (message.type, message.stage, message.message) == ("progress", "", "")
    assert json.loads(message.event_json)["stage"] == {"name": "x"}


def test_an_error_events_words_are_its_message() -> None:
    message = event_message({"type": "error", "error": "CUDA out of memory"}, MOMENT)
    assert message.message == "CUDA out of memory"
    assert event_message({"type": "error", "error": "x", "message": "plain"}, MOMENT).message == "plain"


def test_typed_fields_fill_only_what_the_object_lacks() -> None:
    message = common_pb2.ProgressEvent(
        type="log",
        stage="eval_base",
        progress=0.3,
        message="typed",
        event_json=json.dumps({"type": "progress", "message": "from the worker"}).encode(),
    )
    assert event_dict(message) == {
        "type": "progress",
        "message": "from the worker",
        "stage": "eval_base",
        "progress": 0.3,
    }


def test_an_event_without_progress_does_not_claim_zero() -> None:
    status = event_message({"type": "status", "state": "completed"}, MOMENT, seq=9)
    assert "progress" not in event_dict(status)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"not json {", {"raw": "not json {", "type": "progress"}),
        (b"[1, 2]", {"value": [1, 2], "type": "progress"}),
        (b'"text"', {"value": "text", "type": "progress"}),
        (b"", {"type": "progress"}),
    ],
)
def test_a_body_that_is_not_an_object_is_kept_not_dropped(raw: bytes, expected: dict) -> None:
    assert event_dict(common_pb2.ProgressEvent(event_json=raw)) == expected


def test_a_diverged_loss_travels_as_null_strict_json_both_ways() -> None:
    event = {
        "type": "progress",
        "stage": "training",
        "progress": 0.5,
        "loss": float("nan"),
        "history": [1.0, float("inf"), {"grad_norm": float("-inf")}],
    }
    message = event_message(event, MOMENT)
    stored = json.loads(message.event_json, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert stored["loss"] is None and stored["history"] == [1.0, None, {"grad_norm": None}]
    # An event stored before the fix, with Python's NaN token, reads back as strict JSON too.
    old = common_pb2.ProgressEvent(type="progress", event_json=b'{"loss": NaN, "step": 3}')
    body = event_dict(old)
    assert body["loss"] is None and body["step"] == 3
    json.dumps(body, allow_nan=False)
