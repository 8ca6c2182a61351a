"""PostgreSQL access for profiles, jobs and job events. Every statement lives here (the usage
ledger's in ledger.py).

Every connection is borrowed for one short statement or transaction, with an acquire timeout, and
never held across a call to a provider. Writes the dispatcher and the follower make are fenced by
the lease: they change a row only while this replica's lease on it is live (owner and expiry in
the WHERE clause), so a replica that stalled past its lease cannot overwrite its successor.

Event sequence numbers are assigned in the same transaction that stores the provider cursor
they came from, with the job row locked, so a restart or a second follower can neither skip
nor duplicate an event.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import astuple, dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from cost_model import ActualCost
from scheduler import ledger
from scheduler.db import DbConnection, returned_row
from service_runtime.jobs import ACTIVE_STATES, TERMINAL_STATES

NOTIFY_CHANNEL = "scheduler_job_events"
# A provider's webhook for a job came (payload: the job id): its next poll is due now.
WEBHOOK_CHANNEL = "scheduler_job_webhooks"
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
    # What lists show of the spec, kept in columns so that no hot read loads the spec itself.
    model_id: str = ""
    influence_method: str = ""
    n_train: int = 0
    n_eval: int = 0
    endpoint_id: str = ""  # the RunPod endpoint the job was submitted on ('' elsewhere)
    submitting: bool = False  # a submit token is stored: the provider may already have the job
    trace_context: dict[str, str] = field(default_factory=dict)  # the submitting request's
    # An experiment's labels (spec keys name, tags, note), in columns for the same reason.
    name: str = ""
    tags: list[str] = field(default_factory=list)
    note: str = ""
    estimated_gpu: str = ""  # the GPU the estimate priced, and its rate
    estimated_usd_per_second: float = 0.0
    max_cost_usd: float = 0.0  # the researcher's spend cap; 0 = none
    started_at: datetime | None = None
    actual: ActualCost | None = None  # the real cost, once the job ended with a measurement
    # A sharded experiment's graph (scheduler.graph): a part names its experiment (and an index
    # shard its number); the experiment holds how many shards it runs and its parts' view.
    graph_job_id: str = ""
    shard: int | None = None
    shards: int = 1
    parts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATES

    @property
    def is_graph(self) -> bool:
        """A sharded experiment: the scheduler runs its parts, no provider runs it."""
        return self.kind == "experiment" and self.shards > 1


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
    provider_job_id: str | None = None
    endpoint_id: str | None = None
    actual: ActualCost | None = None
    parts: list[dict[str, Any]] | None = None
    # Instead of ``result``: the result of that job (a sharded experiment's merge), its
    # "artifacts" replaced by ``artifacts``, copied inside PostgreSQL: a result of 100,000
    # training ids never passes through this process.
    result_of: str | None = None


@dataclass(frozen=True)
class Claimed:
    """A job this replica just took the lease of: the dispatcher's when no provider has it yet."""

    id: str
    provider: str
    submitted: bool


@dataclass(frozen=True)
class SubmitWork:
    """What the dispatcher sends: the job, its spec (the one read of it) and the submit token."""

    job: JobRow
    spec: dict[str, Any]
    token: uuid.UUID
    reconciling: bool  # a token was already stored: an earlier attempt's outcome is unknown


@dataclass(frozen=True)
class UploadGrantJob:
    """A job as the upload route sees it (scheduler.uploads.grant_upload)."""

    status: str
    kind: str
    spec: dict[str, Any]
    request: dict[str, Any] | None  # the kind's request: an index shard's names its slice
    secret_sha256s: tuple[bytes, ...]


class UploadBudgetExceeded(Exception):
    """A URL would let the job's uploads add up to ``total`` bytes, over its limit."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.total = total


_JOB_COLUMNS = """id::text AS id, user_id, compute_backend, provider,
    coalesce(provider_job_id, '') AS provider_job_id, status, stage, progress, stage_message,
    latest_metrics, error, estimated_time_s, estimated_cost_usd, provider_cursor, last_seq,
    submit_attempts, created_at, updated_at, finished_at, artifacts, kind,
    coalesce(parent_job_id::text, '') AS parent_job_id, request, model_id, influence_method,
    n_train, n_eval, endpoint_id, submit_token IS NOT NULL AS submitting, trace_context, name, tags,
    note, estimated_gpu, estimated_usd_per_second, max_cost_usd, started_at, actual_gpu_seconds,
    actual_delay_s, actual_gpu, actual_device, actual_usd_per_second, actual_cost_usd, actual_source,
    coalesce(graph_job_id::text, '') AS graph_job_id, shard, shards, parts"""
_ACTUAL_COLUMNS = {
    "actual_gpu_seconds": "gpu_seconds",
    "actual_delay_s": "delay_seconds",
    "actual_gpu": "gpu",
    "actual_device": "device",
    "actual_usd_per_second": "usd_per_second",
    "actual_cost_usd": "cost_usd",
    "actual_source": "source",
}
# The lease fence of a dispatcher or follower write ($1 = owner).
_HELD = "lease_owner = $1 AND lease_expires_at > now()"


def _job(row: asyncpg.Record) -> JobRow:
    return _job_from(dict(row))


def _job_from(fields: dict[str, Any]) -> JobRow:
    actual = {name: fields.pop(column) for column, name in _ACTUAL_COLUMNS.items()}
    if actual["gpu_seconds"] is not None:
        fields["actual"] = ActualCost(**actual)
    return JobRow(**fields)


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


def _list_length(spec: dict[str, Any], name: str) -> int:
    """Examples inline, or in the stored dataset the spec records (scheduler.datasets)."""
    value = spec.get(name)
    if isinstance(value, list) and value:
        return len(value)
    stored = spec.get(name.replace("_data", "_dataset"))
    return int(stored.get("count", 0)) if isinstance(stored, dict) else 0


class Store:
    def __init__(self, pool: asyncpg.Pool, acquire_timeout_s: float = 10.0) -> None:
        self.pool = pool
        self._acquire_timeout_s = acquire_timeout_s

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[DbConnection]:
        """A pooled connection for one short statement or transaction; TimeoutError when the pool
        stays exhausted for the acquire timeout (never a wait without end)."""
        async with self.pool.acquire(timeout=self._acquire_timeout_s) as conn:
            yield conn

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return list(await conn.fetch(query, *args))

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection() as conn:
            return await conn.fetchrow(query, *args)

    async def _fetchval(self, query: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(query, *args)

    async def _execute(self, query: str, *args: Any) -> str:
        async with self.connection() as conn:
            return str(await conn.execute(query, *args))

    # ---- profiles -----------------------------------------------------------------------

    async def get_profile(self, user_id: str) -> Profile:
        """The user's profile, created with the defaults on first use (read-only once it exists)."""
        row = await self._fetchrow("SELECT * FROM profiles WHERE user_id = $1", user_id)
        if row is None:
            row = await self._fetchrow(
                """INSERT INTO profiles (user_id) VALUES ($1)
                   ON CONFLICT (user_id) DO UPDATE SET user_id = excluded.user_id
                   RETURNING *""",
                user_id,
            )
        return _profile(returned_row(row))

    async def set_backend(self, user_id: str, backend: str) -> Profile:
        row = await self._fetchrow(
            """INSERT INTO profiles (user_id, compute_backend) VALUES ($1, $2)
               ON CONFLICT (user_id) DO UPDATE
               SET compute_backend = excluded.compute_backend, updated_at = now()
               RETURNING *""",
            user_id,
            backend,
        )
        return _profile(returned_row(row))

    async def claim_endpoint_creation(self, user_id: str, stale_after_s: float) -> bool:
        """Whether this caller may create the user's RunPod endpoint: the profile has none and no
        other creation started less than ``stale_after_s`` ago (a row claim, not a held lock)."""
        await self.get_profile(user_id)
        claimed = await self._fetchval(
            """UPDATE profiles SET endpoint_status = 'creating', endpoint_error = '', updated_at = now()
               WHERE user_id = $1 AND coalesce(runpod_endpoint_id, '') = ''
                 AND (endpoint_status <> 'creating'
                      OR updated_at < now() - make_interval(secs => $2))
               RETURNING true""",
            user_id,
            stale_after_s,
        )
        return bool(claimed)

    async def set_endpoint(self, user_id: str, endpoint_id: str | None, status: str, error: str = "") -> None:
        """Store the endpoint state; ``endpoint_id=None`` keeps the stored id."""
        await self._execute(
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
        max_cost_usd: float = 0.0,
        trace_context: dict[str, str] | None = None,
        shards: int = 1,
        graph_job_id: str | None = None,
        shard: int | None = None,
    ) -> tuple[JobRow, bool]:
        """Store a new queued job (the outbox: a dispatcher submits it), or return the existing
        one with the same (user, idempotency key). The second value says whether this call
        created it. ``admit`` runs first, in the same transaction and under a per-user lock (so
        concurrent submissions on any replica are counted one after the other); it raises to
        refuse the job. The job's ``admitted`` usage entry is written in the same transaction.
        ``estimate`` is (time s, USD). A part of a sharded experiment (``graph_job_id``) writes
        no ``admitted`` entry: its experiment was admitted for the whole graph."""
        async with self.connection() as conn, conn.transaction():
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
            job_id = uuid.uuid4()
            row = await conn.fetchrow(
                f"""INSERT INTO jobs (id, user_id, compute_backend, provider, spec, idempotency_key,
                                      estimated_time_s, estimated_cost_usd, kind, parent_job_id,
                                      request, model_id, influence_method, n_train, n_eval,
                                      max_cost_usd, trace_context, name, tags, note, shards,
                                      graph_job_id, shard)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                            $17, $18, $19, $20, $21, $22, $23)
                    RETURNING {_JOB_COLUMNS}""",
                job_id,
                user_id,
                compute_backend,
                provider,
                spec,
                idempotency_key,
                *estimate,
                kind,
                uuid.UUID(parent_job_id) if parent_job_id else None,
                request,
                str(spec.get("model_id", "")),
                str(spec.get("influence_method", "")),
                _list_length(spec, "training_data"),
                _list_length(spec, "eval_data"),
                max_cost_usd,
                trace_context or {},
                str(spec.get("name") or ""),
                [str(tag) for tag in spec.get("tags") or []],
                str(spec.get("note") or ""),
                shards,
                uuid.UUID(graph_job_id) if graph_job_id else None,
                shard,
            )
            if graph_job_id is None:
                await ledger.record_admission(conn, job_id, user_id, compute_backend, estimate[0])
            return _job(returned_row(row)), True

    async def get_job(self, job_id: str, user_id: str | None = None) -> JobRow | None:
        """The job, or None when it does not exist or belongs to another user."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        row = await self._fetchrow(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1 AND ($2::text IS NULL OR user_id = $2)",
            parsed,
            user_id,
        )
        return _job(row) if row is not None else None

    async def get_jobs(self, job_ids: list[str]) -> list[JobRow]:
        """The jobs of ``job_ids`` that still exist (one statement for a follower's batch)."""
        rows = await self._fetch(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ANY($1::uuid[])",
            [uuid.UUID(job_id) for job_id in job_ids],
        )
        return [_job(row) for row in rows]

    async def list_jobs(
        self, user_id: str, limit: int, parent_job_id: str = "", kind: str = ""
    ) -> list[JobRow]:
        """The user's experiments, or with ``parent_job_id`` that experiment's later jobs (of
        ``kind`` when given), newest first; never the parts of a sharded experiment."""
        parent = parse_job_id(parent_job_id) if parent_job_id else None
        if parent_job_id and parent is None:
            return []
        rows = await self._fetch(
            f"""SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = $1
                  AND parent_job_id IS NOT DISTINCT FROM $3 AND ($4 = '' OR kind = $4)
                  AND graph_job_id IS NULL
                ORDER BY created_at DESC, id LIMIT $2""",
            user_id,
            limit,
            parent,
            kind,
        )
        return [_job(row) for row in rows]

    async def active_jobs(
        self, user_id: str, backend: str = "", parent_job_id: str = "", graph_job_id: str = ""
    ) -> list[JobRow]:
        """The user's non-terminal jobs (on ``backend``, or the later jobs of ``parent_job_id``,
        or the parts of the sharded experiment ``graph_job_id``)."""
        parent = parse_job_id(parent_job_id) if parent_job_id else None
        graph = parse_job_id(graph_job_id) if graph_job_id else None
        rows = await self._fetch(
            f"""SELECT {_JOB_COLUMNS} FROM jobs
                WHERE user_id = $1 AND status = ANY($2::text[])
                  AND ($3 = '' OR compute_backend = $3)
                  AND ($4::uuid IS NULL OR parent_job_id = $4)
                  AND ($5::uuid IS NULL OR graph_job_id = $5)
                ORDER BY created_at""",
            user_id,
            list(ACTIVE_STATES),
            backend,
            parent,
            graph,
        )
        return [_job(row) for row in rows]

    async def graph_parts(self, graph_job_id: str) -> list[tuple[JobRow, Any]]:
        """Every part of the sharded experiment (each attempt), oldest first, with an index
        shard's result (None until it completed: a few hundred bytes, the merge's request). The
        training job's and the merge's results stay in the database (None here): they grow with
        the training set (the loss per step, the merge's training ids) and a graph step reads the
        parts each time a part changes."""
        rows = await self._fetch(
            f"""SELECT {_JOB_COLUMNS}, CASE WHEN kind = 'index_shard' THEN result END AS result
                FROM jobs WHERE graph_job_id = $1
                ORDER BY created_at, id""",
            uuid.UUID(graph_job_id),
        )
        parts = []
        for row in rows:
            fields = dict(row)
            result = fields.pop("result")
            parts.append((_job_from(fields), result))
        return parts

    # ---- leases (several scheduler replicas) ------------------------------------------------

    async def claim_jobs(self, lease: Lease, limit: int, submitted: bool | None = None) -> list[Claimed]:
        """Take the lease of up to ``limit`` active jobs that no live replica holds (no lease or an
        expired one, this replica's own included: it may have stalled past it). ``submitted``
        picks jobs a provider has (True) or not yet (False); None takes both."""
        rows = await self._fetch(
            """UPDATE jobs SET lease_owner = $1, lease_expires_at = now() + make_interval(secs => $2)
               WHERE id IN (
                   SELECT id FROM jobs
                   WHERE status = ANY($3::text[])
                     AND (lease_expires_at IS NULL OR lease_expires_at < now())
                     AND ($5::boolean IS NULL OR (provider_job_id IS NOT NULL) = $5)
                   ORDER BY lease_expires_at NULLS FIRST, created_at
                   FOR UPDATE SKIP LOCKED
                   LIMIT $4)
               RETURNING id::text AS id, provider, provider_job_id IS NOT NULL AS submitted""",
            lease.owner,
            lease.seconds,
            list(ACTIVE_STATES),
            limit,
            submitted,
        )
        return [Claimed(row["id"], row["provider"], row["submitted"]) for row in rows]

    async def renew_leases(self, lease: Lease, job_ids: list[str]) -> set[str]:
        """Extend this replica's live leases on ``job_ids``; answers the ids it still holds (an
        expired lease is not renewed: another replica may have acted on the job already)."""
        if not job_ids:
            return set()
        rows = await self._fetch(
            f"""UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $2)
               WHERE id = ANY($3::uuid[]) AND {_HELD}
               RETURNING id::text AS id""",
            lease.owner,
            lease.seconds,
            [uuid.UUID(job_id) for job_id in job_ids],
        )
        return {row["id"] for row in rows}

    async def release_leases(self, owner: str) -> None:
        """Give up every lease of ``owner`` (a clean shutdown), so another replica takes over at once."""
        await self._execute(
            "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL WHERE lease_owner = $1", owner
        )

    async def begin_submit(self, job_id: str, lease: Lease) -> SubmitWork | None:
        """Write the submit token (the durable "submitting" state) and count the attempt before
        the provider call, under the lease; returns the job with its spec, or None when the lease
        is gone or the job no longer waits to be submitted. An existing token is kept: the
        earlier attempt's outcome is unknown, so this one reconciles it under the same job id."""
        async with self.connection() as conn:
            row = await conn.fetchrow(
                f"""UPDATE jobs SET submit_token = coalesce(submit_token, $3),
                       submit_attempts = submit_attempts + 1, updated_at = now()
                    WHERE id = $2 AND {_HELD} AND status = 'queued' AND provider_job_id IS NULL
                    RETURNING {_JOB_COLUMNS}, spec, submit_token, submit_token <> $3 AS reconciling""",
                lease.owner,
                uuid.UUID(job_id),
                uuid.uuid4(),
            )
        if row is None:
            return None
        fields = dict(row)
        spec, token, reconciling = fields.pop("spec"), fields.pop("submit_token"), fields.pop("reconciling")
        return SubmitWork(_job_from(fields), spec, token, reconciling)

    async def mark_sent(
        self,
        job_id: str,
        lease: Lease,
        token: uuid.UUID,
        endpoint_id: str,
        webhook_secret_sha256: bytes | None = None,
        upload_secret_sha256: bytes | None = None,
    ) -> bool:
        """Record, just before the provider call, that the current token's call is being made, on
        which endpoint, with which webhook secret (its hash) and which upload secret (its hash,
        added to those of earlier calls: the provider may hand back an earlier call's job); False
        when the lease or the token is gone (then do not call)."""
        return (
            await self._fetchval(
                f"""UPDATE jobs SET submit_sent_at = now(), endpoint_id = $4,
                       webhook_secret_sha256 = $5,
                       upload_secret_sha256s = CASE WHEN $6::bytea IS NULL THEN upload_secret_sha256s
                           ELSE array_append(upload_secret_sha256s, $6::bytea) END,
                       updated_at = now()
                    WHERE id = $2 AND {_HELD} AND submit_token = $3 AND provider_job_id IS NULL
                    RETURNING true""",
                lease.owner,
                uuid.UUID(job_id),
                token,
                endpoint_id,
                webhook_secret_sha256,
                upload_secret_sha256,
            )
            is not None
        )

    async def upload_grant_job(self, job_id: str) -> UploadGrantJob | None:
        """What the upload route checks a request against: the job's status, kind, spec and
        upload secrets' hashes; None for no such job (or a deleted one)."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        row = await self._fetchrow(
            "SELECT status, kind, spec, request, upload_secret_sha256s FROM jobs WHERE id = $1", parsed
        )
        if row is None:
            return None
        return UploadGrantJob(
            status=row["status"],
            kind=row["kind"],
            spec=row["spec"],
            request=row["request"],
            secret_sha256s=tuple(row["upload_secret_sha256s"] or ()),
        )

    async def record_upload_grant(self, job_id: str, name: str, size: int, max_job_bytes: int) -> bool:
        """Record a URL granted for ``name`` of ``size`` bytes, unless the job's grants (each name
        at the largest size it was granted for) would then add up to more than ``max_job_bytes``
        (raises UploadBudgetExceeded with the sum it would reach) or the job is no longer active
        (returns False)."""
        parsed = uuid.UUID(job_id)
        async with self.connection() as conn, conn.transaction():
            # The job's row lock serialises the grants of one job (two files asked for at once).
            active = await conn.fetchval(
                "SELECT status = ANY($2::text[]) FROM jobs WHERE id = $1 FOR UPDATE",
                parsed,
                list(ACTIVE_STATES),
            )
            if not active:
                return False
            total: int = await conn.fetchval(
                """SELECT coalesce(sum(CASE WHEN name = $2 THEN greatest(bytes, $3) ELSE bytes END), 0)
                          + CASE WHEN bool_or(name = $2) THEN 0 ELSE $3 END
                   FROM upload_grants WHERE job_id = $1""",
                parsed,
                name,
                size,
            )
            if total > max_job_bytes:
                raise UploadBudgetExceeded(total)
            await conn.execute(
                """INSERT INTO upload_grants (job_id, name, bytes) VALUES ($1, $2, $3)
                   ON CONFLICT (job_id, name) DO UPDATE
                   SET bytes = greatest(upload_grants.bytes, EXCLUDED.bytes), granted_at = now()""",
                parsed,
                name,
                size,
            )
            return True

    async def webhook_secret_sha256(self, job_id: str) -> bytes | None:
        """The hash of the active job's webhook secret; None for no such job, a finished one, or
        one sent without a webhook."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        found: bytes | None = await self._fetchval(
            "SELECT webhook_secret_sha256 FROM jobs WHERE id = $1 AND status = ANY($2::text[])",
            parsed,
            list(ACTIVE_STATES),
        )
        return found

    async def notify_webhook(self, job_id: str) -> None:
        """Tell every replica (the one following the job among them) that its webhook came."""
        await self._execute("SELECT pg_notify($1, $2)", WEBHOOK_CHANNEL, job_id)

    async def claim_wait_over(self, job_id: str, wait_s: float) -> bool | None:
        """Whether ``wait_s`` has passed (by the database's clock, the one submit_sent_at was
        written with) since the current token's provider call; None when no call was made."""
        row = await self._fetchrow(
            "SELECT submit_sent_at, now() >= submit_sent_at + make_interval(secs => $2) AS over "
            "FROM jobs WHERE id = $1",
            uuid.UUID(job_id),
            wait_s,
        )
        if row is None or row["submit_sent_at"] is None:
            return None
        return bool(row["over"])

    async def requeue_unrun(self, job_id: str, lease: Lease, provider_job_id: str, message: str) -> bool:
        """Put a submitted job back in the queue, to be sent again with fresh upload URLs: its
        provider dropped it before any worker started it (RunPod's ttl ended while it queued).
        Fenced by the lease and the provider job; the lease is given up so that a dispatcher
        claims it. False when any of that no longer holds."""
        job_uuid = uuid.UUID(job_id)
        async with self.connection() as conn, conn.transaction():
            seq = await conn.fetchval(
                f"""UPDATE jobs SET status = 'queued', provider_job_id = NULL, provider_cursor = '',
                       submit_token = NULL, submit_sent_at = NULL, stage_message = $4,
                       lease_owner = NULL, lease_expires_at = NULL, last_seq = last_seq + 1,
                       updated_at = now()
                    WHERE id = $2 AND {_HELD} AND status = 'submitted' AND provider_job_id = $3
                    RETURNING last_seq""",
                lease.owner,
                job_uuid,
                provider_job_id,
                message,
            )
            if seq is None:
                return False
            event = {"type": "status", "state": "queued", "stage": "", "message": message}
            await conn.execute(
                "INSERT INTO job_events (job_id, seq, event) VALUES ($1, $2, $3)", job_uuid, seq, event
            )
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, job_id)
        return True

    async def clear_submit(self, job_id: str, lease: Lease, token: uuid.UUID) -> None:
        """Forget the submit token after an attempt that certainly never reached the provider."""
        await self._execute(
            f"""UPDATE jobs SET submit_token = NULL, submit_sent_at = NULL
                WHERE id = $2 AND {_HELD} AND submit_token = $3 AND provider_job_id IS NULL""",
            lease.owner,
            uuid.UUID(job_id),
            token,
        )

    async def get_result(self, job_id: str, user_id: str) -> tuple[str, Any] | None:
        """(status, result) of the user's job, or None when it is not theirs."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        row = await self._fetchrow(
            "SELECT status, result FROM jobs WHERE id = $1 AND user_id = $2", parsed, user_id
        )
        return (row["status"], row["result"]) if row is not None else None

    async def get_spec(self, job_id: str, user_id: str | None = None) -> Any | None:
        """The stored spec of the (user's) job, or None when there is none."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        return await self._fetchval(
            "SELECT spec FROM jobs WHERE id = $1 AND ($2::text IS NULL OR user_id = $2)", parsed, user_id
        )

    async def set_estimate(
        self,
        job_id: str,
        lease: Lease,
        time_s: float,
        cost_usd: float,
        gpu: str = "",
        usd_per_second: float = 0.0,
    ) -> None:
        await self._execute(
            f"""UPDATE jobs SET estimated_time_s = $3, estimated_cost_usd = $4, estimated_gpu = $5,
                   estimated_usd_per_second = $6, updated_at = now()
               WHERE id = $2 AND {_HELD}""",
            lease.owner,
            uuid.UUID(job_id),
            time_s,
            cost_usd,
            gpu,
            usd_per_second,
        )

    async def apply(
        self,
        job_id: str,
        update: JobUpdate,
        expected_cursor: str | None = None,
        lease: Lease | None = None,
        submit_token: uuid.UUID | None = None,
    ) -> JobRow | None:
        """Apply ``update`` atomically: append its events with the next sequence numbers, store
        the cursor and fields, settle the usage ledger on a terminal status, and notify watchers.
        Returns None (and changes nothing) when the job is already terminal, its cursor is no
        longer ``expected_cursor``, ``lease`` is not held live on it, or its submit token is no
        longer ``submit_token``. A user's cancel passes no lease: it wins over any replica."""
        job_uuid = uuid.UUID(job_id)
        async with self.connection() as conn, conn.transaction():
            current = await conn.fetchrow(
                """SELECT status, provider_cursor, last_seq, submit_token,
                          lease_owner IS NOT DISTINCT FROM $2 AND lease_expires_at > now() AS held
                   FROM jobs WHERE id = $1 FOR UPDATE""",
                job_uuid,
                lease.owner if lease is not None else None,
            )
            if current is None or current["status"] in TERMINAL_STATES:
                return None
            if expected_cursor is not None and current["provider_cursor"] != expected_cursor:
                return None
            if lease is not None and not current["held"]:
                return None
            if submit_token is not None and current["submit_token"] != submit_token:
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
                       result = coalesce(
                           $8,
                           (SELECT jsonb_set(source.result, '{{artifacts}}', $12)
                              FROM jobs source WHERE source.id = $23::uuid),
                           result),
                       error = coalesce($9, error),
                       artifacts = coalesce($12, artifacts),
                       provider_job_id = coalesce($13, provider_job_id),
                       runpod_job_id = CASE WHEN provider = 'runpod' THEN coalesce($13, runpod_job_id)
                                            ELSE runpod_job_id END,
                       endpoint_id = coalesce($14, endpoint_id),
                       actual_gpu_seconds = coalesce($15, actual_gpu_seconds),
                       actual_delay_s = coalesce($16, actual_delay_s),
                       actual_gpu = coalesce($17, actual_gpu),
                       actual_device = coalesce($18, actual_device),
                       actual_usd_per_second = coalesce($19, actual_usd_per_second),
                       actual_cost_usd = coalesce($20, actual_cost_usd),
                       actual_source = coalesce($21, actual_source),
                       parts = coalesce($22, parts),
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
                update.provider_job_id,
                update.endpoint_id,
                *(astuple(update.actual) if update.actual is not None else (None,) * len(_ACTUAL_COLUMNS)),
                update.parts,
                uuid.UUID(update.result_of) if update.result_of is not None else None,
            )
            if update.status in TERMINAL_STATES:
                await ledger.record_settlement(conn, job_uuid)
            if events:
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, job_id)
            return _job(returned_row(row))

    async def delete_job(self, job_id: str) -> bool:
        """Remove the job row (its events and later jobs go with it; its usage entries stay);
        False when it was already gone."""
        deleted = await self._fetchval("DELETE FROM jobs WHERE id = $1 RETURNING id", uuid.UUID(job_id))
        return deleted is not None

    async def jobs_with_artifacts_finished_before(self, cutoff: datetime, limit: int = 100) -> list[str]:
        rows = await self._fetch(
            """SELECT id::text AS id FROM jobs
               WHERE artifacts <> '[]'::jsonb AND finished_at < $1
               ORDER BY finished_at LIMIT $2""",
            cutoff,
            limit,
        )
        return [row["id"] for row in rows]

    async def artifact_owners(self, job_ids: list[str]) -> dict[str, tuple[bool, set[str]]]:
        """For each of ``job_ids`` that is a job: whether it has ended, and the names its
        verified manifest lists (the artifact sweep's view of who owns what in the store)."""
        parsed = [found for found in map(parse_job_id, job_ids) if found is not None]
        rows = await self._fetch(
            "SELECT id::text AS id, status, artifacts FROM jobs WHERE id = ANY($1::uuid[])", parsed
        )
        return {
            row["id"]: (
                row["status"] in TERMINAL_STATES,
                {str(entry.get("name")) for entry in row["artifacts"] or [] if isinstance(entry, dict)},
            )
            for row in rows
        }

    async def clear_artifacts(self, job_id: str) -> None:
        await self._execute(
            "UPDATE jobs SET artifacts = '[]'::jsonb, updated_at = now() WHERE id = $1", uuid.UUID(job_id)
        )

    async def events_after(self, job_id: str, after_seq: int, limit: int = 500) -> list[StoredEvent]:
        rows = await self._fetch(
            """SELECT seq, event, created_at FROM job_events
               WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3""",
            uuid.UUID(job_id),
            after_seq,
            limit,
        )
        return [StoredEvent(row["seq"], row["event"], row["created_at"]) for row in rows]

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        counts = {state: 0 for state in ALL_STATES}
        counts.update({row["status"]: row["n"] for row in rows})
        return counts
