"""Replicas share the jobs table through leases: claims never overlap, a job whose replica is
gone is taken over, and a takeover in the window between provider submit and storing the
provider's job id resubmits under the same job id, which the provider deduplicates."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from influence.v1 import scheduler_pb2
from scheduler.db import create_pool
from scheduler.store import Lease, Store

pytestmark = pytest.mark.timeout(60)


async def test_concurrent_claims_never_take_the_same_job(scheduler, database_url) -> None:
    pool = await create_pool(database_url)
    try:
        ids = [uuid.uuid4() for _ in range(40)]
        await pool.executemany(
            """INSERT INTO jobs (id, user_id, provider, spec, lease_owner, lease_expires_at)
               VALUES ($1, 'claims', 'local', '{}'::jsonb, 'gone', now() - interval '1 second')""",
            [(job_id,) for job_id in ids],
        )
        store = Store(pool)
        claims = await asyncio.gather(
            store.claim_jobs(Lease("replica-a", 30), 25), store.claim_jobs(Lease("replica-b", 30), 25)
        )
        first, second = ([job.id for job in claimed] for claimed in claims)
        assert not set(first) & set(second)
        assert {str(job_id) for job_id in ids} <= set(first) | set(second)
        # A live lease is not claimable by another replica, nor again by its own (that would start
        # a second dispatcher for a job whose submit is in flight); its own replica renews it.
        for replica in ("replica-c", "replica-a"):
            again = await store.claim_jobs(Lease(replica, 30), 100)
            assert {job.id for job in again}.isdisjoint(map(str, ids))
        assert await store.renew_leases(Lease("replica-a", 30), first) == set(first)
        assert await store.renew_leases(Lease("replica-b", 30), first) == set()
    finally:
        await pool.execute("DELETE FROM jobs WHERE user_id = 'claims'")
        await pool.close()


async def test_takeover_in_the_submit_window_submits_once(start, provider, h, database_url) -> None:
    provider.servicer.plan = h.plan(hold_at=2)
    first = await start(scheduler_replica_id="replica-a")
    job = await first.stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json()))
    await h.until_submitted(provider.servicer, job.id)
    # replica-a dies after the provider took the job but before its id was stored: the submit
    # token is written, the provider job id is not, the lease has run out. It is stopped first
    # (a live replica would go on following the row this rewrites) and replica-b starts after.
    await first.stop()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """UPDATE jobs SET provider_job_id = NULL, status = 'queued', submit_token = gen_random_uuid(),
                   lease_owner = 'replica-dead',
                   lease_expires_at = now() WHERE id = $1::uuid""",
            job.id,
        )
        second = await start(scheduler_replica_id="replica-b")
        deadline = asyncio.get_running_loop().time() + 30  # a loaded machine turns leases slowly
        while True:
            row = await conn.fetchrow(
                "SELECT lease_owner, provider_job_id FROM jobs WHERE id = $1::uuid", job.id
            )
            if row["lease_owner"] == "replica-b" and row["provider_job_id"]:
                break
            assert asyncio.get_running_loop().time() < deadline, dict(row)
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    provider.servicer.plan.release.set()
    events = await h.watch_all(second.stub, "alice", job.id)
    seqs = [event.seq for event in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert json.loads(events[-1].event_json)["state"] == "completed"
    # Reconciled under the same job id: the provider ran it once.
    assert provider.servicer.submit_calls == [job.id]


async def test_a_replica_that_stops_hands_its_jobs_over_at_once(start, provider, h, database_url) -> None:
    provider.servicer.plan = h.plan(hold_at=2)
    leaving = await start(scheduler_replica_id="replica-leaving", scheduler_lease_s=30)
    staying = await start(scheduler_replica_id="replica-staying", scheduler_lease_s=30)
    job = await leaving.stub.SubmitJob(scheduler_pb2.SubmitJobRequest(user_id="bob", spec_json=h.spec_json()))
    await leaving.stop()
    provider.servicer.plan.release.set()
    # Well before the 30 s lease would expire: the released job is claimed on the next turn.
    events = await asyncio.wait_for(h.watch_all(staying.stub, "bob", job.id), 20)
    assert json.loads(events[-1].event_json)["state"] == "completed"
