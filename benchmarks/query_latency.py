"""Follow-up query latency in gpu_core terms (``make bench-query``): cold (a fresh process: Python
and torch imports, model load, adapter, index, one answer) and warm (the same QuerySession's
next answers) for parents with 1,000 and 10,000 training examples on the tiny model.

Per size and method it runs the real pipeline once (one epoch, four eval examples, artifacts
kept: adapter/, checkpoints/, gradient_index/ where the method has one), then starts a child
process that opens a QuerySession on that directory and answers one query (a training prompt,
no ``expected``: the greedy answer is the target) ``--warm`` + 1 times. Cold = from starting the
child to its first answer; warm = the median of the later answers. Issue 12's targets on the
embedded default: cold under 10 s with a 10,000-example index, warm under 3 s. ``--parents DIR``
keeps the built parents there and reuses them on the next run (building is most of the time).
The exact methods (no index: ``--cases tracin-exact,datainf,kronfluence``) compute their
training side on the first answer and keep it in the session (up to 1 GiB of gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (label, influence method, projection_dim): the index methods, then the recompute paths.
CASES: dict[str, tuple[str, int | None]] = {
    "trackstar": ("trackstar", None),
    "tracin-projected": ("tracin", 4096),
    "tracin-exact": ("tracin", None),
    "datainf": ("datainf", None),
    "kronfluence": ("kronfluence", None),
}


def build_parent(case: str, n_train: int, directory: Path) -> tuple[dict[str, Any], dict[str, Any], float]:
    """The parent experiment's spec, result and build seconds, its artifacts in ``directory``."""
    from benchmarks.planted import planted_duplicate_spec
    from gpu_core.pipeline import run_experiment
    from gpu_core.schemas import parse_spec

    method, projection_dim = CASES[case]
    raw = planted_duplicate_spec(method, n_train, 4, epochs=1)
    raw["influence"]["projection_dim"] = projection_dim
    started = time.monotonic()
    for event in run_experiment(parse_spec(raw), directory):
        if event["type"] == "result":
            return raw, event["result"], time.monotonic() - started
    raise RuntimeError("the experiment ended without a result")


def child(parent_dir: Path, warm: int, started: float) -> None:
    """Runs in the fresh process: one session, ``warm + 1`` answers, figures as JSON."""
    import torch

    from gpu_core.query import QuerySession
    from gpu_core.schemas import ExperimentResult, QueryRequest, parse_spec

    imported = time.time() - started
    raw = json.loads((parent_dir / "spec.json").read_text())
    result = ExperimentResult.model_validate_json((parent_dir / "result.json").read_text())
    parsed = time.time() - started - imported
    session = QuerySession(parse_spec(raw), result, parent_dir / "artifacts", device=torch.device("cpu"))
    seconds, answers = [], []
    for attempt in range(warm + 1):
        copied = raw["training_data"][(attempt * 7) % len(raw["training_data"])]
        request = QueryRequest.model_validate({"queries": [{"prompt": copied["prompt"]}], "top_k": 10})
        began = time.time()
        for event in session.answer(request):
            if event["type"] == "result":
                answers.append(event["result"])
        seconds.append(time.time() - (started if attempt == 0 else began))
    print(  # read by the parent process
        json.dumps(
            {
                "imports_s": imported,
                "parse_s": parsed,
                "cold_s": seconds[0],
                "warm_s": seconds[1:],
                "source": answers[0]["source"],
                "first_timings": answers[0]["timings"],
                "resident_mib": session.resident_bytes() / 2**20,
            }
        )
    )
    session.close()


def measure(parent_dir: Path, warm: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    command = [
        sys.executable,
        "-m",
        "benchmarks.query_latency",
        "--child",
        str(parent_dir),
        "--warm",
        str(warm),
    ]
    command += ["--started", repr(time.time())]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the query child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--cases", default="trackstar,tracin-projected")
    parser.add_argument("--parents", type=Path, help="keep and reuse the built parents here")
    parser.add_argument("--warm", type=int, default=5, help="warm answers after the cold one")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.warm, args.started)
        return 0
    import torch

    print(  # the benchmark's report
        f"query latency on local/tiny-llama, CPU, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; one query per answer, "
        f"greedy target, top 10; warm = median of {args.warm}"
    )
    for n_train in (int(size) for size in args.sizes.split(",")):
        for case in args.cases.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
                parent_dir = (args.parents or Path(tmp)) / f"{case}-{n_train}"
                built = "reused"
                if not (parent_dir / "result.json").is_file():
                    raw, result, build_s = build_parent(case, n_train, parent_dir / "artifacts")
                    (parent_dir / "spec.json").write_text(json.dumps(raw))
                    (parent_dir / "result.json").write_text(json.dumps(result))
                    built = f"built in {build_s:.0f} s"
                figures = measure(parent_dir, args.warm)
            first = figures["first_timings"]
            print(
                f"{n_train:>6} train  {case:16s} cold {figures['cold_s']:6.2f} s "
                f"(imports {figures['imports_s']:.2f}, parent JSON {figures['parse_s']:.2f}, "
                f"first answer {first['total']:.2f}: model {first['loading_model']:.2f}, "
                f"adapter {first['adapter']:.2f}, index {first.get('gradient_index', 0):.2f}, "
                f"scoring {first['scoring']:.2f})  warm {statistics.median(figures['warm_s']):6.3f} s "
                f"(max {max(figures['warm_s']):.3f})  from {figures['source']}; "
                f"session holds {figures['resident_mib']:.1f} MiB; parent {built}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
