"""Flat tables of gpu_core's result JSON, for CSV files and data frames."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import IO, Any

EVAL_RUNS = ("base", "few_shot", "finetuned")
INFLUENCE_COLUMNS = ("eval_id", "train_id", "score")
EVAL_COLUMNS = ("run", "eval_id", "output", "exact_match", "loss")


def influence_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (eval example, training example) with its influence score; positive helps."""
    influence = result["influence"]
    return [
        {"eval_id": eval_id, "train_id": train_id, "score": score}
        for eval_id, row in zip(influence["eval_ids"], influence["scores"], strict=True)
        for train_id, score in zip(influence["train_ids"], row, strict=True)
    ]


def eval_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (evaluation run, eval example): the model's answer, exact match and loss."""
    return [
        {
            "run": run,
            "eval_id": example["id"],
            "output": example["output"],
            "exact_match": example["exact_match"],
            "loss": example["loss"],
        }
        for run in EVAL_RUNS
        for example in result["eval_results"][run]["examples"]
    ]


def write_csv(rows: Iterable[dict[str, Any]], columns: tuple[str, ...], out: IO[str]) -> None:
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
