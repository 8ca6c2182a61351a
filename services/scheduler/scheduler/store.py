"""PostgreSQL access for profiles, jobs and job events. Every statement lives here.

Event sequence numbers are assigned in the same transaction that stores the provider cursor
they came from, with the job row locked, so a restart or a second follower can neither skip
nor duplicate an event.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from scheduler.db import DbConnection, returned_row
from service_runtime.jobs import ACTIVE_STATES, TERMINAL_STATES

NOTIFY_CHANNEL = "scheduler_job_events"
ALL_STATES = ACTIVE_STATES + TERMINAL_STATES
# An admission check run inside the insert's transaction; it raises to refuse the job.
Admit = Callable[[DbConnection], Awaitable[None]]


@dataclass(frozen=True)
class Profile:
    user_id: str
    compute_backend: str
    runpod_endpoint_id: str
    endpoint_status: str
    endpoint_error: str


@dataclass(frozen=True)
class JobRow:
    id: str
    user_id: str
    compute_backend: str
    provider: str
    provider_job_id: str
    status: str
    stage: str
    progress: float
    stage_message: str
    latest_metrics: dict[str, Any]
    spec: dict[str, Any]
    error: str
    estimated_time_s: float
    estimated_cost_usd: float
    provider_cursor: str
    last_seq: int
    submit_attempts: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    artifacts: list[dict[str, Any]]
    kind: str = "experiment"
    parent_job_id: str = ""  # the experiment a later job builds on
    request: Any = None  # the kind's request (gpu_core.jobs); None for an experiment

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATES


@dataclass(frozen=True)
class Lease:
    """A replica's claim on the jobs it follows: its id and how long a claim lasts unrenewed."""

    owner: str
    seconds: float


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    event: dict[str, Any]
    created_at: datetime


@dataclass
class JobUpdate:
    """A change to a job; ``None`` leaves a field as it is. A terminal ``status`` appends the
    terminal event {"type": "status", "state": ...} after ``events``."""

    events: list[dict[str, Any]] = field(default_factory=list)
    cursor: str | None = None
    status: str | None = None
    stage: str | None = None
    progress: float | None = None
    stage_message: str | None = None
    latest_metrics: dict[str, Any] | None = None
    result: Any = None
    error: str | None = None
    artifacts: list[dict[str, Any]] | None = None


_JOB_COLUMNS = """id::text AS id, user_id, compute_backend, provider,
    coalesce(provider_job_id, '') AS provider_job_id, status, stage, progress, stage_message,
    latest_metrics, spec, error, estimated_time_s, estimated_cost_usd, provider_cursor, last_seq,
    submit_attempts, created_at, updated_at, finished_at, artifacts, kind,
    coalesce(parent_job_id::text, '') AS parent_job_id, request"""


def _job(row: asyncpg.Record) -> JobRow:
    return JobRow(**dict(row))


def _profile(row: asyncpg.Record) -> Profile:
    return Profile(
        user_id=row["user_id"],
        compute_backend=row["compute_backend"],
        runpod_endpoint_id=row["runpod_endpoint_id"] or "",
        endpoint_status=row["endpoint_status"],
        endpoint_error=row["endpoint_error"],
    )


def parse_job_id(job_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        return None


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # ---- profiles -----------------------------------------------------------------------

    async def get_profile(self, user_id: str) -> Profile:
        """The user's profile, created with the defaults on first use."""
        row = await self.pool.fetchrow(
            """INSERT INTO profiles (user_id) VALUES ($1)
               ON CONFLICT (user_id) DO UPDATE SET user_id = excluded.user_id
               RETURNING *""",
            user_id,
        )
        return _profile(returned_row(row))

    async def set_backend(self, user_id: str, backend: str) -> Profile:
        row = await self.pool.fetchrow(
            """INSERT INTO profiles (user_id, compute_backend) VALUES ($1, $2)
               ON CONFLICT (user_id) DO UPDATE
               SET compute_backend = excluded.compute_backend, updated_at = now()
               RETURNING *""",
            user_id,
            backend,
        )
        return _profile(returned_row(row))

    async def set_endpoint(
        self,
        conn: DbConnection,
        user_id: str,
        endpoint_id: str | None,
        status: str,
        error: str = "",
    ) -> None:
        """Store the endpoint state; ``endpoint_id=None`` keeps the stored id."""
        await conn.execute(
            """UPDATE profiles SET runpod_endpoint_id = coalesce($2, runpod_endpoint_id),
                   endpoint_status = $3, endpoint_error = $4, updated_at = now()
               WHERE user_id = $1""",
            user_id,
            endpoint_id,
            status,
            error,
        )

    # ---- jobs ---------------------------------------------------------------------------

    async def insert_job(
        self,
        user_id: str,
        compute_backend: str,
        provider: str,
        spec: dict[str, Any],
        idempotency_key: str | None,
        admit: Admit | None = None,
        estimate: tuple[float, float] = (0.0, 0.0),
        kind: str = "experiment",
        parent_job_id: str | None = None,
        request: dict[str, Any] | None = None,
        lease: Lease | None = None,
    ) -> tuple[JobRow, bool]:
        """Store a new job, or return the existing one with the same (user, idempotency key).
        The second value says whether this call created it. ``admit`` runs first, in the same
        transaction and under a per-user lock (so concurrent submissions on any replica are
        counted one after the other); it raises to refuse the job. ``estimate`` is (time s, USD);
        ``lease`` makes the caller's replica the job's follower from the start."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"admit:{user_id}")
            if idempotency_key is not None:
                existing = await conn.fetchrow(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = $1 AND idempotency_key = $2",
                    user_id,
                    idempotency_key,
                )
                if existing is not None:
                    return _job(existing), False
            if admit is not None:
                await admit(conn)
            row = await conn.fetchrow(
                f"""INSERT INTO jobs (id, user_id, compute_backend, provider, spec, idempotency_key,
                                      estimated_time_s, estimated_cost_usd, kind, parent_job_id,
                                      request, lease_owner, lease_expires_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                            CASE WHEN $12::text IS NULL THEN NULL
                                 ELSE now() + make_interval(secs => $13) END)
                    RETURNING {_JOB_COLUMNS}""",
                uuid.uuid4(),
                user_id,
                compute_backend,
                provider,
                spec,
                idempotency_key,
                *estimate,
                kind,
                uuid.UUID(parent_job_id) if parent_job_id else None,
                request,
                lease.owner if lease else None,
                lease.seconds if lease else 0.0,
            )
            return _job(returned_row(row)), True

    async def get_job(self, job_id: str, user_id: str | None = None) -> JobRow | None:
        """The job, or None when it does not exist or belongs to another user."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        row = await self.pool.fetchrow(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2::text IS NULL OR user_id = $2)",
            parsed,
            user_id,
        )
        return _job(row) if row is not None else None

    async def list_jobs(
        self, user_id: str, limit: int, parent_job_id: str = "", kind: str = ""
    ) -> list[JobRow]:
        """The user's experiments, or with ``parent_job_id`` that experiment's later jobs (of
        ``kind`` when given), newest first."""
        parent = parse_job_id(parent_job_id) if parent_job_id else None
        if parent_job_id and parent is None:
            return []
        rows = await self.pool.fetch(
            f"""SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = $1
                  AND parent_job_id IS NOT DISTINCT FROM $3 AND ($4 = '' OR kind = $4)
                ORDER BY created_at DESC, id LIMIT $2""",
            user_id,
            limit,
            parent,
            kind,
        )
        return [_job(row) for row in rows]

    # ---- leases (several scheduler replicas) ------------------------------------------------

    async def claim_jobs(self, lease: Lease, limit: int) -> list[str]:
        """Take the lease of up to ``limit`` active jobs that no live replica follows (no lease,
        an expired one, or one this replica held before a restart)."""
        rows = await self.pool.fetch(
            """UPDATE jobs SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2)
               WHERE id IN (
                   SELECT id FROM jobs
                   WHERE status = ANY($3::text[])
                     AND (lease_expires_at IS NULL OR lease_expires_at < now() OR lease_owner = $1)
                   ORDER BY lease_expires_at NULLS FIRST, created_at
                   FOR UPDATE SKIP LOCKED
                   LIMIT $4)
               RETURNING id::text AS id""",
            lease.owner,
            lease.seconds,
            list(ACTIVE_STATES),
            limit,
        )
        return [row["id"] for row in rows]

    async def renew_leases(self, lease: Lease, job_ids: list[str]) -> set[str]:
        """Extend this replica's leases on ``job_ids``; answers the ids it still holds."""
        if not job_ids:
            return set()
        rows = await self.pool.fetch(
            """UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $2)
               WHERE id = ANY($3::uuid[]) AND lease_owner = $1
               RETURNING id::text AS id""",
            lease.owner,
            lease.seconds,
            [uuid.UUID(job_id) for job_id in job_ids],
        )
        return {row["id"] for row in rows}

    async def release_leases(self, owner: str) -> None:
        """Give up every lease of ``owner`` (a clean shutdown), so another replica takes over at once."""
        await self.pool.execute(
            "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = $1", owner
        )

    async def get_result(self, job_id: str, user_id: str) -> tuple[str, Any] | None:
        """(status, result) of the user's job, or None when it is not theirs."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        row = await self.pool.fetchrow(
            "SELECT status, result FROM jobs WHERE id = $1 AND user_id = $2", parsed, user_id
        )
        return (row["status"], row["result"]) if row is not None else None

    async def get_spec(self, job_id: str, user_id: str) -> Any | None:
        """The stored spec of the user's job, or None when it is not theirs."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        return await self.pool.fetchval(
            "SELECT spec FROM jobs WHERE id = $1 AND user_id = $2", parsed, user_id
        )

    async def set_estimate(self, job_id: str, time_s: float, cost_usd: float) -> None:
        await self.pool.execute(
            """UPDATE jobs SET estimated_time_s = $2, estimated_cost_usd = $3, updated_at = now()
               WHERE id = $1""",
            uuid.UUID(job_id),
            time_s,
            cost_usd,
        )

    async def count_submit_attempt(self, job_id: str) -> None:
        await self.pool.execute(
            "UPDATE jobs SET submit_attempts = submit_attempts + 1 WHERE id = $1", uuid.UUID(job_id)
        )

    async def set_provider_job_id(self, job_id: str, provider_job_id: str) -> None:
        """Persist the provider's id the moment it exists, so no path submits the job again."""
        await self.pool.execute(
            """UPDATE jobs SET provider_job_id = $2,
                   runpod_job_id = CASE WHEN provider = 'runpod' THEN $2 ELSE runpod_job_id END,
                   updated_at = now()
               WHERE id = $1""",
            uuid.UUID(job_id),
            provider_job_id,
        )

    async def apply(
        self, job_id: str, update: JobUpdate, expected_cursor: str | None = None
    ) -> JobRow | None:
        """Apply ``update`` atomically: append its events with the next sequence numbers, store
        the cursor and fields, and notify watchers. Returns None (and changes nothing) when the
        job is already terminal or its cursor is no longer ``expected_cursor``."""
        job_uuid = uuid.UUID(job_id)
        async with self.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(
                "SELECT status, provider_cursor, last_seq FROM jobs WHERE id = $1 FOR UPDATE",
                job_uuid,
            )
            if current is None or current["status"] in TERMINAL_STATES:
                return None
            if expected_cursor is not None and current["provider_cursor"] != expected_cursor:
                return None
            events = list(update.events)
            if update.status is not None and update.status != current["status"]:
                status_event: dict[str, Any] = {"type": "status", "state": update.status}
                if update.status in TERMINAL_STATES:
                    if update.error:
                        status_event["error"] = update.error
                    events.append(status_event)
                else:
                    status_event["stage"] = update.stage or ""
                    status_event["message"] = update.stage_message or ""
                    events.insert(0, status_event)
            seq = current["last_seq"]
            if events:
                rows = []
                for event in events:
                    seq += 1
                    rows.append((job_uuid, seq, event))
                await conn.executemany(
                    "INSERT INTO job_events (job_id, seq, event) VALUES ($1, $2, $3)", rows
                )
            row = await conn.fetchrow(
                f"""UPDATE jobs SET
                       provider_cursor = coalesce($2, provider_cursor),
                       status = coalesce($3, status),
                       stage = coalesce($4, stage),
                       progress = coalesce($5, progress),
                       stage_message = coalesce($6, stage_message),
                       latest_metrics = coalesce($7, latest_metrics),
                       result = coalesce($8, result),
                       error = coalesce($9, error),
                       artifacts = coalesce($12, artifacts),
                       last_seq = $10,
                       finished_at = CASE WHEN $3 = ANY($11::text[]) THEN now() ELSE finished_at END,
                       started_at = CASE WHEN $3 = 'running' AND started_at IS NULL THEN now()
                                         ELSE started_at END,
                       updated_at = now()
                    WHERE id = $1
                    RETURNING {_JOB_COLUMNS}""",
                job_uuid,
                update.cursor,
                update.status,
                update.stage,
                update.progress,
                update.stage_message,
                update.latest_metrics,
                update.result,
                update.error,
                seq,
                list(TERMINAL_STATES),
                update.artifacts,
            )
            if events:
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, job_id)
            return _job(returned_row(row))

    async def delete_job(self, job_id: str) -> bool:
        """Remove the job row (its events go with it); False when it was already gone."""
        deleted = await self.pool.fetchval("DELETE FROM jobs WHERE id = $1 RETURNING id", uuid.UUID(job_id))
        return deleted is not None

    async def jobs_with_artifacts_finished_before(self, cutoff: datetime, limit: int = 100) -> list[str]:
        rows = await self.pool.fetch(
            """SELECT id::text AS id FROM jobs
               WHERE artifacts <> '[]'::jsonb AND finished_at < $1
               ORDER BY finished_at LIMIT $2""",
            cutoff,
            limit,
        )
        return [row["id"] for row in rows]

    async def clear_artifacts(self, job_id: str) -> None:
        await self.pool.execute(
            "UPDATE jobs SET artifacts = '[]'::jsonb, updated_at = now() WHERE id = $1", uuid.UUID(job_id)
        )

    async def events_after(self, job_id: str, after_seq: int, limit: int = 500) -> list[StoredEvent]:
        rows = await self.pool.fetch(
            """SELECT seq, event, created_at FROM job_events
               WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3""",
            uuid.UUID(job_id),
            after_seq,
            limit,
        )
        return [StoredEvent(row["seq"], row["event"], row["created_at"]) for row in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        counts = {state: 0 for state in ALL_STATES}
        counts.update({row["status"]: row["n"] for row in rows})
        return counts
