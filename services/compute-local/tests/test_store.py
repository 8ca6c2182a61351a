"""What the runner does with the work dir it finds at start: retention, crash recovery, and a
half-written event line. No child process runs here."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from compute_local.config import DeviceSlots
from compute_local.jobs import JobRecord, JobState, JobStore, StoredEvent
from compute_local.runner import STOPPED_MESSAGE, JobNotFound, LocalRunner, ResultNotReady

DAY_S = 24 * 3600.0


def _stored_job(store: JobStore, provider_job_id: str, state: JobState, finished_ago_s: float | None) -> None:
    now = time.time()
    record = JobRecord(
        provider_job_id=provider_job_id,
        job_id=f"job-{provider_job_id}",
        state=state,
        created_at=now - 10 * DAY_S,
        device="cpu",
        finished_at=None if finished_ago_s is None else now - finished_ago_s,
        pid=None if state.terminal else 999_999,
    )
    store.create(record, b"{}")
    store.append_event(provider_job_id, StoredEvent({"type": "progress", "progress": 0.5}, now))
    if state is JobState.COMPLETED:
        store.write_result(provider_job_id, b'{"ok": true}')


def _runner(work_dir: Path, retention_s: float) -> LocalRunner:
    return LocalRunner(
        JobStore(work_dir),
        devices=(DeviceSlots("cpu", 1, 1),),
        cancel_grace_s=1.0,
        retention_s=retention_s,
    )


async def test_start_removes_expired_results_and_keeps_the_rest(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    _stored_job(store, "local-old", JobState.COMPLETED, finished_ago_s=8 * DAY_S)
    _stored_job(store, "local-recent", JobState.COMPLETED, finished_ago_s=1 * DAY_S)
    runner = _runner(tmp_path, retention_s=7 * DAY_S)
    await runner.start()
    try:
        assert not store.job_dir("local-old").exists()
        with pytest.raises(JobNotFound):
            runner.status("local-old", "", "")
        with pytest.raises(JobNotFound):
            runner.status("", "job-local-old", "")
        assert runner.result("local-recent", "") == b'{"ok": true}'
        assert runner.result("", "job-local-recent") == b'{"ok": true}'
        # The recent one expires too once its time has come.
        assert runner.remove_expired(time.time() + 7 * DAY_S) == ["local-recent"]
        assert not store.job_dir("local-recent").exists()
    finally:
        await runner.shutdown()


async def test_a_job_running_when_the_service_died_becomes_failed(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    _stored_job(store, "local-crashed", JobState.RUNNING, finished_ago_s=None)
    runner = _runner(tmp_path, retention_s=7 * DAY_S)
    await runner.start()
    try:
        status = runner.status("local-crashed", "", "")
        assert status.state is JobState.FAILED and status.error == STOPPED_MESSAGE
        assert status.events[-1].event == {"type": "error", "message": STOPPED_MESSAGE}
        with pytest.raises(ResultNotReady, match=STOPPED_MESSAGE):
            runner.result("local-crashed", "")
        reloaded = JobStore(tmp_path).load_all()
        assert [job.record.state for job in reloaded] == [JobState.FAILED]
    finally:
        await runner.shutdown()


def test_a_half_written_event_line_is_dropped_and_appending_continues(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    _stored_job(store, "local-cut", JobState.COMPLETED, finished_ago_s=0)
    with open(store.job_dir("local-cut") / "events.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"time": 1, "event": {"type": "prog')
    [loaded] = store.load_all()
    assert [stored.event for stored in loaded.events] == [{"type": "progress", "progress": 0.5}]
    store.append_event("local-cut", StoredEvent({"type": "result"}, time.time()))
    [reloaded] = store.load_all()
    assert [stored.event["type"] for stored in reloaded.events] == ["progress", "result"]
