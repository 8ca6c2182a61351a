"""Follow-up query latency through the whole stack (``make bench-query-stack``): gateway ->
scheduler -> compute-local's warm query worker -> gpu_core.query, on the embedded default.

Starts PostgreSQL and every service on free ports (devstack.Stack, like tests/e2e), runs one
TrackStar parent experiment per size (one epoch, four eval examples: the 1,000- and
10,000-example gradient indexes), then asks it ``--warm`` + 1 queries one after another (a
training prompt, no ``expected``). Query-to-answer = from the POST to the GET that returns the
answer, the progress stream followed in between, as the dashboard does. Cold: the first query of
an experiment (the warm worker starts: Python, torch, model, adapter and index load); warm: the
median of the next ones. Issue 12's targets: cold under 10 s with a 10,000-example index, warm
under 3 s. The scheduler's poll interval bounds how soon it sees a finished query: it is printed.
Also printed: the resident memory (VmRSS) of the experiment's warm worker after its queries, what
compute-local keeps per warm worker (docs/services.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.planted import planted_duplicate_spec
from devstack.client import GatewayClient
from devstack.stack import Stack

COLD_TARGET_S, WARM_TARGET_S = 10.0, 3.0


def ask(client: GatewayClient, job_id: str, prompt: str) -> tuple[float, dict[str, Any]]:
    """Seconds from submitting the query to reading its answer, and the answer."""
    started = time.monotonic()
    reply = client.request(
        "POST", f"/api/jobs/{job_id}/queries", json={"queries": [{"prompt": prompt}], "top_k": 10}
    )
    reply.raise_for_status()
    query_id = reply.json()["query_job_id"]
    events = list(client.events(query_id, timeout_s=600))
    query = client.request("GET", f"/api/jobs/{job_id}/queries/{query_id}").json()
    seconds = time.monotonic() - started
    if query["status"] != "completed":
        raise RuntimeError(f"query {query['status']}: {query.get('error')} (last event {events[-1:]})")
    return seconds, query["result"]


def query_worker_rss_mib(compute_local_pid: int) -> dict[int, float]:
    """Resident memory of compute-local's warm query workers (its child processes), by pid."""
    found = {}
    children = Path(f"/proc/{compute_local_pid}/task/{compute_local_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            if b"compute_local.query_worker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        found[pid] = rss_kib / 1024
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.query_stack_latency")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--warm", type=int, default=3, help="warm queries after the cold one")
    parser.add_argument(
        "--poll-interval-s", type=float, default=1.0, help="SCHEDULER_POLL_INTERVAL_S (its default is 1 s)"
    )
    args = parser.parse_args(argv)
    failures = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-query-stack-") as tmp:
        env = {"SCHEDULER_POLL_INTERVAL_S": str(args.poll_interval_s)}
        with Stack(
            data_dir=Path(tmp), extra_env=env, services=("keyvault", "compute-local", "scheduler", "gateway")
        ) as stack:
            client = GatewayClient(stack.gateway_url)
            client.sign_in_locally("bench")
            seen_workers: set[int] = set()
            for n_train in args.sizes:
                spec = planted_duplicate_spec("trackstar", n_train, 4, epochs=1)
                started = time.monotonic()
                job_id = client.submit(spec)["job_id"]
                if list(client.events(job_id, timeout_s=3600))[-1].get("state") != "completed":
                    failures.append(f"{n_train}: the parent experiment did not complete")
                    continue
                built_s = time.monotonic() - started
                prompts = [spec["training_data"][(i * 7) % n_train]["prompt"] for i in range(args.warm + 1)]
                cold_s, first = ask(client, job_id, prompts[0])
                warm_s = [ask(client, job_id, prompt)[0] for prompt in prompts[1:]]
                warm_median = statistics.median(warm_s) if warm_s else float("nan")
                workers = query_worker_rss_mib(stack.running["compute-local"].process.pid)
                new_pids = set(workers) - seen_workers
                seen_workers |= set(workers)
                rss = max((workers[pid] for pid in new_pids), default=float("nan"))
                rows.append(
                    (
                        n_train,
                        built_s,
                        cold_s,
                        warm_median,
                        min(warm_s, default=float("nan")),
                        rss,
                        first["source"],
                    )
                )
                if cold_s >= COLD_TARGET_S:
                    failures.append(f"{n_train}: cold {cold_s:.2f} s >= {COLD_TARGET_S} s")
                if warm_s and warm_median >= WARM_TARGET_S:
                    failures.append(f"{n_train}: warm {warm_median:.2f} s >= {WARM_TARGET_S} s")
    print(
        f"query-to-answer through the stack (compute-local, tiny model, TrackStar index; "
        f"scheduler poll {args.poll_interval_s} s)"
    )
    print(
        f"{'train':>7} {'parent s':>9} {'cold s':>7} {'warm s (median)':>16} {'warm s (min)':>13} "
        f"{'worker RSS MiB':>15}  source"
    )
    for n_train, built_s, cold_s, warm_median, warm_min, rss, source in rows:
        print(
            f"{n_train:>7} {built_s:>9.1f} {cold_s:>7.2f} {warm_median:>16.2f} {warm_min:>13.2f} "
            f"{rss:>15.0f}  {source}"
        )
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
