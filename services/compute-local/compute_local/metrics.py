"""Prometheus view of the runner, read at scrape time (no counters to keep in step by hand)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from compute_local.jobs import JobState
from compute_local.runner import LocalRunner

_FINAL_STATES = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class RunnerCollector(Collector):
    def __init__(self, runner: LocalRunner) -> None:
        self._runner = runner

    def collect(self) -> Iterator[Metric]:
        runner = self._runner
        yield GaugeMetricFamily(
            "compute_local_queue_depth", "Jobs waiting for a free device", value=runner.queue_depth
        )
        yield GaugeMetricFamily(
            "compute_local_running_jobs", "Jobs running in a child process", value=runner.running_count
        )
        yield GaugeMetricFamily(
            "compute_local_slots",
            "Jobs that can run at once (one per GPU, the CPU slots)",
            value=runner.slot_count,
        )
        finished = CounterMetricFamily(
            "compute_local_jobs_finished",
            "Jobs that reached a final state since this process started",
            labels=["state"],
        )
        for state in _FINAL_STATES:
            finished.add_metric([state.value.lower()], runner.finished_counts[state])
        yield finished
