"""Cancel latency per stage on the tiny model: how long the work keeps running after a stop.

    python -m benchmarks.bench_cancel            # make bench-cancel
    python -m benchmarks.bench_cancel --n-train 128 --n-eval 32 --batch-size 8

For each stage (and each influence method) an experiment starts with a ``should_stop`` check;
when the first event of that stage arrives the stop is requested, and the latency is the time
until ``run_experiment`` has stopped the work, freed the model and raised
``ExperimentCancelled``. Target: under 5 s in every stage.
"""

from __future__ import annotations

import argparse
import random
import string
import threading
import time
from collections.abc import Sequence

from gpu_core.pipeline import ExperimentCancelled, run_experiment
from gpu_core.schemas import ExperimentSpec

TARGET_S = 5.0
CASES: tuple[tuple[str, str], ...] = (
    ("loading_model", "tracin"),
    ("eval_base", "tracin"),
    ("eval_few_shot", "tracin"),
    ("training", "tracin"),
    ("eval_finetuned", "tracin"),
    ("influence", "tracin"),
    ("influence", "datainf"),
    ("influence", "kronfluence"),
)


def bench_spec(n_train: int, n_eval: int, batch_size: int, method: str) -> ExperimentSpec:
    """A copy task (``abc>`` -> ``abc``) big enough that no stage ends before the stop."""
    rng = random.Random(0)

    def word() -> str:
        return "".join(rng.choice(string.ascii_lowercase[:10]) for _ in range(6))

    train = [{"prompt": f"{w}>", "completion": w} for w in (word() for _ in range(n_train))]
    evals = [{"prompt": f"{w}>", "expected": w} for w in (word() for _ in range(n_eval))]
    return ExperimentSpec.model_validate(
        {
            "model_id": "local/tiny-llama",
            "training_data": train,
            "eval_data": evals,
            "influence_method": method,
            "few_shot_k": 2,
            "hyperparams": {"epochs": 3, "batch_size": batch_size, "max_seq_len": 32, "max_new_tokens": 6},
        }
    )


def cancel_latency(spec: ExperimentSpec, stage: str) -> tuple[float, str]:
    """Seconds from the stop request (at the first event of ``stage``) to the work's end."""
    stop = threading.Event()
    requested_at = 0.0
    seen = ""
    try:
        for event in run_experiment(spec, should_stop=stop.is_set):
            if event.get("stage") == stage and not stop.is_set():
                seen = event.get("message") or ""
                requested_at = time.monotonic()
                stop.set()
    except ExperimentCancelled:
        return time.monotonic() - requested_at, seen
    raise RuntimeError(f"the experiment finished before reaching {stage}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cancel")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    print(
        f"cancel latency, tiny model, {args.n_train} train x {args.n_eval} eval, "
        f"batch {args.batch_size} (target < {TARGET_S:.0f} s)"
    )
    print(f"{'stage':<16} {'method':<12} {'latency_s':>9}  stopped at")
    worst = 0.0
    for stage, method in CASES:
        latency, at = cancel_latency(bench_spec(args.n_train, args.n_eval, args.batch_size, method), stage)
        worst = max(worst, latency)
        print(f"{stage:<16} {method:<12} {latency:>9.3f}  {at}", flush=True)
    print(f"worst: {worst:.3f} s ({'within' if worst < TARGET_S else 'OVER'} the {TARGET_S:.0f} s target)")
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
