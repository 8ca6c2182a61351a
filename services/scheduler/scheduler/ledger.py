"""The usage ledger: append-only entries that admission control counts, so deleting a job (or an
experiment) refunds nothing.

Each job writes two entries at most: ``admitted`` (with its admission estimate, for the record)
in the transaction that inserts it, and ``settled`` (the GPU-seconds it ran) in the transaction
that makes it terminal. A job that has not settled counts from its live row: its estimate, or
the time it has run when that is longer. Deleting an active job cancels it first, so it settles.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from scheduler.db import DbConnection, returned_row


async def record_admission(
    conn: DbConnection, job_id: uuid.UUID, user_id: str, backend: str, estimated_time_s: float
) -> None:
    await conn.execute(
        """INSERT INTO usage_ledger (user_id, job_id, backend, entry, gpu_seconds, period_at)
           VALUES ($1, $2, $3, 'admitted', $4, now())
           ON CONFLICT (job_id, entry) DO NOTHING""",
        user_id,
        job_id,
        backend,
        estimated_time_s,
    )


async def record_settlement(conn: DbConnection, job_id: uuid.UUID) -> None:
    """The job's ``settled`` entry, from its row as the terminal update left it (once per job):
    the GPU-seconds its provider measured, or the time it ran as the scheduler saw it. A sharded
    experiment settles at 0: each of its parts settles the GPU time it ran."""
    await conn.execute(
        """INSERT INTO usage_ledger (user_id, job_id, backend, entry, gpu_seconds, period_at)
           SELECT user_id, id, compute_backend, 'settled',
                  CASE WHEN kind = 'experiment' AND shards > 1 THEN 0
                       ELSE coalesce(actual_gpu_seconds, extract(epoch FROM finished_at - started_at), 0)
                  END, created_at
           FROM jobs WHERE id = $1
           ON CONFLICT (job_id, entry) DO NOTHING""",
        job_id,
    )


async def submissions_since(
    conn: DbConnection, user_id: str, backend: str, since: datetime
) -> tuple[int, datetime | None]:
    """(how many jobs were admitted since ``since``, the oldest of them)."""
    row = returned_row(
        await conn.fetchrow(
            """SELECT count(*) AS n, min(period_at) AS oldest FROM usage_ledger
               WHERE user_id = $1 AND backend = $2 AND entry = 'admitted' AND period_at > $3""",
            user_id,
            backend,
            since,
        )
    )
    return int(row["n"]), row["oldest"]


async def gpu_seconds_since(conn: DbConnection, user_id: str, backend: str, since: datetime) -> float:
    """GPU-seconds of the jobs submitted since ``since``: what the settled ones ran (the ledger),
    plus the jobs not settled yet as their live rows say (a sharded experiment's estimate stands
    for its active parts)."""
    settled = await conn.fetchval(
        """SELECT coalesce(sum(gpu_seconds), 0)::float8 FROM usage_ledger
           WHERE user_id = $1 AND backend = $2 AND entry = 'settled' AND period_at >= $3""",
        user_id,
        backend,
        since,
    )
    active = await conn.fetchval(
        """SELECT coalesce(sum(CASE WHEN started_at IS NOT NULL
                                    THEN greatest(estimated_time_s, extract(epoch FROM now() - started_at))
                                    ELSE estimated_time_s END), 0)::float8
           FROM jobs WHERE user_id = $1 AND compute_backend = $2 AND created_at >= $3
                AND status IN ('queued', 'submitted', 'running') AND graph_job_id IS NULL""",
        user_id,
        backend,
        since,
    )
    return float(settled) + float(active)
