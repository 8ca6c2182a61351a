"""The scheduler's own Prometheus metrics (RPC counts and latencies come from service_runtime)."""

from __future__ import annotations

from prometheus_client import Gauge

from scheduler.providers import PROVIDER_ERRORS
from service_runtime.jobs import ACTIVE_STATES

JOBS_BY_STATE = Gauge("scheduler_jobs", "Jobs in the table, by state", ["state"])
QUEUE_DEPTH = Gauge("scheduler_queue_depth", "Jobs not yet in a terminal state")

__all__ = ["JOBS_BY_STATE", "PROVIDER_ERRORS", "QUEUE_DEPTH", "record_job_counts"]


def record_job_counts(counts: dict[str, int]) -> None:
    for state, count in counts.items():
        JOBS_BY_STATE.labels(state).set(count)
    QUEUE_DEPTH.set(sum(counts.get(state, 0) for state in ACTIVE_STATES))
