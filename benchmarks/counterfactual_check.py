"""Counterfactual check of every influence method on a planted-duplicate set (``make
bench-counterfactual``): each eval example copies one training example; retrain without each
duplicate's top-1 helpful example (the union) and without as many random examples, and, with
``--lds-subsets``, compute LDS on random half-subsets. Prints one line per method."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from benchmarks.planted import duplicate_of, planted_duplicate_spec
from gpu_core.counterfactual import run_counterfactual
from gpu_core.pipeline import run_experiment_to_result
from gpu_core.schemas import CounterfactualRequest, parse_spec


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="tracin,datainf,kronfluence")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--controls", type=int, default=3)
    parser.add_argument("--lds-subsets", type=int, default=8)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args(argv)
    print(  # the benchmark's report
        f"planted duplicates {args.n_train} train x {args.n_eval} eval, {args.epochs} epochs, k=1, "
        f"{args.controls} controls, LDS on {args.lds_subsets} half-subsets; seeds {args.seeds}"
    )
    for method in args.methods.split(","):
        rates, top1, lds, changes, control_changes, seconds = [], [], [], [], [], 0.0
        for seed in (int(s) for s in args.seeds.split(",")):
            spec = parse_spec(planted_duplicate_spec(method, args.n_train, args.n_eval, args.epochs, seed))
            started = time.monotonic()
            result = run_experiment_to_result(spec)
            duplicates = [f"t{duplicate_of(i, args.n_train, args.n_eval)}" for i in range(args.n_eval)]
            top1.append(
                np.mean(
                    [
                        bool(result.influence.top_k[f"e{i}"].helpful)
                        and result.influence.top_k[f"e{i}"].helpful[0].id == duplicate
                        for i, duplicate in enumerate(duplicates)
                    ]
                )
            )
            request = CounterfactualRequest(
                k=1, controls=args.controls, lds_subsets=args.lds_subsets, seed=seed
            )
            check = run_counterfactual(spec, result, request)
            seconds += time.monotonic() - started
            rates.append(check.beats_controls_rate or 0.0)
            changes += [o.top_k_loss_change for o in check.examples]
            control_changes += [c for o in check.examples for c in o.random_loss_changes]
            if check.lds is not None:
                lds.append(check.lds.mean)
        print(
            f"{method:12s} top-1 = duplicate {np.mean(top1):.3f}  beats controls {np.mean(rates):.3f}  "
            f"loss change top-1 removed {np.mean(changes):+.3f} vs random {np.mean(control_changes):+.3f}  "
            f"LDS {np.mean(lds) if lds else float('nan'):.3f}  ({seconds:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
