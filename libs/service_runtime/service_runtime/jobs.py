"""Job states, progress events and timestamps as they cross the wire, converted one way by every
service (the compute providers, the scheduler and the gateway).

A progress event is the JSON object gpu_core yields. A ``ProgressEvent`` message carries it whole
in ``event_json`` with the fields routing and display need typed beside it: providers build the
message from their events (``event_message``), the scheduler stores what a provider sent
(``event_dict``) and sends stored events on with their seq, and the gateway reads them back.
The typed fields are filled only from values of the right type (a string stage, a finite number
of progress), so an odd event never fails a whole status call; the full object still travels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, cast

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from influence.v1 import common_pb2, compute_pb2

# Every state's name as the scheduler stores it and the REST API shows it, in lifecycle order.
ACTIVE_STATES = ("queued", "submitted", "running")
TERMINAL_STATES = ("completed", "failed", "cancelled")
# What an event without a type is: gpu_core's events all have one; a provider's may not.
DEFAULT_EVENT_TYPE = "progress"
_STATE_PREFIX = "JOB_STATE_"
_UNSPECIFIED = "unspecified"


def job_state(name: str) -> common_pb2.JobState:
    """``"running"`` (or ``"RUNNING"``, as some providers name it) -> ``JOB_STATE_RUNNING``."""
    if name.lower() != _UNSPECIFIED:
        try:
            # protoc's stubs type Value() as a plain int
            return cast(common_pb2.JobState, common_pb2.JobState.Value(_STATE_PREFIX + name.upper()))
        except ValueError:
            pass
    raise ValueError(f"{name!r} is not a job state")


def state_name(state: int) -> str:
    """``JOB_STATE_RUNNING`` -> ``"running"``; a number this code does not know -> ``"unspecified"``."""
    try:
        return common_pb2.JobState.Name(state).removeprefix(_STATE_PREFIX).lower()
    except ValueError:
        return _UNSPECIFIED


def is_terminal_event(event: Mapping[str, Any]) -> bool:
    """The status event that ends a job's stream."""
    return event.get("type") == "status" and event.get("state") in TERMINAL_STATES


def timestamp(moment: datetime | float | None) -> Timestamp | None:
    """A datetime (naive ones are UTC) or seconds since the epoch as a Timestamp; None stays unset."""
    if moment is None:
        return None
    stamp = Timestamp()
    if isinstance(moment, datetime):
        stamp.FromDatetime(moment)
    else:
        # Microseconds, as a datetime keeps: a float of epoch seconds holds no finer figure.
        stamp.FromMicroseconds(round(moment * 1e6))
    return stamp


def timestamp_text(message: Message, field: str) -> str | None:
    """ISO 8601 in UTC with a ``Z`` of the message's Timestamp ``field``; None when it is unset."""
    if not message.HasField(field):
        return None
    value: Timestamp = getattr(message, field)
    return value.ToDatetime().isoformat() + "Z"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return float(value)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity (a diverged loss) replaced by None: strict JSON, which a
    browser's ``JSON.parse`` and PostgreSQL's jsonb accept, where Python's ``json`` writes ``NaN``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def event_message(
    event: Mapping[str, Any], time: datetime | float | None, seq: int = 0
) -> common_pb2.ProgressEvent:
    """A provider's (or the scheduler's stored) event as a message. ``time``: when it happened, as
    far as the sender knows; ``seq``: the scheduler's position of the event (0: not assigned)."""
    return common_pb2.ProgressEvent(
        seq=seq,
        type=_text(event.get("type")) or DEFAULT_EVENT_TYPE,
        stage=_text(event.get("stage")),
        progress=_fraction(event.get("progress")),
        # An error event says what went wrong under "error": those are its plain words.
        message=_text(event.get("message")) or _text(event.get("error")),
        event_json=json.dumps(json_safe(dict(event)), allow_nan=False).encode(),
        time=timestamp(time),
    )


def event_dict(message: common_pb2.ProgressEvent) -> dict[str, Any]:
    """The event object a message carries, with the typed fields filled in where it lacks them.
    Nothing is dropped: a body that is not a JSON object is kept under ``raw`` or ``value``."""
    body: Any = {}
    if message.event_json:
        try:
            body = json.loads(message.event_json)
        except ValueError:
            body = {"raw": message.event_json.decode("utf-8", "replace")}
    # Events stored before json_safe may hold NaN, which json.loads reads and JSON.parse refuses.
    body = json_safe(body)
    if not isinstance(body, dict):
        body = {"value": body}
    body.setdefault("type", message.type or DEFAULT_EVENT_TYPE)
    if message.stage:
        body.setdefault("stage", message.stage)
    # 0 is also proto3's "not set": an event without progress (a log line) does not claim 0.
    if message.progress:
        body.setdefault("progress", message.progress)
    if message.message:
        body.setdefault("message", message.message)
    return body


def dataset_files_payload(request: compute_pb2.SubmitRequest) -> list[dict[str, Any]]:
    """A SubmitRequest's stored datasets as a worker's payload carries them (gpu_core.datasets)."""
    return [
        {"role": d.role, "url": d.url, "sha256": d.sha256, "bytes": d.bytes, "filename": d.filename}
        for d in request.datasets
    ]
