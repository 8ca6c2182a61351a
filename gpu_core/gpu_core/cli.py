"""``python -m gpu_core run SPEC.json --out RESULT.json [--artifacts DIR] [--train DATA] [--eval DATA]`` and
``python -m gpu_core counterfactual SPEC.json RESULT.json --out CHECK.json [options]``.

``run`` shows a progress bar on stderr, writes the result JSON, and with ``--artifacts`` saves
the final LoRA adapter and TracIn's per-epoch checkpoints. ``--train`` / ``--eval`` replace the
spec's ``training_data`` / ``eval_data`` with a data file (JSONL, CSV, Parquet) or a saved Hugging
Face dataset directory, in any format gpu_core.formats reads. ``counterfactual`` retrains the
experiment without its top-k examples (and random controls, and optionally LDS subsets) and
writes the check's result. Exit status: 0 done, 2 bad spec, data, result or arguments, 1 it
failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from gpu_core.formats import read_examples
from gpu_core.schemas import (
    DEFAULT_LIMITS,
    NO_SIZE_LIMITS,
    CounterfactualRequest,
    ExperimentResult,
    ExperimentSpec,
    SpecError,
    SpecLimits,
    parse_spec,
)

EXIT_BAD_SPEC = 2
EXIT_FAILED = 1
BAR_STEPS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gpu_core", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one experiment: fine-tune, evaluate, score influence")
    run.add_argument("spec", type=Path, help="experiment spec JSON")
    run.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    run.add_argument("--artifacts", type=Path, default=None, help="directory for the adapter and checkpoints")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    for flag, what in (("--train", "training"), ("--eval", "eval")):
        run.add_argument(
            flag,
            type=Path,
            default=None,
            help=f"{what} examples: a JSONL/CSV/Parquet file or a save_to_disk dataset directory",
        )
    run.add_argument(
        "--no-size-limits",
        action="store_true",
        help="accept more examples than the gateway's default limits (a local run at scale)",
    )

    check = commands.add_parser(
        "counterfactual", help="retrain without the top-k examples; compare with random removals"
    )
    check.add_argument("spec", type=Path, help="the experiment's spec JSON")
    check.add_argument("result", type=Path, help="the experiment's result JSON")
    check.add_argument("--out", type=Path, required=True, help="where to write the check's result JSON")
    check.add_argument("--scores", type=Path, default=None, help="its scores.npy (LDS; k past top-k)")
    check.add_argument("--eval-ids", default=None, help="comma-separated eval ids (default: all)")
    check.add_argument("--k", type=int, default=10, help="training examples to remove per eval example")
    check.add_argument("--remove", choices=["helpful", "harmful"], default="helpful")
    check.add_argument("--controls", type=int, default=2, help="retrainings without k random examples")
    check.add_argument("--lds-subsets", type=int, default=0, help="subset retrainings for LDS (0: none)")
    check.add_argument("--lds-fraction", type=float, default=0.5, help="training share per LDS subset")
    check.add_argument("--seed", type=int, default=0, help="seed of the random controls and subsets")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def read_spec(
    path: Path, train: Path | None = None, evals: Path | None = None, limits: SpecLimits = DEFAULT_LIMITS
) -> ExperimentSpec:
    """The validated spec, its data replaced by ``train`` / ``evals`` when given; raises
    ValueError with a message naming the file, line or field and rule."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read spec {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"spec {path} is not valid JSON: {exc}") from exc
    for data_path, kind, field in ((train, "train", "training_data"), (evals, "eval", "eval_data")):
        if data_path is None:
            continue
        if not data_path.exists():
            raise ValueError(f"cannot read {data_path}: no such file or directory")
        data_format, raw[field] = read_examples(kind, data_path)  # type: ignore[arg-type]
        formats = raw.get("data_format") if isinstance(raw.get("data_format"), dict) else {}
        raw["data_format"] = {**formats, "training" if kind == "train" else "eval": data_format}
    try:
        return parse_spec(raw, limits)
    except SpecError as exc:
        problems = "\n".join(f"  {problem}" for problem in exc.problems)
        raise ValueError(f"invalid spec {path}:\n{problems}") from exc


def run_command(args: argparse.Namespace) -> int:
    try:
        limits = NO_SIZE_LIMITS if args.no_size_limits else DEFAULT_LIMITS
        spec = read_spec(args.spec, args.train, args.eval, limits)
    except ValueError as exc:
        print(exc, file=sys.stderr)  # the CLI's error output
        return EXIT_BAD_SPEC

    from transformers.utils import logging as transformers_logging

    from gpu_core.runtime import ModelLoadError

    transformers_logging.disable_progress_bar()
    try:
        result = _run_with_bar(spec, args)
    except ModelLoadError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILED
    if result is None:
        print("the experiment ended without a result", file=sys.stderr)
        return EXIT_FAILED
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


def _run_with_bar(spec: ExperimentSpec, args: argparse.Namespace) -> dict | None:
    from tqdm import tqdm

    from gpu_core.pipeline import run_experiment

    result = None
    bar_format = "{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}"
    with tqdm(total=BAR_STEPS, file=sys.stderr, disable=args.quiet, bar_format=bar_format) as bar:
        for event in run_experiment(spec, args.artifacts):
            if event["type"] == "result":
                result = event["result"]
                continue
            bar.set_description(event["stage"])
            bar.set_postfix_str(_postfix(event), refresh=False)
            bar.update(round(event["progress"] * BAR_STEPS) - bar.n)
    return result


def _postfix(event: dict) -> str:
    if event.get("loss") is not None:
        return f"epoch {event['epoch']}/{event['total_epochs']} loss {event['loss']:.4f}"
    return event.get("message", "")


def counterfactual_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        spec = read_spec(args.spec)
        result = ExperimentResult.model_validate_json(args.result.read_text())
        request = CounterfactualRequest(
            eval_ids=args.eval_ids.split(",") if args.eval_ids else None,
            k=args.k,
            remove=args.remove,
            controls=args.controls,
            lds_subsets=args.lds_subsets,
            lds_fraction=args.lds_fraction,
            seed=args.seed,
        )
    except OSError as exc:
        print(f"cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except (ValueError, ValidationError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_SPEC

    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    from gpu_core.counterfactual import CounterfactualError, load_scores, run_counterfactual
    from gpu_core.runtime import ModelLoadError

    transformers_logging.disable_progress_bar()
    bar_format = "{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
    with tqdm(total=BAR_STEPS, file=sys.stderr, disable=args.quiet, bar_format=bar_format) as bar:

        def report(fraction: float, message: str) -> None:
            bar.set_description(message)
            bar.update(round(fraction * BAR_STEPS) - bar.n)

        try:
            scores = load_scores(args.scores) if args.scores is not None else None
            check = run_counterfactual(spec, result, request, scores, report)
        except (CounterfactualError, OSError) as exc:
            print(exc, file=sys.stderr)
            return EXIT_BAD_SPEC
        except ModelLoadError as exc:
            print(exc, file=sys.stderr)
            return EXIT_FAILED
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(check.model_dump_json(indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "counterfactual":
        return counterfactual_command(args)
    return run_command(args)
