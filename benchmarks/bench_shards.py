"""A sharded gradient index on compute-local's process model (``make bench-shards``): a benchmark,
not a test.

20,000 train x 100 eval (letter-cipher data, tiny model, 1 epoch, batch 32, max_seq_len 32) per
method (TracIn with ``projection_dim``, TrackStar). The training job runs once per method; then
for each N of ``--shards`` (1, 2, 4) the N index-shard jobs run as child processes (one torch
thread each, as compute-local runs a job), at most ``--slots`` at once (compute-local's devices:
the cores here), then the merge in this process. Printed per N: wall time of the shards + merge
(the part sharding divides; the training job is the same for every N and printed once),
speed-up against N = 1, each shard worker's CPU seconds and peak RSS, bytes moved (each shard's download of
the adapter and checkpoints and upload of its files; the merge's download of the score columns
and index manifests and upload of its files), and agreement with N = 1 (max relative error of
``scores.npy``, identical top-k). The load average is printed before and after each case.

    .venv/bin/python -m benchmarks.bench_shards [--n-train 20000] [--shards 1,2,4] [--slots 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

N_EVAL = 100


def cipher_spec(n_train: int, method: str, projection_dim: int | None) -> dict[str, Any]:
    from benchmarks.bench_scale import cipher_pairs

    pairs = cipher_pairs(n_train + N_EVAL, seed=n_train)
    influence: dict[str, Any] = {"top_k": 10}
    if projection_dim is not None:
        influence["projection_dim"] = projection_dim
    return {
        "model_id": "local/tiny-llama",
        "training_data": [{"prompt": p, "completion": c} for p, c in pairs[:n_train]],
        "eval_data": [{"prompt": p, "expected": c} for p, c in pairs[n_train:]],
        "hyperparams": {
            "epochs": 1,
            "batch_size": 32,
            "learning_rate": 0.004,
            "max_seq_len": 32,
            "max_new_tokens": 1,
        },
        "few_shot_k": 0,
        "influence_method": method,
        "influence": influence,
    }


def load_spec(path: Path) -> Any:
    from gpu_core.schemas import NO_SIZE_LIMITS, parse_spec

    return parse_spec(json.loads(path.read_text()), NO_SIZE_LIMITS)


def result_of(events: Any) -> dict[str, Any]:
    return next(event for event in events if event["type"] == "result")["result"]


def tree_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def shard_main(args: argparse.Namespace) -> None:
    """One shard job in this process; prints its result, wall time and peak RSS as JSON."""
    import torch

    from gpu_core.shard_schemas import ShardRequest
    from gpu_core.sharding import run_index_shard

    torch.set_num_threads(1)
    spec = load_spec(Path(args.spec))
    request = ShardRequest(shard=args.shard, shards=args.shards, start=args.start, stop=args.stop)
    started = time.monotonic()
    result = result_of(run_index_shard(spec, request, Path(args.parent), Path(args.out)))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "result": result,
                "wall_s": time.monotonic() - started,
                "peak_rss_mib": usage.ru_maxrss / 1024,
                "cpu_s": usage.ru_utime + usage.ru_stime,
            }
        )
    )


def run_shards(spec_path: Path, spec: Any, n: int, slots: int, training_dir: Path, root: Path) -> list[dict]:
    """The N shard jobs as child processes, ``slots`` at a time."""
    from gpu_core.shard_schemas import shard_name
    from gpu_core.sharding import shard_requests

    pending = list(shard_requests(spec, n))
    running: list[tuple[Any, subprocess.Popen[str]]] = []
    finished = []
    while pending or running:
        while pending and len(running) < slots:
            request = pending.pop(0)
            command = [
                sys.executable,
                "-m",
                "benchmarks.bench_shards",
                "shard",
                "--spec",
                str(spec_path),
                "--shard",
                str(request.shard),
                "--shards",
                str(request.shards),
                "--start",
                str(request.start),
                "--stop",
                str(request.stop),
                "--parent",
                str(training_dir),
                "--out",
                str(root / shard_name(request.shard)),
            ]
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            running.append((request, process))
        time.sleep(0.05)
        for request, process in list(running):
            if process.poll() is None:
                continue
            running.remove((request, process))
            out = process.stdout.read() if process.stdout else ""
            if process.returncode != 0:
                raise RuntimeError(f"shard {request.shard} exited {process.returncode}")
            report = json.loads(out.strip().splitlines()[-1])
            report["directory"] = root / shard_name(request.shard)
            finished.append(report)
    return sorted(finished, key=lambda report: report["result"]["start"])


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def bench_method(method: str, projection_dim: int | None, args: argparse.Namespace, work: Path) -> None:
    import numpy as np

    from gpu_core.pipeline import run_training_job
    from gpu_core.shard_schemas import SHARD_PARTS_DIR, IndexShardResult, TrainingJobResult, shard_name
    from gpu_core.sharding import merge_shards

    case = work / method
    case.mkdir(parents=True)
    spec_path = case / "spec.json"
    spec_path.write_text(json.dumps(cipher_spec(args.n_train, method, projection_dim)))
    spec = load_spec(spec_path)
    training_dir = case / "training"
    started = time.monotonic()
    training = TrainingJobResult.model_validate(result_of(run_training_job(spec, training_dir)))
    training_bytes = tree_bytes(training_dir)
    print(
        f"\n{method} (projection_dim {projection_dim or 'default'}): {args.n_train} x {N_EVAL}; "
        f"training job {time.monotonic() - started:.1f} s, its artifacts {training_bytes / 2**20:.1f} MiB"
    )
    print(
        "| N | wall s (shards + merge) | speed-up | merge s | CPU s per shard | peak RSS per worker MiB "
        "| moved MiB | max rel err | top-k |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    baseline: tuple[float, Any, Any] | None = None
    for n in args.shards:
        root = case / f"n{n}"
        load_before = load()
        started = time.monotonic()
        reports = run_shards(spec_path, spec, n, args.slots, training_dir, root)
        merge_started = time.monotonic()
        shards = [(IndexShardResult.model_validate(r["result"]), r["directory"]) for r in reports]
        merged = merge_shards(spec, training, shards, root / "merge")
        merge_s = time.monotonic() - merge_started
        wall = time.monotonic() - started
        # Bytes moved as on a remote backend: each shard downloads the training job's files and
        # uploads its own; the merge downloads the score columns and manifests, uploads its own.
        moved = len(reports) * training_bytes + sum(tree_bytes(r["directory"]) for r in reports)
        for result, directory in shards:
            moved += tree_bytes(directory / SHARD_PARTS_DIR.format(shard=shard_name(result.shard)))
        moved += tree_bytes(root / "merge")
        scores = np.load(root / "merge" / "scores.npy")
        top = {
            k: ([s.id for s in v.helpful], [s.id for s in v.harmful])
            for k, v in merged.influence.top_k.items()
        }
        if baseline is None:
            baseline = (wall, scores, top)
        base_wall, base_scores, base_top = baseline
        error = float(np.abs(scores - base_scores).max() / np.abs(base_scores).max())
        rss = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in reports)
        # CPU seconds do not move with the neighbours' load as wall time does.
        cpu = ", ".join(f"{r['cpu_s']:.1f}" for r in reports)
        print(
            f"| {n} | {wall:.1f} | {base_wall / wall:.2f}x ({wall / base_wall:.2f} of N=1) | {merge_s:.1f} | "
            f"{cpu} | {rss} | {moved / 2**20:.1f} | {error:.1e} | "
            f"{'identical' if top == base_top else 'DIFFERENT'} |"
            f"  load {load_before} -> {load()}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    shard = sub.add_parser("shard", help="one shard job (what the benchmark's children run)")
    for name in ("spec", "parent", "out"):
        shard.add_argument(f"--{name}", required=True)
    for name in ("shard", "shards", "start", "stop"):
        shard.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--shards", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="shard jobs at once")
    parser.add_argument("--methods", default="tracin,trackstar")
    parser.add_argument("--projection-dim", type=int, default=1024, help="TracIn's (TrackStar: 4,096)")
    args = parser.parse_args()
    if args.command == "shard":
        shard_main(args)
        return
    import torch

    torch.set_num_threads(1)
    print(f"cores {os.cpu_count()}, slots {args.slots}, load average {load()} (1, 5, 15 min)")
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as work:
        for method in args.methods.split(","):
            bench_method(method, args.projection_dim if method == "tracin" else None, args, Path(work))


if __name__ == "__main__":
    main()
