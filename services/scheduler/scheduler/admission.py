"""Admission control: per-user limits checked when a job is submitted.

Hosted jobs spend the operator's money, so four limits apply: active (queued + running) jobs,
submissions per rolling hour, GPU-seconds per calendar month (UTC; a job counts its estimate
while active and the time it ran once finished) and a per-job ceiling on the estimated time and
cost. BYOK jobs are the researcher's own money: only their active-jobs cap applies.

Active jobs are counted from the jobs table, submissions and GPU-seconds from the append-only
usage ledger (ledger.py: deleting a job refunds nothing), inside the transaction that inserts the
job, under a per-user advisory lock, so two concurrent submissions (on any scheduler replica)
cannot both take the last free place. A limit of 0 is no limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from scheduler import ledger
from scheduler.config import Settings
from scheduler.db import DbConnection, returned_row

ACTIVE_JOBS = "active_jobs"
SUBMISSIONS_PER_HOUR = "submissions_per_hour"
GPU_SECONDS_PER_MONTH = "gpu_seconds_per_month"
_MIN_RETRY_AFTER_S = 5


# Same shape as providers.py's ProviderError, ProviderNotConfigured and Route: exceptions that
# keep their own fields for the gRPC status mapping, then a frozen record; the fields differ.
class AdmissionRefused(Exception):
    """Over a quota: RESOURCE_EXHAUSTED (HTTP 429) with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class JobTooLarge(ValueError):
    """The job's estimate is over the hosted per-job ceiling: waiting does not help (422)."""


@dataclass(frozen=True)
class LimitUsage:
    name: str
    description: str
    used: float
    limit: float
    resets_at: datetime | None

    @property
    def exceeded(self) -> bool:
        return self.limit > 0 and self.used >= self.limit


@dataclass(frozen=True)
class Usage:
    backend: str
    limits: list[LimitUsage]
    max_job_time_s: float
    max_job_cost_usd: float

    def limit(self, name: str) -> LimitUsage | None:
        return next((entry for entry in self.limits if entry.name == name), None)


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(now: datetime) -> datetime:
    start = month_start(now)
    return (start + timedelta(days=32)).replace(day=1)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


async def current_usage(conn: DbConnection, settings: Settings, user_id: str, backend: str) -> Usage:
    """The user's usage of every limit that applies to ``backend``."""
    now = datetime.now(UTC)
    hosted = backend == "hosted"
    active_limit = settings.hosted_max_active_jobs if hosted else settings.byok_max_active_jobs
    active = returned_row(
        await conn.fetchrow(
            """SELECT count(*) AS n,
                  min(created_at + make_interval(secs => greatest(estimated_time_s, 0))) AS first_done
           FROM jobs WHERE user_id = $1 AND compute_backend = $2
                AND status IN ('queued', 'submitted', 'running') AND graph_job_id IS NULL""",
            user_id,
            backend,
        )
    )
    limits = [
        LimitUsage(
            ACTIVE_JOBS,
            f"active (queued or running) jobs on the {backend} backend",
            float(active["n"]),
            float(active_limit),
            active["first_done"] if active["n"] else None,
        )
    ]
    if hosted:
        submissions, oldest = await ledger.submissions_since(conn, user_id, backend, now - timedelta(hours=1))
        limits.append(
            LimitUsage(
                SUBMISSIONS_PER_HOUR,
                "hosted submissions in the last hour",
                float(submissions),
                float(settings.hosted_max_submissions_per_hour),
                oldest + timedelta(hours=1) if oldest else None,
            )
        )
        gpu_seconds = await ledger.gpu_seconds_since(conn, user_id, backend, month_start(now))
        limits.append(
            LimitUsage(
                GPU_SECONDS_PER_MONTH,
                "hosted GPU-seconds this month",
                round(float(gpu_seconds), 1),
                float(settings.hosted_gpu_seconds_per_month),
                next_month_start(now),
            )
        )
    return Usage(
        backend=backend,
        limits=limits,
        max_job_time_s=settings.hosted_max_job_time_s if hosted else 0.0,
        max_job_cost_usd=settings.hosted_max_job_cost_usd if hosted else 0.0,
    )


def _retry_after(resets_at: datetime | None, now: datetime) -> int:
    if resets_at is None:
        return _MIN_RETRY_AFTER_S
    return max(_MIN_RETRY_AFTER_S, math.ceil((resets_at - now).total_seconds()))


def check_ceiling(usage: Usage, estimated_time_s: float, estimated_cost_usd: float) -> None:
    """Raise JobTooLarge when the job's estimate is over a hosted per-job ceiling."""
    if usage.max_job_time_s and estimated_time_s > usage.max_job_time_s:
        raise JobTooLarge(
            f"this job is estimated at {_number(estimated_time_s)} s, over the hosted tier's "
            f"per-job limit of {_number(usage.max_job_time_s)} s (HOSTED_MAX_JOB_TIME_S): use fewer "
            "examples or epochs, a smaller model, or your own RunPod key"
        )
    if usage.max_job_cost_usd and estimated_cost_usd > usage.max_job_cost_usd:
        raise JobTooLarge(
            f"this job is estimated at ${estimated_cost_usd:.2f}, over the hosted tier's per-job "
            f"limit of ${usage.max_job_cost_usd:.2f} (HOSTED_MAX_JOB_COST_USD): use fewer examples "
            "or epochs, a smaller model, or your own RunPod key"
        )


def check_spend_cap(max_cost_usd: float, estimated_cost_usd: float) -> None:
    """Raise JobTooLarge when the job's estimate is over the researcher's own spend cap."""
    if max_cost_usd > 0 and estimated_cost_usd > max_cost_usd:
        raise JobTooLarge(
            f"max_cost_usd: this job is estimated at ${estimated_cost_usd:.4f}, over your spend cap "
            f"of ${max_cost_usd:.4f}: raise the cap, or use fewer examples or epochs or a smaller model"
        )


def check_quota(usage: Usage, estimated_time_s: float) -> None:
    """Raise AdmissionRefused when one more job of ``estimated_time_s`` is over a quota."""
    now = datetime.now(UTC)
    # The three checks share a shape, not logic: each quota has its own test (the monthly one
    # adds the estimate) and its own wording; a table of lambdas would read worse.
    active = usage.limit(ACTIVE_JOBS)
    if active is not None and active.exceeded:
        raise AdmissionRefused(
            f"You have {_number(active.used)} {active.description}; the limit is "
            f"{_number(active.limit)} per user. Wait for one to finish or cancel one.",
            _retry_after(active.resets_at, now),
        )
    hourly = usage.limit(SUBMISSIONS_PER_HOUR)
    if hourly is not None and hourly.exceeded:
        raise AdmissionRefused(
            f"You made {_number(hourly.used)} {hourly.description}; the limit is "
            f"{_number(hourly.limit)} per hour.",
            _retry_after(hourly.resets_at, now),
        )
    monthly = usage.limit(GPU_SECONDS_PER_MONTH)
    if monthly is not None and monthly.limit > 0 and monthly.used + estimated_time_s > monthly.limit:
        raise AdmissionRefused(
            f"You have used {_number(monthly.used)} {monthly.description} of the "
            f"{_number(monthly.limit)} allowed; this job's estimated {_number(estimated_time_s)} s "
            "would go over. The allowance renews at the start of next month (UTC), or use your own "
            "RunPod key.",
            _retry_after(monthly.resets_at, now),
        )
