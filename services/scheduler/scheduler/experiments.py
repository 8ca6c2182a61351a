"""The experiments list as a researcher reads it: labels (name, tags, note), filters, outcome.

Labels live in the stored spec (``name``, ``tags``, ``note``; gpu_core.schemas.ExperimentLabels)
and, for lists and filters that never load the spec, in the columns of the same names: the
pipeline ignores them, so changing them later rewrites only those keys and columns. The outcome (each
evaluation's exact match and loss) and the start time are read from the job row next to the
columns ``store`` reads, so the money path's queries stay as they are.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from scheduler.store import _JOB_COLUMNS, JobRow, _job, parse_job_id


@dataclass(frozen=True)
class ListFilters:
    """Empty strings: any."""

    tag: str = ""
    model_id: str = ""
    influence_method: str = ""
    status: str = ""


@dataclass(frozen=True)
class JobFacts:
    """What the list shows beyond the job row: when it started running and how it did."""

    started_at: datetime | None
    outcome: dict[str, Any]
    # An experiment's export to MLflow / W&B (scheduler/tracking.py): {"status", "trackers"}.
    tracking: dict[str, Any] = field(default_factory=dict)


_FACTS = """id::text AS id, started_at,
    CASE WHEN result IS NULL THEN NULL ELSE jsonb_build_object(
        'base', result #> '{eval_results,base,metrics}',
        'few_shot', result #> '{eval_results,few_shot,metrics}',
        'finetuned', result #> '{eval_results,finetuned,metrics}') END AS outcome,
    CASE WHEN kind = 'experiment' AND status = 'completed'
         THEN jsonb_build_object('status', tracking_status, 'trackers', tracking)
         END AS tracking"""


class ExperimentCatalog:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def experiments(self, user_id: str, limit: int, filters: ListFilters) -> list[JobRow]:
        """The user's experiments that match every filter, newest first."""
        # PostgreSQL text cannot hold NUL, so no stored label matches one (and asking would fail).
        if any(
            "\x00" in value
            for value in (filters.tag, filters.model_id, filters.influence_method, filters.status)
        ):
            return []
        rows = await self.pool.fetch(
            f"""SELECT {_JOB_COLUMNS} FROM jobs
                WHERE user_id = $1 AND parent_job_id IS NULL AND graph_job_id IS NULL
                  AND ($3 = '' OR $3 = ANY(tags))
                  AND ($4 = '' OR model_id = $4)
                  AND ($5 = '' OR influence_method = $5)
                  AND ($6 = '' OR status = $6)
                ORDER BY created_at DESC, id LIMIT $2""",
            user_id,
            limit,
            filters.tag,
            filters.model_id,
            filters.influence_method,
            filters.status,
        )
        return [_job(row) for row in rows]

    async def facts(self, job_ids: list[str]) -> dict[str, JobFacts]:
        if not job_ids:
            return {}
        rows = await self.pool.fetch(
            f"SELECT {_FACTS} FROM jobs WHERE id = ANY($1::uuid[])",
            [uuid.UUID(job_id) for job_id in job_ids],
        )
        return {
            row["id"]: JobFacts(
                started_at=row["started_at"],
                outcome=_complete(row["outcome"]),
                tracking=row["tracking"] or {},
            )
            for row in rows
        }

    async def update_labels(self, user_id: str, job_id: str, labels: dict[str, Any]) -> JobRow | None:
        """Overwrite the given label keys of the user's experiment's spec; None when it is not
        theirs (or is a later job, which has no labels of its own)."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        row = await self.pool.fetchrow(
            f"""UPDATE jobs SET spec = spec || $3::jsonb,
                    name = CASE WHEN $3::jsonb ? 'name' THEN coalesce($3::jsonb ->> 'name', '') ELSE name END,
                    tags = CASE WHEN $3::jsonb ? 'tags' THEN ARRAY(
                        SELECT jsonb_array_elements_text(coalesce($3::jsonb -> 'tags', '[]'::jsonb)))
                        ELSE tags END,
                    note = CASE WHEN $3::jsonb ? 'note' THEN coalesce($3::jsonb ->> 'note', '') ELSE note END,
                    updated_at = now()
                WHERE id = $1 AND user_id = $2 AND parent_job_id IS NULL AND graph_job_id IS NULL
                RETURNING {_JOB_COLUMNS}""",
            parsed,
            user_id,
            labels,
        )
        return _job(row) if row is not None else None


def _complete(outcome: dict[str, Any] | None) -> dict[str, Any]:
    """Only the evaluations that exist (a result of another kind has none)."""
    if not outcome:
        return {}
    return {name: metrics for name, metrics in outcome.items() if metrics is not None}
