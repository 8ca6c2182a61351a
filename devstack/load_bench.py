"""Load benchmark (`make bench-load`): many jobs from many users through the gateway, against
two scheduler replicas, compute-local (hosted) and the fake RunPod (BYOK), on one machine.

Half the users are hosted (compute-local, one device: one job runs, the rest wait in its queue),
half bring a RunPod key (the fake RunPod runs with no GPU free, so jobs wait IN_QUEUE and no
worker runs): every job is submitted, stored, routed and followed, the cheap way. The admission
limits are lifted (operator settings) so that all jobs are accepted. Figures: submit latency,
time from submit to the job's first stored event, scheduler CPU, PostgreSQL connections, and
provider calls per second (RunPod's job-API limits: /run 1000 and /status, /stream 2000 per 10 s).

The money figures (issue 22): 5xx answers (must be 0), submit p99 (must be < 500 ms: submit only
inserts), accepted /run calls at the fake RunPod per BYOK job (exactly one each: counted per job,
jobs cancelled while their /run was in flight included),
database connections per scheduler replica (at most 10), and every accepted job terminal: after
the follow window the jobs still waiting (no GPU in the fake, one device for compute-local) are
cancelled through the API, and the bench waits until each one has ended.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import httpx

from devstack.client import GatewayClient
from devstack.stack import REPO_ROOT, FakeRunPodProcess, Stack

RUNPOD_KEY = "rpa_loadbench_KEY_0123456789"
RUNPOD_LIMITS_PER_10S = {"job.run": 1000, "job.status": 2000, "job.stream": 2000, "job.cancel": 100}
_METRIC_LINE = re.compile(r'^runpod_api_requests_total\{route="([^"]+)",status="([^"]+)"\} ([0-9.e+]+)$')


def tiny_spec(user: int, n: int) -> dict:
    return {
        "training_data": [{"prompt": f"u{user} q{n} {i}", "completion": f"a{i}"} for i in range(2)],
        "eval_data": [{"prompt": "e", "expected": "x"}],
        "hyperparams": {"epochs": 1, "max_seq_len": 16, "max_new_tokens": 2},
        "few_shot_k": 0,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runpod_calls(stack: Stack) -> Counter[str]:
    text = httpx.get(f"http://127.0.0.1:{stack.metrics_ports['compute-runpod']}/metrics", timeout=10).text
    calls: Counter[str] = Counter()
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match:
            calls[match.group(1)] += int(float(match.group(3)))
    return calls


class Sampler(threading.Thread):
    """Every second: PostgreSQL connections and compute-runpod's RunPod calls so far."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.connections: list[int] = []
        self.per_replica: Counter[str] = Counter()  # the most connections each replica held
        self.calls: list[tuple[float, Counter[str]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        async def connections() -> tuple[int, dict[str, int]]:
            conn = await asyncpg.connect(self.stack.database_url)
            try:
                rows = await conn.fetch(
                    """SELECT application_name AS name, count(*) AS n FROM pg_stat_activity
                       WHERE datname = 'influence' GROUP BY application_name"""
                )
            finally:
                await conn.close()
            replicas = {r["name"]: int(r["n"]) for r in rows if r["name"].startswith("scheduler:")}
            return sum(int(r["n"]) for r in rows), replicas

        while not self.stop.is_set():
            total, replicas = asyncio.run(connections())
            self.connections.append(total - 1)  # not this probe's own
            for name, n in replicas.items():
                self.per_replica[name] = max(self.per_replica[name], n)
            self.calls.append((time.monotonic(), runpod_calls(self.stack)))
            self.stop.wait(1.0)

    def peak_per_10s(self, route: str) -> int:
        peak = 0
        for i, (start, before) in enumerate(self.calls):
            for end, after in self.calls[i:]:
                if end - start > 10.0:
                    break
                peak = max(peak, after[route] - before[route])
        return peak


def first_event_delays(database_url: str) -> list[float]:
    async def query() -> list[float]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                """SELECT extract(epoch FROM min(e.created_at) - j.created_at)::float8 AS delay
                   FROM jobs j JOIN job_events e ON e.job_id = j.id GROUP BY j.id, j.created_at"""
            )
            return [row["delay"] for row in rows]
        finally:
            await conn.close()

    return asyncio.run(query())


def runs_per_bench_job(fake: FakeRunPodProcess) -> Counter[str]:
    """Accepted /run calls per bench job. The fake's input carries no job id of ours (no store
    signs URLs here), so each is told apart by its spec's first prompt, unique per (user, n)."""
    runs: Counter[str] = Counter()
    for run_id in fake.control("GET", "jobs")["accepted_runs"]:  # type: ignore[index]
        job_input = fake.control("GET", f"jobs/{run_id}/input")["input"]  # type: ignore[index]
        runs[job_input["training_data"][0]["prompt"]] += 1  # an experiment's input is its spec
    return runs


def job_outcomes(database_url: str) -> dict[str, int]:
    """Jobs by state, and the BYOK jobs that reached RunPod (with how many distinct RunPod ids)."""

    async def query() -> dict[str, int]:
        conn = await asyncpg.connect(database_url)
        try:
            states = {
                r["status"]: r["n"]
                for r in await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY 1")
            }
            byok = """FROM jobs WHERE provider = 'runpod' AND provider_job_id IS NOT NULL"""
            return {
                **states,
                "byok_submitted": await conn.fetchval(f"SELECT count(*) {byok}"),
                "byok_distinct_runpod_ids": await conn.fetchval(
                    f"SELECT count(DISTINCT provider_job_id) {byok}"
                ),
            }
        finally:
            await conn.close()

    return asyncio.run(query())


def end_every_job(clients: list[GatewayClient], accepted: list[tuple[int, str]], deadline_s: float) -> int:
    """Cancel every accepted job that has not ended; wait until all have. Returns how many are
    still not terminal at the deadline."""
    terminal = {"completed", "failed", "cancelled"}
    for user, job_id in accepted:
        clients[user].request("POST", f"/api/jobs/{job_id}/cancel")
    ends_at = time.monotonic() + deadline_s
    pending = list(accepted)
    while pending and time.monotonic() < ends_at:
        pending = [
            (user, job_id)
            for user, job_id in pending
            if clients[user].request("GET", f"/api/jobs/{job_id}").json().get("status") not in terminal
        ]
        if pending:
            time.sleep(1.0)
    return len(pending)


def run(users: int, jobs_per_user: int, follow_s: float, workers: int) -> dict[str, float | str]:
    fake = FakeRunPodProcess.start()
    try:
        fake.control("POST", "keys", key=RUNPOD_KEY, balance=1_000_000.0)
        fake.control("POST", "mode", throttled=True)
        with (
            tempfile.TemporaryDirectory(prefix="load-") as data_dir,
            Stack(
                data_dir=Path(data_dir),
                extra_env={
                    **fake.settings_env(),
                    "HOSTED_MAX_ACTIVE_JOBS": "0",
                    "BYOK_MAX_ACTIVE_JOBS": "0",
                    "HOSTED_MAX_SUBMISSIONS_PER_HOUR": "0",
                    "HOSTED_GPU_SECONDS_PER_MONTH": "0",
                    "RUNPOD_QUEUE_TIMEOUT_S": "3600",
                    "COMPUTE_LOCAL_TORCH_THREADS": "1",
                    "LOG_LEVEL": "WARNING",
                },
                scheduler_replicas=2,
            ) as stack,
        ):
            clients = []
            for user in range(users):
                client = GatewayClient(stack.gateway_url, timeout_s=120)
                client.sign_in_locally(f"load-{user}")
                if user % 2:
                    reply = client.request("POST", "/api/settings/runpod-key", json={"api_key": RUNPOD_KEY})
                    reply.raise_for_status()
                clients.append(client)
            schedulers = [stack.running[name].process.pid for name in stack.scheduler_names]
            cpu_before = sum(cpu_seconds(pid) for pid in schedulers)
            sampler = Sampler(stack)
            sampler.start()
            started = time.monotonic()

            answers: Counter[int] = Counter()
            accepted: list[tuple[int, str]] = []

            def submit(index: int) -> float:
                user, n = index % users, index // users
                began = time.perf_counter()
                reply = clients[user].request("POST", "/api/train", json=tiny_spec(user, n))
                answers[reply.status_code] += 1
                if reply.status_code == 202:
                    accepted.append((user, reply.json()["job_id"]))
                else:
                    print(f"submit {index}: {reply.status_code} {reply.text[:200]}", file=sys.stderr)
                return time.perf_counter() - began

            total = users * jobs_per_user
            with ThreadPoolExecutor(max_workers=workers) as pool:
                latencies = list(pool.map(submit, range(total)))
            submitted_s = time.monotonic() - started
            time.sleep(follow_s)  # every job followed: status polls at the providers
            window_s = time.monotonic() - started
            before_end = job_outcomes(stack.database_url)
            not_ended = end_every_job(clients, accepted, deadline_s=120)
            sampler.stop.set()
            sampler.join()
            outcomes = job_outcomes(stack.database_url)
            runs_accepted = sum(1 for r in fake.requests("job.run") if r["status"] == 200)
            runs_per_job = runs_per_bench_job(fake)
            cpu = sum(cpu_seconds(pid) for pid in schedulers) - cpu_before
            delays = first_event_delays(stack.database_url)
            calls = sampler.calls[-1][1] - sampler.calls[0][1]
            local = httpx.get(
                f"http://127.0.0.1:{stack.metrics_ports['compute-local']}/metrics", timeout=10
            ).text
    finally:
        fake.stop()
    local_calls = sum(
        float(line.rsplit(" ", 1)[1])
        for line in local.splitlines()
        # Every ComputeProvider RPC the schedulers made (health checks are not counted).
        if line.startswith("grpc_server_handled_total{") and "Health" not in line and "Reflection" not in line
    )
    figures: dict[str, float | str] = {
        "jobs": total,
        "users": users,
        "submit_answers": ", ".join(f"{status}: {n}" for status, n in sorted(answers.items())),
        "submit_5xx": sum(n for status, n in answers.items() if status >= 500),
        "accepted_jobs": len(accepted),
        "terminal_by_themselves": sum(
            before_end.get(state, 0) for state in ("completed", "failed", "cancelled")
        ),
        "terminal_after_cancel_rest": f"{len(accepted) - not_ended} of {len(accepted)}",
        "jobs_by_state": ", ".join(
            f"{state}: {n}" for state, n in sorted(outcomes.items()) if not state.startswith("byok")
        ),
        "byok_jobs_submitted_to_runpod": outcomes["byok_submitted"],
        "byok_distinct_runpod_job_ids": outcomes["byok_distinct_runpod_ids"],
        "runpod_run_accepted": runs_accepted,
        # Every job that reached RunPod, also those cancelled while their /run was in flight
        # (the dispatcher then cancels them at RunPod: accepted, never recorded on the row).
        "byok_jobs_with_a_run_accepted": len(runs_per_job),
        "byok_jobs_with_two_or_more_runs": sum(1 for n in runs_per_job.values() if n > 1),
        "db_connections_max_per_replica": ", ".join(
            f"{name}: {n}" for name, n in sorted(sampler.per_replica.items())
        ),
        "submit_wall_s": round(submitted_s, 1),
        "submit_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "submit_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "jobs_with_events": len(delays),
        "first_event_p50_ms": round(statistics.median(delays) * 1000, 1),
        "first_event_p99_ms": round(percentile(delays, 0.99) * 1000, 1),
        "scheduler_cpu_s": round(cpu, 1),
        "scheduler_cpu_pct_of_one_core": round(100 * cpu / window_s, 1),
        "db_connections_max": max(sampler.connections),
        "compute_local_rpcs_per_s": round(local_calls / window_s, 1),
        "window_s": round(window_s, 1),
    }
    for route, limit in RUNPOD_LIMITS_PER_10S.items():
        figures[f"runpod_{route}_per_s"] = round(calls[route] / window_s, 1)
        peak = sampler.peak_per_10s(route)
        figures[f"runpod_{route}_peak_per_10s"] = f"{peak} (limit {limit})"
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.load_bench")
    parser.add_argument("--users", type=int, default=int(os.environ.get("LOAD_USERS", "50")))
    parser.add_argument("--jobs-per-user", type=int, default=int(os.environ.get("LOAD_JOBS_PER_USER", "20")))
    parser.add_argument("--follow-s", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    os.chdir(REPO_ROOT)
    figures = run(args.users, args.jobs_per_user, args.follow_s, args.workers)
    for name, value in figures.items():
        print(f"{name:34} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
