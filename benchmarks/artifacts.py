"""The issue's job through the whole stack: 10,000 training x 1,000 eval examples, TracIn, 1 epoch,
max_new_tokens 1, few_shot_k 0, short texts, on the embedded default (compute-local, local store).

Starts PostgreSQL and every service on free ports (devstack.Stack, like tests/e2e), submits the
job through the gateway, waits for it, downloads scores.npy through the gateway and checks it
equals the child's matrix, checks the results JSON is under 5 MB, and prints the job's wall time,
the time spent moving artifacts (target: at most 10% of it) and the estimate against the
measured time (target: within 3x). Exits 1 when a check or target fails.

    make bench-artifacts   (or: python -m benchmarks.artifacts [--train N --eval M])
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.specs import tracin_spec
from devstack.client import GatewayClient
from devstack.stack import Stack

RESULTS_LIMIT_BYTES = 5 * 1024 * 1024


def _transfer_seconds(scheduler_log: str, job_id: str) -> float:
    for line in scheduler_log.splitlines():
        if '"artifacts stored"' in line and job_id in line:
            return float(json.loads(line)["seconds"])
    raise RuntimeError("the scheduler logged no artifact transfer for the job")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.artifacts")
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--eval", type=int, default=1_000)
    args = parser.parse_args(argv)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp:
        data_dir = Path(tmp)
        env = {"SCHEDULER_POLL_INTERVAL_S": "0.2", "ARTIFACT_STORE_URL": str(data_dir / "artifacts")}
        with Stack(
            data_dir=data_dir, extra_env=env, services=("keyvault", "compute-local", "scheduler", "gateway")
        ) as stack:
            client = GatewayClient(stack.gateway_url)
            client.sign_in_locally("bench")
            spec = tracin_spec(args.train, args.eval)
            started = time.monotonic()
            submitted = client.submit(spec)
            job_id = submitted["job_id"]
            events = list(client.events(job_id, timeout_s=3600))
            wall_s = time.monotonic() - started
            job = client.job(job_id)
            print(
                f"job {args.train} train x {args.eval} eval TracIn: {job['status']} in {wall_s:.1f} s"
                + (f" ({job.get('error')})" if job["status"] != "completed" else "")
            )
            if job["status"] != "completed" or events[-1].get("state") != "completed":
                return 1

            results = client.request("GET", f"/api/jobs/{job_id}/results")
            size = len(results.content)
            print(f"results JSON: {size / 1e6:.2f} MB (limit {RESULTS_LIMIT_BYTES / 1e6:.2f} MB)")
            if size >= RESULTS_LIMIT_BYTES:
                failures.append("results JSON over 5 MB")
            result = results.json()

            download = data_dir / "downloaded-scores.npy"
            download_started = time.monotonic()
            with client.http.stream(
                "GET", f"/api/jobs/{job_id}/artifacts/scores.npy", headers=client.headers, timeout=600
            ) as reply:
                reply.raise_for_status()
                with open(download, "wb") as handle:
                    for chunk in reply.iter_bytes(1 << 20):
                        handle.write(chunk)
            download_s = time.monotonic() - download_started
            (child_file,) = (data_dir / "compute-local" / "jobs").glob("*/artifacts/scores.npy")
            downloaded, child = np.load(download), np.load(child_file)
            equal = downloaded.shape == (args.eval, args.train) and np.array_equal(downloaded, child)
            print(
                f"scores.npy: {download.stat().st_size / 1e6:.1f} MB downloaded in {download_s:.2f} s, "
                f"shape {downloaded.shape} {downloaded.dtype}, equals the child's matrix: {equal}"
            )
            if not equal:
                failures.append("downloaded scores.npy differs from the child's")

            writing_s = result["timings"].get("artifacts", 0.0)
            transfer_s = _transfer_seconds(stack.log_text("scheduler"), job_id)
            moving_s = writing_s + transfer_s
            total_bytes = sum(a["bytes"] for a in result["artifacts"])
            share = moving_s / wall_s
            print(
                f"artifacts: {len(result['artifacts'])} files, {total_bytes / 1e6:.1f} MB; moving took "
                f"{moving_s:.2f} s ({writing_s:.2f} s writing + hashing in the child, {transfer_s:.2f} s "
                f"into the store) = {share:.1%} of the wall time (target <= 10%)"
            )
            if share > 0.10:
                failures.append("moving artifacts took more than 10% of the wall time")

            estimate_s = submitted["estimated_time_s"]
            ratio = max(estimate_s / wall_s, wall_s / estimate_s)
            print(
                f"estimate {estimate_s:.1f} s vs measured {wall_s:.1f} s: off by {ratio:.2f}x (target <= 3x)"
            )
            print(
                "pipeline stages: "
                + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result["timings"].items())
            )
            if ratio > 3:
                failures.append("estimate more than 3x off")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
