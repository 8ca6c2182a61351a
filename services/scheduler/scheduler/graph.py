"""A sharded experiment (``influence.shards`` N > 1) as a graph of jobs the scheduler runs.

The researcher's experiment job is the graph: it is what they see, cancel and delete, it holds the
estimate and, at the end, the result. No provider runs it. Its parts are ordinary jobs (rows of
the jobs table with ``graph_job_id`` = the experiment) on the experiment's backend and provider,
each through the same money path as any job (the dispatcher submits it exactly once, the follower
collects and verifies its files, the ledger settles its GPU time):

1. one ``training`` job (gpu_core.pipeline.run_training_job: adapter, checkpoints, evaluations);
2. once it completes, one ``index_shard`` job per slice of gpu_core.shard_schemas.shard_slices
   (parent: the training job), running concurrently as far as the provider allows;
3. once every shard completes, one ``shard_merge`` job (parent: the training job; it downloads
   every shard's score columns and index manifests).

When the merge completes, the files of the parts that make an experiment (the adapter and
checkpoints, every shard's index rows, the merge's scores, summary and index manifest) are
copied inside the store into the experiment's own prefix (no byte passes through the scheduler),
and the experiment completes with the merge's result and that manifest: later jobs, downloads
and the training-examples route see it as they see an unsharded experiment. The parts' own copies
are then removed.

A shard that fails (its worker died, its provider reported a failure) runs again alone, as a new
job of the same shard (a new job id, so the exactly-once submit of the new attempt is its own),
up to ``scheduler_shard_retries`` times; the finished shards are kept. A shard that exhausts its
attempts, or a training or merge job that fails, fails the experiment with words naming the part
and its cause, and the other active parts are cancelled.

The experiment is followed like a submitted job (its ``provider_job_id`` is
:data:`GRAPH_PROVIDER_JOB_ID`): the follower calls :meth:`Graph.step` instead of asking a
provider, under the same lease, and a part's poll that changed it wakes its experiment at once.
A step is idempotent: every part is created with an idempotency key naming the experiment, the
kind, the shard and the attempt, so a step repeated after a crash (or by the replica that took
the lease over) creates nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from artifact_store import ArtifactStore, job_key, job_prefix
from cost_model import ActualCost
from gpu_core.jobs import INDEX_SHARD, SHARD_MERGE, TRAINING
from gpu_core.schemas import NO_SIZE_LIMITS, parse_spec
from gpu_core.shard_schemas import (
    SHARD_DIR_PREFIX,
    SHARD_PARTS_DIR,
    ShardMergeRequest,
    ShardRequest,
    shard_slices,
)
from scheduler.config import Settings
from scheduler.store import JobRow, JobUpdate, Lease, Store, SubmitWork

log = logging.getLogger(__name__)

# The experiment's provider job id while the scheduler runs its graph (no provider has it).
GRAPH_PROVIDER_JOB_ID = "graph"
# What each phase adds to the experiment's progress (the shards' share split evenly among them).
TRAINING_SHARE, SHARDS_SHARE, MERGE_SHARE = 0.4, 0.55, 0.05
_FAILED_STATES = ("failed", "cancelled")

# Cancels one part at its provider and stores it cancelled (JobManager.cancel): the user, the
# part, the words it ends with and the cost the scheduler measured (None: none).
CancelPart = Callable[[str, str, str, ActualCost | None], Awaitable[Any]]
_CANCELLED_WITH_THE_EXPERIMENT = "cancelled with its sharded experiment"


class GraphError(Exception):
    """The experiment cannot go on; the message names the part and its cause."""


@dataclass(frozen=True)
class _Slot:
    """One place in the graph (the training job, shard ``shard``, the merge) and its attempts."""

    kind: str
    shard: int | None
    attempts: list[tuple[JobRow, Any]]  # (row, result: an index shard's only), oldest first

    @property
    def latest(self) -> JobRow | None:
        return self.attempts[-1][0] if self.attempts else None

    @property
    def result(self) -> Any:
        return self.attempts[-1][1] if self.attempts else None

    @property
    def status(self) -> str:
        return self.latest.status if self.latest is not None else "pending"

    @property
    def progress(self) -> float:
        latest = self.latest
        if latest is None:
            return 0.0
        return 1.0 if latest.status == "completed" else min(max(latest.progress, 0.0), 1.0)

    def view(self) -> dict[str, Any]:
        latest = self.latest
        return {
            "kind": self.kind,
            "shard": self.shard,
            "job_id": latest.id if latest is not None else "",
            "status": self.status,
            "progress": round(self.progress, 4),
            "attempts": len(self.attempts),
            "error": latest.error if latest is not None else "",
        }


@dataclass(frozen=True)
class _Plan:
    training: _Slot
    shards: list[_Slot]
    merge: _Slot

    @property
    def slots(self) -> list[_Slot]:
        return [self.training, *self.shards, self.merge]


def _plan(experiment: JobRow, parts: list[tuple[JobRow, Any]]) -> _Plan:
    by_slot: dict[tuple[str, int | None], list[tuple[JobRow, Any]]] = {}
    for row, result in parts:
        by_slot.setdefault((row.kind, row.shard), []).append((row, result))
    return _Plan(
        training=_Slot(TRAINING, None, by_slot.get((TRAINING, None), [])),
        shards=[_Slot(INDEX_SHARD, i, by_slot.get((INDEX_SHARD, i), [])) for i in range(experiment.shards)],
        merge=_Slot(SHARD_MERGE, None, by_slot.get((SHARD_MERGE, None), [])),
    )


def progress_of(plan: _Plan) -> float:
    shards = sum(slot.progress for slot in plan.shards) / max(1, len(plan.shards))
    return TRAINING_SHARE * plan.training.progress + SHARDS_SHARE * shards + MERGE_SHARE * plan.merge.progress


def stage_of(plan: _Plan) -> tuple[str, str]:
    """(stage, message) naming what runs."""
    training = plan.training.latest
    if training is None or training.status != "completed":
        detail = training.stage_message if training is not None and training.stage_message else "queued"
        # The training job's own stage (waiting for a GPU, loading, fine-tuning, evaluating).
        stage = training.stage if training is not None and training.stage else "queued"
        return stage, f"training job: {detail}"
    if plan.merge.latest is not None:
        return "influence", f"influence: merging {len(plan.shards)} shards"
    done = sum(1 for slot in plan.shards if slot.status == "completed")
    running = sum(1 for slot in plan.shards if slot.status == "running")
    retried = sum(1 for slot in plan.shards if len(slot.attempts) > 1 and slot.status != "completed")
    # A failed shard whose next attempt waits out its backoff.
    backing_off = sum(1 for slot in plan.shards if slot.status in _FAILED_STATES)
    message = f"influence: {done} of {len(plan.shards)} shards done"
    if running:
        message += f", {running} running"
    if retried:
        message += f", {retried} retried"
    if backing_off:
        message += f", {backing_off} failed and waiting to run again"
    return "influence", message


class Graph:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        artifacts_store: ArtifactStore,
        lease: Lease,
        queued: asyncio.Event,
    ) -> None:
        self._settings = settings
        self._store = store
        self._artifacts = artifacts_store
        self._lease = lease
        self._queued = queued  # set when a part was stored: the lease loop claims it now
        self._cancel_part: CancelPart | None = None

    def cancel_parts_with(self, cancel: CancelPart) -> None:
        self._cancel_part = cancel

    async def start(self, work: SubmitWork) -> bool:
        """The dispatcher's submit of a sharded experiment: store its training job and mark the
        experiment submitted (fenced by the lease and the submit token, as a provider's answer
        is). False when the experiment no longer waits for it (cancelled, lease lost)."""
        job = work.job
        await self._create(job, work.spec, TRAINING, attempt=1)
        plan = _plan(job, await self._store.graph_parts(job.id))
        updated = await self._store.apply(
            job.id,
            JobUpdate(
                status="submitted",
                stage="training",
                stage_message=f"a sharded experiment ({job.shards} index shards): training job queued",
                provider_job_id=GRAPH_PROVIDER_JOB_ID,
                parts=[slot.view() for slot in plan.slots],
            ),
            lease=self._lease,
            submit_token=work.token,
        )
        return updated is not None

    async def step(self, experiment: JobRow) -> tuple[bool, bool]:
        """Advance the graph once: (whether the experiment changed, whether it is now terminal)."""
        plan = _plan(experiment, await self._store.graph_parts(experiment.id))
        if await self._stop_at_spend_cap(experiment, plan):
            return True, True
        try:
            created = await self._advance(experiment, plan)
        except GraphError as exc:
            return True, await self._fail(experiment, plan, str(exc))
        if created:
            plan = _plan(experiment, await self._store.graph_parts(experiment.id))
        if plan.merge.status == "completed":
            return True, await self._complete(experiment, plan)
        return await self._report(experiment, plan)

    async def _advance(self, experiment: JobRow, plan: _Plan) -> bool:
        """Create the parts that are due (a failed shard's next attempt among them); True when it
        created one. Raises GraphError when a part failed for good."""
        training = plan.training
        if training.latest is None:
            # start() stores it before the experiment is marked submitted; this is a takeover's.
            await self._create(experiment, await self._spec(experiment), TRAINING, attempt=1)
            return True
        if training.status in _FAILED_STATES:
            raise GraphError(
                f"the training job {training.status}: {training.latest.error or 'no reason given'}"
            )
        if training.status != "completed":
            return False
        created = False
        spec: dict[str, Any] | None = None
        retries = self._settings.scheduler_shard_retries
        now = datetime.now(UTC)
        for slot in plan.shards:
            if slot.latest is not None and slot.status not in _FAILED_STATES:
                continue
            if slot.latest is not None and len(slot.attempts) > retries:
                request = slot.latest.request or {}
                raise GraphError(
                    f"index shard {slot.shard} of {experiment.shards} (training examples "
                    f"{request.get('start')}-{int(request.get('stop', 0)) - 1}) {slot.status} after "
                    f"{len(slot.attempts)} attempts: {slot.latest.error or 'no reason given'}"
                )
            if slot.latest is not None:
                if self._retry_due(slot.latest, len(slot.attempts)) > now:
                    continue  # backing off: a later step retries it
                log.warning(
                    "index shard failed; running it again",
                    extra={"job_id": experiment.id, "shard": slot.shard, "error": slot.latest.error},
                )
            spec = spec or await self._spec(experiment)
            request = _shard_request(experiment, spec, slot.shard or 0)
            await self._create(
                experiment,
                spec,
                INDEX_SHARD,
                attempt=len(slot.attempts) + 1,
                parent=training.latest,
                request=request.model_dump(mode="json"),
                shard=slot.shard,
            )
            created = True
        if created or any(slot.status != "completed" for slot in plan.shards):
            return created
        merge = plan.merge
        if merge.status in _FAILED_STATES:
            raise GraphError(f"the shard merge {merge.status}: {merge.latest.error if merge.latest else ''}")
        if merge.latest is None:
            try:
                shards = ShardMergeRequest.model_validate({"shards": [slot.result for slot in plan.shards]})
            except ValidationError:
                raise GraphError("the index shards' results are not index-shard results") from None
            await self._create(
                experiment,
                spec or await self._spec(experiment),
                SHARD_MERGE,
                attempt=1,
                parent=training.latest,
                request=shards.model_dump(mode="json"),
            )
            return True
        return False

    def _retry_due(self, failed: JobRow, attempts: int) -> datetime:
        """When a shard whose latest of ``attempts`` attempts ``failed`` may run again: the
        backoff setting after the failure, doubled for each attempt before it."""
        backoff_s = self._settings.scheduler_shard_retry_backoff_s * 2 ** (attempts - 1)
        return (failed.finished_at or failed.updated_at) + timedelta(seconds=backoff_s)

    async def _spec(self, experiment: JobRow) -> dict[str, Any]:
        spec = await self._store.get_spec(experiment.id)
        if spec is None:
            raise GraphError("the experiment's spec is gone")
        return dict(spec)

    async def _create(
        self,
        experiment: JobRow,
        spec: dict[str, Any],
        kind: str,
        attempt: int,
        parent: JobRow | None = None,
        request: dict[str, Any] | None = None,
        shard: int | None = None,
    ) -> JobRow:
        """Store one part (queued, for a dispatcher); the same part again is the stored one."""
        key = f"graph:{experiment.id}:{kind}:{'' if shard is None else shard}:{attempt}"
        part, created = await self._store.insert_job(
            experiment.user_id,
            experiment.compute_backend,
            experiment.provider,
            spec,
            key,
            kind=kind,
            parent_job_id=parent.id if parent is not None else None,
            request=request,
            trace_context=experiment.trace_context,
            graph_job_id=experiment.id,
            shard=shard,
        )
        if created:
            log.info(
                "sharded experiment part queued",
                extra={"job_id": experiment.id, "part_job_id": part.id, "kind": kind, "shard": shard},
            )
            self._queued.set()
        return part

    async def _report(self, experiment: JobRow, plan: _Plan) -> tuple[bool, bool]:
        """Store the experiment's progress, stage and parts when they changed (with a progress
        event carrying the parts, for watchers)."""
        parts = [slot.view() for slot in plan.slots]
        progress = round(progress_of(plan), 4)
        stage, message = stage_of(plan)
        running = any(slot.status == "running" for slot in plan.slots) or plan.training.status == "completed"
        status = "running" if running else experiment.status
        if (
            parts == experiment.parts
            and progress == round(experiment.progress, 4)
            and message == experiment.stage_message
            and status == experiment.status
        ):
            return False, False
        event: dict[str, Any] = {
            "type": "progress",
            "stage": stage,
            "progress": progress,
            "message": message,
            "parts": parts,
        }
        training = plan.training.latest
        # While the training job runs, its latest figures (epoch, step, loss, ETA) are the
        # experiment's: the job page draws the loss curve from them.
        metrics = training.latest_metrics if training is not None and training.status == "running" else None
        if metrics:
            event.update(metrics)
        stored = await self._store.apply(
            experiment.id,
            JobUpdate(
                events=[event],
                status=status,
                stage=stage,
                progress=progress,
                stage_message=message,
                latest_metrics=metrics or None,
                parts=parts,
            ),
            lease=self._lease,
        )
        if stored is not None:
            return True, False
        current = await self._store.get_job(experiment.id)
        if current is None or current.terminal:
            # Cancelled (or deleted) while this step ran: a part it created must not run on.
            await self._cancel_active(experiment)
            return True, True
        return False, False  # the lease went to another replica, which goes on

    async def _fail(self, experiment: JobRow, plan: _Plan, message: str) -> bool:
        log.warning("sharded experiment failed", extra={"job_id": experiment.id, "error": message})
        await self._store.apply(
            experiment.id,
            JobUpdate(
                status="failed",
                error=message,
                stage_message=message,
                parts=[slot.view() for slot in plan.slots],
            ),
            lease=self._lease,
        )
        await self._cancel_active(experiment)
        return True

    async def _cancel_active(
        self,
        experiment: JobRow,
        reason: str = _CANCELLED_WITH_THE_EXPERIMENT,
        costs: dict[str, ActualCost] | None = None,
    ) -> None:
        """Cancel every part still active (the experiment has ended or been cancelled), each
        with ``reason`` and its cost in ``costs`` (by part id) where the scheduler measured one."""
        if self._cancel_part is None:
            return
        for part in await self._store.active_jobs(experiment.user_id, graph_job_id=experiment.id):
            await self._cancel_part(experiment.user_id, part.id, reason, (costs or {}).get(part.id))

    async def _stop_at_spend_cap(self, experiment: JobRow, plan: _Plan) -> bool:
        """The researcher's spend cap holds for the whole graph: once its parts' settled costs
        plus the running ones' time so far (at the rate each one's estimate priced) reach it,
        the experiment is cancelled, then every active part, in words naming the cap and the
        amount. True when it stopped the experiment (or found it ended meanwhile)."""
        cap = experiment.max_cost_usd
        if cap <= 0:
            return False
        now = datetime.now(UTC)
        costs = {
            row.id: cost
            for slot in plan.slots
            for row, _ in slot.attempts
            if (cost := _cost_so_far(row, now)) is not None
        }
        spent = sum(cost.cost_usd for cost in costs.values())
        if spent < cap:
            return False
        running = sum(1 for row, _ in _rows(plan) if not row.terminal and row.started_at is not None)
        message = (
            f"Cancelled at your spend cap: its {len(costs)} jobs (training, index shards, merge) had "
            f"cost about ${spent:.4f} ({running} still running, priced at the rates their estimates "
            f"gave), reaching your cap of ${cap:.4f}"
        )
        log.info(
            "sharded experiment cancelled at its spend cap",
            extra={"job_id": experiment.id, "spent_usd": spent},
        )
        # Stored cancelled first, so that no step creates a part any more; then the parts.
        stored = await self._store.apply(
            experiment.id,
            JobUpdate(
                status="cancelled",
                error=message,
                stage_message=message,
                parts=[slot.view() for slot in plan.slots],
                actual=_summed_cost(list(costs.values()), "cancelled at the spend cap"),
            ),
            lease=self._lease,
        )
        if stored is None:
            current = await self._store.get_job(experiment.id)
            if current is not None and not current.terminal:
                return True  # the lease went to another replica, which goes on
        await self._cancel_active(experiment, message, costs)
        return True

    async def _complete(self, experiment: JobRow, plan: _Plan) -> bool:
        """Copy the parts' files into the experiment's prefix and complete it with the merge's
        result and that manifest; then remove the parts' own copies."""
        started = time.monotonic()
        manifest: list[dict[str, Any]] = []
        sources = [plan.training.latest, *(slot.latest for slot in plan.shards), plan.merge.latest]
        for part in sources:
            assert part is not None  # every slot completed
            kept = [entry for entry in part.artifacts if not _shard_parts_file(entry["name"])]
            for entry in kept:
                await self._artifacts.copy(
                    job_key(part.id, entry["name"]), job_key(experiment.id, entry["name"])
                )
            manifest.extend(kept)
        copy_s = time.monotonic() - started
        stored = await self._store.apply(
            experiment.id,
            JobUpdate(
                status="completed",
                # The merge's result with that manifest, copied inside PostgreSQL.
                result_of=plan.merge.latest.id if plan.merge.latest is not None else None,
                artifacts=manifest,
                progress=1.0,
                stage="influence",
                stage_message="completed",
                parts=[slot.view() for slot in plan.slots],
                actual=_summed_cost([row.actual for row, _ in _rows(plan) if row.actual is not None]),
            ),
            lease=self._lease,
        )
        if stored is None:
            return True  # cancelled meanwhile, or the lease went to another replica
        megabytes = sum(entry["bytes"] for entry in manifest) / 1e6
        log.info(
            "sharded experiment completed",
            extra={
                "job_id": experiment.id,
                "files": len(manifest),
                "megabytes": round(megabytes, 1),
                "copy_s": round(copy_s, 3),
            },
        )
        for slot in plan.slots:
            for part, _ in slot.attempts:
                await self._artifacts.delete_prefix(job_prefix(part.id))
                await self._store.clear_artifacts(part.id)
        return True


def _shard_request(experiment: JobRow, spec: dict[str, Any], shard: int) -> ShardRequest:
    """Shard ``shard``'s slice (gpu_core.sharding.shard_requests' split), counted from the row's
    training examples: a spec on a stored dataset holds none inline."""
    batch_size = parse_spec(spec, NO_SIZE_LIMITS).hyperparams.batch_size
    slices = shard_slices(experiment.n_train, batch_size, experiment.shards)
    start, stop = slices[shard]
    return ShardRequest(shard=shard, shards=len(slices), start=start, stop=stop)


def _shard_parts_file(name: str) -> bool:
    """A shard's score and summary columns: the merge's inputs, not an experiment's file."""
    return name.startswith(SHARD_PARTS_DIR.format(shard=SHARD_DIR_PREFIX))


def _rows(plan: _Plan) -> list[tuple[JobRow, Any]]:
    return [attempt for slot in plan.slots for attempt in slot.attempts]


def _cost_so_far(part: JobRow, now: datetime) -> ActualCost | None:
    """A part's cost: settled (what it measured when it ended), else its run time as the
    scheduler saw it (until now while it runs) at the rate its estimate priced; None before it
    started."""
    if part.actual is not None:
        return part.actual
    if part.started_at is None:
        return None
    end = part.finished_at if part.terminal and part.finished_at is not None else now
    run_s = max(0.0, (end - part.started_at).total_seconds())
    return ActualCost(
        gpu_seconds=run_s,
        delay_seconds=0.0,
        gpu=part.estimated_gpu,
        device="",
        usd_per_second=part.estimated_usd_per_second,
        cost_usd=run_s * part.estimated_usd_per_second,
        source="run time as the scheduler saw it (cancelled at the spend cap)",
    )


def _summed_cost(measured: list[ActualCost], note: str = "") -> ActualCost | None:
    """The experiment's cost: its parts' costs added up (None when none was measured)."""
    if not measured:
        return None
    gpu_seconds = sum(cost.gpu_seconds for cost in measured)
    cost_usd = sum(cost.cost_usd for cost in measured)
    return ActualCost(
        gpu_seconds=gpu_seconds,
        delay_seconds=sum(cost.delay_seconds for cost in measured),
        gpu=measured[0].gpu,
        device=measured[0].device,
        usd_per_second=cost_usd / gpu_seconds if gpu_seconds > 0 else 0.0,
        cost_usd=cost_usd,
        source=f"the sum of its {len(measured)} jobs (training, index shards, merge)"
        + (f", {note}" if note else ""),
    )
