"""Listing 500 jobs whose specs are 10 MiB each grows the scheduler's resident memory by less
than 50 MB: hot reads never load the spec (model id, counts and method are columns).

The real scheduler runs as its own process (devstack.Stack, embedded PostgreSQL). The jobs are
written straight into its table (completed, so nothing is dispatched), their specs built inside
PostgreSQL. Then ListJobs (what `GET /api/jobs?limit=500` asks the scheduler) runs three times
while the scheduler's RSS is sampled from /proc every 20 ms. Prints the figures; exits 1 above
the target.

    make bench-list-memory   (or: python -m benchmarks.list_jobs_memory; LIST_JOBS=500, LIST_SPEC_MIB=10)
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import grpc

from benchmarks.artifact_memory import RssSampler
from devstack.stack import Stack
from influence.v1 import scheduler_pb2, scheduler_pb2_grpc

LIMIT_MB = 50.0


async def fill(database_url: str, jobs: int, spec_mib: int) -> float:
    """``jobs`` completed jobs of one user, each with a spec of about ``spec_mib`` MiB; returns
    the size of one spec in MiB as stored (uncompressed)."""
    conn = await asyncpg.connect(database_url)
    try:
        # ~1 KiB per training example: spec_mib * 1024 examples make spec_mib MiB.
        await conn.execute(
            """CREATE TEMP TABLE big AS SELECT jsonb_build_object(
                   'model_id', 'local/tiny-llama', 'influence_method', 'tracin',
                   'training_data', (SELECT jsonb_agg(jsonb_build_object(
                        'id', 't' || i, 'prompt', repeat('p', 500) || i, 'completion', repeat('c', 480)))
                        FROM generate_series(1, $1 * 1024) AS i),
                   'eval_data', jsonb_build_array(jsonb_build_object('prompt', 'e', 'expected', 'x')))
                   AS spec""",
            spec_mib,
        )
        size = await conn.fetchval("SELECT octet_length(spec::text) FROM big")
        await conn.execute(
            """INSERT INTO jobs (id, user_id, provider, status, spec, model_id, influence_method,
                                 n_train, n_eval, finished_at)
               SELECT gen_random_uuid(), 'bench', 'local', 'completed', big.spec, 'local/tiny-llama',
                      'tracin', $2 * 1024, 1, now()
               FROM big, generate_series(1, $1)""",
            jobs,
            spec_mib,
        )
        return size / (1 << 20)
    finally:
        await conn.close()


async def main() -> int:
    jobs = int(os.environ.get("LIST_JOBS", "500"))
    spec_mib = int(os.environ.get("LIST_SPEC_MIB", "10"))
    with tempfile.TemporaryDirectory(prefix="bench-list-memory-") as tmp:
        root = Path(tmp)
        env = {"ARTIFACT_STORE_URL": str(root / "store")}
        with Stack(data_dir=root / "stack", extra_env=env, services=("scheduler",)) as stack:
            started = time.monotonic()
            spec_size = await fill(stack.database_url, jobs, spec_mib)
            print(f"stored {jobs} jobs with {spec_size:.1f} MiB specs in {time.monotonic() - started:.0f} s")
            pid = stack.running["scheduler"].process.pid
            channel = grpc.aio.insecure_channel(stack.address("scheduler"))
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            sampler = RssSampler(pid)
            started = time.monotonic()
            for _ in range(3):
                listed = await stub.ListJobs(
                    scheduler_pb2.ListJobsRequest(user_id="bench", limit=500), timeout=120
                )
            elapsed = (time.monotonic() - started) / 3
            base_mb, peak_mb, growth_mb = sampler.stop()
            await channel.close()
    ok = (
        len(listed.jobs) == min(jobs, 500)
        and listed.jobs[0].n_train == spec_mib * 1024
        and growth_mb < LIMIT_MB
    )
    print(
        f"ListJobs limit=500: {len(listed.jobs)} jobs in {elapsed * 1000:.0f} ms each; scheduler RSS "
        f"{base_mb:.0f} MB before, {peak_mb:.0f} MB peak, growth {growth_mb:.1f} MB"
    )
    print(f"target: growth under {LIMIT_MB:.0f} MB: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(asyncio.run(main()))
