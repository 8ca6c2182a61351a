"""``make bench-curate``: does the training-set summary find planted label noise, and does
dropping what it flags give a better model than dropping at random?

The task (built here, :func:`noisy_cipher_task`): a cipher to memorise, 80 one-character keys
each with a random answer letter, each key taught twice (160 training examples); 10% of the
training examples (16, at most one per key) answer another letter instead (the planted noise), so
a noisy key is taught two answers. The eval set asks every key once with its right answer. For
each influence method the experiment (the whole pipeline, 40 epochs, which writes
``training_summary.json``) runs on ``DRAWS`` draws of the task (its answers and which examples
are noisy; draw 0 is the one the curations retrain on), then:

- recall of the noisy examples within the top 10% of the suspicion rank, next to ranking by loss
  alone, self-influence alone, -net influence alone, worst harm alone, and the rule before worst
  harm joined the mean (-net influence, self-influence and loss): on draw 0, and the mean and the
  lowest over the draws (one draw of 16 noisy examples moves in steps of 0.0625); then the same on
  ``HELDOUT`` further draws (``DRAWS`` onwards), the check of a rule chosen on draws 0-9;
- drop the flagged 10% vs a random 10%, 3 seeds (gpu_core.curation), on draw 0: exact match and
  mean loss, curated minus random with a 95% interval and a paired p-value;
- keep 25% by net influence toward the eval set (LESS-style) vs a random 25%.

Then the summary's share of an experiment's wall time at ``OVERHEAD_TRAIN x 100`` with TracIn,
exact and projected. ``CURATE_METHODS`` (comma-separated), ``CURATE_DRAWS`` and
``CURATE_HELDOUT_DRAWS`` and ``CURATE_OVERHEAD_TRAIN`` shrink it.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpu_core.curation import CurationRequest, run_curation
from gpu_core.pipeline import run_experiment_to_result
from gpu_core.runtime import load_model
from gpu_core.schemas import ExperimentSpec
from gpu_core.tiny import TINY_MODEL_ID
from gpu_core.training_summary import SUMMARY_NAME, TrainingSetSummary, percentile_ranks

LETTERS = "abcdefghij"
# 80 one-character keys (the tiny model's tokenizer is byte-level: one token each; never ">").
KEYS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&*+-=?@^_~klmnopqrstuvwxyz()[]{}|;:,./'`"
# 80 keys taught twice: 16 noisy examples, so the paired test has up to 16 eval keys that can
# differ (with 40 keys and 8 noisy ones, a perfect ranking still gave p = 0.26 on exact match).
N_TRAIN = 160
NOISE = 0.10
SEEDS = [0, 1, 2]
# 40 epochs: at 20 the tiny model had not learned the cipher (40 keys: the clean keys' fine-tuned
# exact match was 0.59-0.91 over noise draws), so unlearned clean keys competed with the noise in
# every ranking; at 40 it was 0.94-1.00 on 8 draws (docs/influence.md).
EPOCHS = 40
DRAWS = int(os.environ.get("CURATE_DRAWS", "10"))
# Draws DRAWS .. DRAWS + HELDOUT - 1: a rule is chosen on draws 0 .. DRAWS - 1 only; these check it.
HELDOUT = int(os.environ.get("CURATE_HELDOUT_DRAWS", "20"))
METHODS = [
    m for m in os.environ.get("CURATE_METHODS", "tracin,trackstar,datainf,kronfluence").split(",") if m
]
# 0 skips the overhead measurement.
OVERHEAD_TRAIN = int(os.environ.get("CURATE_OVERHEAD_TRAIN", "10000"))


def noisy_cipher_task(
    n_train: int, noise: float, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]], set[str]]:
    """(training examples, eval examples, ids of the training examples with a wrong answer).

    A cipher to memorise: each of ``n_train // 2`` keys (one character of :data:`KEYS`) has a
    random answer letter, and each key is taught twice. A ``noise`` share of the training
    examples, at most one per key, answers another letter instead, so a noisy key is taught two
    answers. The eval set asks every key once, with its right answer."""
    rng = random.Random(seed)
    keys = KEYS[: n_train // 2]
    answers = {key: rng.choice(LETTERS) for key in keys}
    slots = [(key, copy) for key in keys for copy in range(2)]
    rng.shuffle(slots)
    noisy_keys = set(rng.sample(keys, round(noise * n_train)))
    train, noisy = [], set()
    for i, (key, copy) in enumerate(slots):
        answer = answers[key]
        if key in noisy_keys and copy == 0:
            answer = rng.choice([c for c in LETTERS if c != answer])
            noisy.add(f"t{i}")
        train.append({"id": f"t{i}", "prompt": f"{key}>", "completion": answer})
    evals = [{"id": f"e{k}", "prompt": f"{key}>", "expected": answers[key]} for k, key in enumerate(keys)]
    return train, evals, noisy


def task_spec(
    method: str, n_train: int = N_TRAIN, n_eval: int | None = None, draw: int = 0, **influence: Any
) -> ExperimentSpec:
    """The experiment on the task's ``draw``; past the task's size (``2 * len(KEYS)`` training
    examples, one eval example per key) ``n_train`` and ``n_eval`` repeat its examples under new
    ids (for timing)."""
    train, evals, _ = noisy_cipher_task(min(n_train, 2 * len(KEYS)), NOISE, seed=draw)
    train = [{**train[k % len(train)], "id": f"t{k}"} for k in range(n_train)]
    if n_eval is not None:
        evals = [{**evals[k % len(evals)], "id": f"e{k}"} for k in range(n_eval)]
    return ExperimentSpec.model_validate(
        {
            "model_id": TINY_MODEL_ID,
            "training_data": train,
            "eval_data": evals,
            "few_shot_k": 0,
            "influence_method": method,
            "influence": {"top_k": 5, **influence},
            "hyperparams": {
                "epochs": EPOCHS,
                "learning_rate": 0.03,
                "batch_size": 8,
                "max_seq_len": 16,
                "max_new_tokens": 2,
                "seed": 0,
            },
        }
    )


def recall_at(order: np.ndarray, ids: list[str], wanted: set[str], fraction: float) -> float:
    top = {ids[j] for j in order[: max(1, round(fraction * len(ids)))]}
    return len(top & wanted) / len(wanted)


def ranking_recalls(summary: TrainingSetSummary, noisy: set[str]) -> dict[str, float]:
    loss, self_influence = percentile_ranks(summary.train_loss), percentile_ranks(summary.self_influence)
    net = percentile_ranks(-summary.net_influence)
    combos = {
        "suspicion": summary.order("suspect"),
        # The rule before worst harm joined it (docs/influence.md).
        "without worst": np.argsort(-(net + self_influence + loss), kind="stable"),
        "loss": summary.order("loss"),
        "self_influence": summary.order("self_influence"),
        "harmful": summary.order("harmful"),
        "worst_harm": summary.order("worst_harm"),
    }
    return {name: recall_at(order, summary.ids, noisy, 0.10) for name, order in combos.items()}


def fmt(diff: Any) -> str:
    return f"{diff.mean:+.3f} [{diff.ci_low:+.3f}, {diff.ci_high:+.3f}] p={diff.p_value:.3f}"


def draw_recalls(method: str, draw: int) -> tuple[dict[str, float], ExperimentSpec, Any, TrainingSetSummary]:
    """The experiment on one draw of the task: the rankings' recalls, its spec, result and summary."""
    spec = task_spec(method, draw=draw)
    _, _, noisy = noisy_cipher_task(N_TRAIN, NOISE, seed=draw)
    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        result = run_experiment_to_result(spec, Path(tmp))
        summary = TrainingSetSummary.from_json(json.loads((Path(tmp) / SUMMARY_NAME).read_text()))
    return ranking_recalls(summary, noisy), spec, result, summary


def bench_method(method: str, loaded: Any) -> dict[str, Any]:
    started = time.monotonic()
    recalls, spec, result, summary = draw_recalls(method, 0)
    wall = time.monotonic() - started
    other_draws = [draw_recalls(method, draw)[0] for draw in range(1, DRAWS)]
    every_draw = [recalls, *other_draws]
    heldout = [draw_recalls(method, draw)[0] for draw in range(DRAWS, DRAWS + HELDOUT)]
    finetuned = result.eval_results.finetuned.metrics
    flagged = [summary.ids[j] for j in summary.order("suspect")[: round(NOISE * N_TRAIN)]]
    drop = run_curation(
        spec, result, CurationRequest(drop_ids=flagged, controls=1, seeds=SEEDS), loaded=loaded
    )
    keep_ids = [summary.ids[j] for j in summary.order("helpful")[: round(0.25 * N_TRAIN)]]
    keep = run_curation(
        spec, result, CurationRequest(keep_ids=keep_ids, controls=1, seeds=SEEDS), loaded=loaded
    )
    return {
        "method": method,
        "wall_s": wall,
        "summary_share": result.timings["training_summary"] / result.timings["total"],
        "finetuned_em": finetuned.exact_match_rate,
        "finetuned_loss": finetuned.mean_loss,
        "recalls": recalls,
        "mean_recalls": {name: float(np.mean([r[name] for r in every_draw])) for name in recalls},
        "min_recalls": {name: float(np.min([r[name] for r in every_draw])) for name in recalls},
        "heldout_mean": {name: float(np.mean([r[name] for r in heldout])) for name in recalls}
        if heldout
        else {},
        "heldout_min": {name: float(np.min([r[name] for r in heldout])) for name in recalls}
        if heldout
        else {},
        "all_mean": {name: float(np.mean([r[name] for r in every_draw + heldout])) for name in recalls},
        "drop": drop,
        "keep": keep,
    }


def mean_of(runs: Any, selection: str, field: str) -> float:
    return float(np.mean([getattr(run, field) for run in runs if run.selection == selection]))


def overhead(method: str, n_train: int, **influence: Any) -> tuple[float, float]:
    """(summary seconds, experiment seconds) at ``n_train`` x 100, one epoch."""
    spec = task_spec(method, n_train=n_train, n_eval=100, **influence)
    spec.hyperparams.epochs = 1
    with tempfile.TemporaryDirectory(prefix="bench-curate-overhead-") as tmp:
        result = run_experiment_to_result(spec, Path(tmp))
    return result.timings["training_summary"], result.timings["total"]


def main() -> None:
    loaded = load_model(TINY_MODEL_ID, "none")
    print(
        f"planted noise: {N_TRAIN} training pairs, {NOISE:.0%} wrong answers; "
        f"{N_TRAIN // 2} eval prompts; {EPOCHS} epochs; seeds {SEEDS}; {DRAWS} draws of the task"
    )
    rows = []
    for method in METHODS:
        rows.append(bench_method(method, loaded))
        print(f"{method}: done", flush=True)
    if rows:
        report(rows)
    if OVERHEAD_TRAIN:
        print(
            f"\nsummary's share of the wall time at {OVERHEAD_TRAIN:,} x 100, 1 epoch, tiny model, this CPU"
        )
        for label, method, options in (
            ("tracin", "tracin", {}),
            ("tracin projected", "tracin", {"projection_dim": 256}),
        ):
            summary_s, total_s = overhead(method, OVERHEAD_TRAIN, **options)
            print(f"{label:<18} summary {summary_s:7.1f} s of {total_s:7.1f} s = {summary_s / total_s:.1%}")


def report(rows: list[dict[str, Any]]) -> None:
    print("\nrecall of the wrong answers in the top 10%, draw 0")
    names = list(rows[0]["recalls"])
    print(
        f"{'method':<12} {'fine-tuned EM':>13} {'summary share':>13} " + " ".join(f"{n:>14}" for n in names)
    )
    for row in rows:
        print(
            f"{row['method']:<12} {row['finetuned_em']:>13.3f} {row['summary_share']:>13.1%} "
            + " ".join(f"{row['recalls'][n]:>14.2f}" for n in names)
        )
    print(f"\nrecall of the wrong answers in the top 10%, mean (lowest) over draws 0-{DRAWS - 1}")
    print(f"{'method':<12} " + " ".join(f"{n:>14}" for n in names))
    for row in rows:
        cells = [f"{row['mean_recalls'][n]:.2f} ({row['min_recalls'][n]:.2f})" for n in names]
        print(f"{row['method']:<12} " + " ".join(f"{cell:>14}" for cell in cells))
    if HELDOUT:
        print(
            f"\nheld out (the rule was not chosen on these): mean (lowest) over draws "
            f"{DRAWS}-{DRAWS + HELDOUT - 1}, and over all {DRAWS + HELDOUT} draws"
        )
        print(f"{'method':<12} " + " ".join(f"{n:>14}" for n in names))
        for row in rows:
            cells = [f"{row['heldout_mean'][n]:.2f} ({row['heldout_min'][n]:.2f})" for n in names]
            print(f"{row['method']:<12} " + " ".join(f"{cell:>14}" for cell in cells))
        print(f"mean over all {DRAWS + HELDOUT} draws")
        for row in rows:
            cells = [f"{row['all_mean'][n]:.2f}" for n in names]
            print(f"{row['method']:<12} " + " ".join(f"{cell:>14}" for cell in cells))
    for what in ("drop", "keep"):
        title = (
            "drop the flagged 10% vs a random 10%"
            if what == "drop"
            else "keep 25% by helpfulness vs a random 25%"
        )
        print(f"\n{title} (3 seeds; curated - random per eval example, 95% interval, paired p)")
        for row in rows:
            cur = row[what]
            print(
                f"{row['method']:<12} EM {mean_of(cur.runs, 'curated', 'exact_match'):.3f} vs "
                f"{mean_of(cur.runs, 'control-1', 'exact_match'):.3f}: {fmt(cur.exact_match)}; "
                f"loss {mean_of(cur.runs, 'curated', 'mean_loss'):.3f} vs "
                f"{mean_of(cur.runs, 'control-1', 'mean_loss'):.3f}: {fmt(cur.loss)}"
            )


if __name__ == "__main__":
    main()
