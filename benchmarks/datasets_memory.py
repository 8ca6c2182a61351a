"""A stored dataset through the whole stack (``make bench-datasets``): a benchmark, not a test.

A JSONL of ``--n-train`` examples (default 100,000; the cipher task of bench_scale) is uploaded
through ``POST /api/datasets`` of a ``make run``-shaped stack (PostgreSQL, keyvault, scheduler,
compute-local, gateway as separate processes), then run as an experiment that names it
(``training_dataset_id``): the tiny model, projected TracIn, 100 eval examples inline. Printed:
the upload's wall time and the gateway's count; the experiment's wall time; and the resident
memory of the gateway and the scheduler (``VmRSS`` before, ``VmHWM``, the peak since the
process started, after the upload and after the run), which stays flat: neither holds the file
or its examples, only chunks of it. ``--shards N`` (``make bench-datasets BENCH_SHARDS=2``) runs
it as a sharded experiment (the scheduler's graph: a training job, N index shards, a merge) and
prints each part's attempts and the scheduler's copy of their files into the experiment.

    .venv/bin/python -m benchmarks.datasets_memory [--n-train 100000] [--threads 2] [--shards 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.bench_scale import SCALE_EVAL, cipher_pairs
from devstack.client import GatewayClient
from devstack.stack import Stack

_WATCHED = ("gateway", "scheduler")


def _status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2, help="compute-local's torch threads")
    parser.add_argument("--shards", type=int, default=1, help="influence.shards of the experiment")
    args = parser.parse_args()
    pairs = cipher_pairs(args.n_train + SCALE_EVAL, seed=args.n_train)
    with tempfile.TemporaryDirectory(prefix="bench-datasets-") as work:
        data = Path(work) / "train.jsonl"
        with data.open("w") as out:
            for i, (prompt, completion) in enumerate(pairs[: args.n_train]):
                out.write(json.dumps({"id": f"t{i}", "prompt": prompt, "completion": completion}) + "\n")
        spec = {
            "model_id": "local/tiny-llama",
            "eval_data": [{"prompt": p, "expected": c} for p, c in pairs[args.n_train :]],
            "hyperparams": {
                "epochs": 1,
                "batch_size": 32,
                "learning_rate": 0.004,
                "max_seq_len": 32,
                "max_new_tokens": 1,
            },
            "few_shot_k": 0,
            "influence_method": "tracin",
            "influence": {"projection_dim": 4096, "shards": args.shards},
        }
        with Stack(
            data_dir=Path(work) / "stack",
            extra_env={
                "SCHEDULER_POLL_INTERVAL_S": "0.5",
                "COMPUTE_LOCAL_TORCH_THREADS": str(args.threads),
            },
            services=("keyvault", "compute-local", "scheduler", "gateway"),
        ) as stack:
            pids = {name: stack.running[name].process.pid for name in _WATCHED}
            client = GatewayClient(stack.gateway_url, timeout_s=600)
            client.sign_in_locally("bench")
            before = {name: _status_mib(pid, "VmRSS") for name, pid in pids.items()}
            started_hwm = {name: _status_mib(pid, "VmHWM") for name, pid in pids.items()}

            started = time.monotonic()
            reply = client.request(
                "POST",
                "/api/datasets",
                params={"kind": "train", "filename": "train.jsonl"},
                content=_file_chunks(data),
            )
            upload_s = time.monotonic() - started
            if reply.status_code != 201:
                raise SystemExit(f"upload failed: {reply.status_code} {reply.text[:500]}")
            dataset = reply.json()
            after_upload = {name: _status_mib(pid, "VmHWM") for name, pid in pids.items()}
            print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
            print(
                f"dataset: {dataset['count']:,} examples ({dataset['format']}), "
                f"{dataset['bytes'] / 1e6:.1f} MB, uploaded, read and stored in {upload_s:.1f} s",
                flush=True,
            )
            _memory_table(before, started_hwm, after_upload, None)

            started = time.monotonic()
            job_id = client.submit({**spec, "training_dataset_id": dataset["dataset_id"]})["job_id"]
            state = ""
            for event in client.events(job_id, timeout_s=6 * 3600):
                state = event.get("state", state)
                if event.get("type") == "progress" and event.get("stage") != "training":
                    print(f"  {time.monotonic() - started:7.0f} s  {event.get('message', '')}", flush=True)
            run_s = time.monotonic() - started
            after_run = {name: _status_mib(pid, "VmHWM") for name, pid in pids.items()}
            job = client.job(job_id)
            print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            print(
                f"experiment: {state} in {run_s:.1f} s "
                f"(n_train {job['n_train']:,}, projected TracIn, {SCALE_EVAL} eval, {job['shards']} shards)"
            )
            for part in job["parts"]:
                print(
                    f"  part {part['kind']} {part['shard'] if part['shard'] is not None else ''}: "
                    f"{part['status']}, {part['attempts']} attempt(s)"
                )
            copies = [
                line
                for line in stack.log_text("scheduler").splitlines()
                if "sharded experiment completed" in line
            ]
            if copies:
                print(f"  {copies[-1]}")
            _memory_table(before, started_hwm, after_upload, after_run)
            if state != "completed":
                raise SystemExit(f"the experiment ended {state}: {job.get('error')}")


def _memory_table(
    before: dict[str, float],
    at_start: dict[str, float],
    after_upload: dict[str, float],
    after_run: dict[str, float] | None,
) -> None:
    print(f"{'MiB':<10} {'RSS before':>11} {'peak at start':>14} {'peak after upload':>18} {'after run':>15}")
    for name in _WATCHED:
        run = f"{after_run[name]:>15.1f}" if after_run is not None else f"{'-':>15}"
        print(
            f"{name:<10} {before[name]:>11.1f} {at_start[name]:>14.1f} {after_upload[name]:>18.1f} {run}",
            flush=True,
        )


if __name__ == "__main__":
    main()
