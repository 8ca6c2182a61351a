"""``influence``: the command line of the Influence Dashboard API.

    influence login                      # local sign-in; the token is kept per API URL
    influence submit examples/sample.json --follow
    influence results JOB --format csv -o scores.csv
    influence ask JOB "a new prompt" --span 0 5   # which training examples drove the answer
    influence merge JOB --download ./merged     # the adapter merged into the base, plain weights

``--api`` or $INFLUENCE_API picks the gateway (default: the local stack on 127.0.0.1:8080).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

from influence_client import models
from influence_client.client import TOKEN_ENV, Client, InfluenceError, default_api, load_spec
from influence_client.results import EVAL_COLUMNS, INFLUENCE_COLUMNS, eval_rows, influence_rows, write_csv

BAR_WIDTH = 24
# Without a terminal (a log, CI) a line is printed at each stage and every this much progress.
LOG_STEP = 0.05


def credentials_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "influence" / "credentials.json"


def _stored_tokens() -> dict[str, str]:
    path = credentials_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def store_token(api: str, token: str) -> Path:
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = {**_stored_tokens(), api: token}
    # Created private before the token is written into it.
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(json.dumps(tokens, indent=1))
    return path


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """One line per update: stage, overall progress, epoch, loss and ETA. On a terminal the line
    is redrawn in place; elsewhere a line is written at each stage and every 5 %."""

    def __init__(self, out: IO[str], interactive: bool) -> None:
        self.out = out
        self.interactive = interactive
        self.started = time.monotonic()
        self.last_stage: str | None = None
        self.last_logged = -1.0
        self.width = 0

    def line(self, event: models.JobEvent) -> str:
        extra = event.model_extra or {}
        progress = event.progress or 0.0
        filled = round(progress * BAR_WIDTH)
        parts = [
            f"{event.stage or event.type:<14}",
            f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}]",
            f"{progress * 100:3.0f}%",
        ]
        if extra.get("epoch") is not None and extra.get("total_epochs"):
            parts.append(f"epoch {extra['epoch']}/{extra['total_epochs']}")
        if extra.get("loss") is not None:
            parts.append(f"loss {extra['loss']:.4f}")
        eta = self._eta(progress)
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        return "  ".join(parts)

    def _eta(self, progress: float) -> float | None:
        """Remaining time of the whole job at the rate seen so far."""
        if progress <= 0.01 or progress >= 1:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / progress * (1 - progress)

    def update(self, event: models.JobEvent) -> None:
        if event.type != "progress":
            return
        text = self.line(event)
        if self.interactive:
            self.out.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            progress = event.progress or 0.0
            if event.stage == self.last_stage and progress - self.last_logged < LOG_STEP:
                return
            self.out.write(text + "\n")
            self.last_logged = progress
        self.last_stage = event.stage
        self.out.flush()

    def finish(self, job: models.Job) -> None:
        if self.interactive and self.width:
            self.out.write("\n")
        took = _duration(time.monotonic() - self.started)
        error = f": {job.error}" if job.error else ""
        self.out.write(f"job {job.job_id} {job.status} after {took}{error}\n")
        self.out.flush()


def _print_json(value: Any) -> None:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    print(json.dumps(value, indent=2))


def _client(args: argparse.Namespace) -> Client:
    token = os.environ.get(TOKEN_ENV) or _stored_tokens().get(args.api)
    return Client(args.api, token=token)


def cmd_login(args: argparse.Namespace) -> int:
    with Client(args.api, token="") as client:
        if args.token:
            client.token = args.token
            client.jobs(limit=1)  # checks the token before keeping it
            token = args.token
        else:
            token = client.sign_in(args.username or getpass.getuser()).access_token
    path = store_token(args.api, token)
    print(f"signed in to {args.api}; token kept in {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        spec = load_spec(args.spec)
        # A data file is always stored first (POST /api/datasets) and named by id: any size runs
        # the same way, and a file sent before is not sent again.
        for path, kind, field in ((args.train, "train", "training"), (args.eval, "eval", "eval")):
            if path is None:
                continue
            dataset = client.upload_dataset(path, kind)
            spec.pop(f"{field}_data", None)
            spec[f"{field}_dataset_id"] = dataset.dataset_id
            print(
                f"{path.name}: dataset {dataset.dataset_id}, {dataset.count:,} examples "
                f"({dataset.format_label}){' (already stored)' if dataset.existing else ''}",
                flush=True,
            )
        submitted = client.submit(spec, idempotency_key=args.idempotency_key, max_cost_usd=args.max_cost_usd)
        print(
            f"submitted job {submitted.job_id} ({submitted.status}; estimated "
            f"{_duration(submitted.estimated_time_s)}, ${submitted.estimated_cost_usd:.4f})",
            flush=True,
        )
        if not args.follow:
            return 0
        bar = ProgressBar(sys.stderr, sys.stderr.isatty())
        job = client.wait(submitted.job_id, on_event=bar.update)
        bar.finish(job)
        return 0 if job.status == "completed" else 1


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job)
    if args.json:
        _print_json(job)
        return 0
    metrics = job.metrics
    detail = [f"{job.progress * 100:.0f}%"]
    if job.stage:
        detail.append(f"stage {job.stage}")
    if metrics.get("epoch") is not None:
        detail.append(f"epoch {metrics['epoch']}/{metrics.get('total_epochs', '?')}")
    if metrics.get("loss") is not None:
        detail.append(f"loss {metrics['loss']:.4f}")
    print(f"{job.job_id}  {job.status}  " + "  ".join(detail))
    if job.error:
        print(f"error: {job.error}")
    print(_cost_line(job))
    return 0


def _cost_line(job: models.Job) -> str:
    """The estimate, and once the job has ended what it really cost, on one line."""
    gpu = f" on {job.estimated_gpu}" if job.estimated_gpu else ""
    line = f"estimate: {_duration(job.estimated_time_s)}{gpu}, ${job.estimated_cost_usd:.4f}"
    actual = job.actual
    if actual is not None:
        line += (
            f"  actual: {actual.gpu_seconds:.1f} GPU-s on {actual.gpu} at ${actual.usd_per_second:.6f}/s"
            f" = ${actual.cost_usd:.4f} ({actual.source})"
        )
    return line


def cmd_results(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.results(args.job)
    out: IO[str] = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        if args.format == "json":
            out.write(json.dumps(result, indent=2) + "\n")
        elif args.table == "evals":
            write_csv(eval_rows(result), EVAL_COLUMNS, out)
        else:
            write_csv(influence_rows(result), INFLUENCE_COLUMNS, out)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    with _client(args) as client:
        artifacts = client.artifacts(args.job)
        for artifact in artifacts:
            print(f"{artifact.bytes:>12}  {artifact.sha256[:12]}  {artifact.media_type:<28} {artifact.name}")
        if args.download:
            for artifact in artifacts:
                path = client.download_artifact(args.job, artifact, args.download)
                print(f"downloaded {path}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job)
    print(f"{job.job_id}  {job.status}")
    return 0


def _outcome(job: models.Job) -> str:
    """Fine-tuned exact match and loss against the base model's, once the experiment is done."""
    base, tuned = job.outcome.get("base"), job.outcome.get("finetuned")
    if not (base and tuned):
        return "-"
    return (
        f"EM {tuned['exact_match_rate'] * 100:.0f}% (base {base['exact_match_rate'] * 100:.0f}%) "
        f"loss {tuned['mean_loss']:.3f} (base {base['mean_loss']:.3f})"
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.jobs(
            limit=args.limit, tag=args.tag, model=args.model, method=args.method, status=args.status
        )
    if not jobs:
        filtered = any((args.tag, args.model, args.method, args.status))
        print("no job matches" if filtered else "no jobs yet: influence submit SPEC")
    for job in jobs:
        took = _duration(job.run_time_s) if job.run_time_s is not None else "-"
        tags = ",".join(job.tags) or "-"
        print(
            f"{job.job_id:<36} {(job.name or '-')[:24]:<24} {tags[:20]:<20} {job.status:<10} "
            f"{job.model_id:<18} {job.influence_method:<11} {took:>8}  {_outcome(job)}"
        )
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    labels: dict[str, Any] = {}
    if args.name is not None:
        labels["name"] = args.name or None
    if args.tags is not None:
        labels["tags"] = [tag for tag in args.tags.split(",") if tag]
    if args.note is not None:
        labels["note"] = args.note or None
    if not labels:
        raise ValueError("give --name, --tags or --note")
    with _client(args) as client:
        job = client.update_labels(args.job, **labels)
    print(f"{job.job_id}  {job.name or '-'}  tags: {','.join(job.tags) or '-'}")
    return 0


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def cmd_compare(args: argparse.Namespace) -> int:
    with _client(args) as client:
        comparison = client.compare(*args.jobs)
    if args.json:
        _print_json(comparison)
        return 0
    names = [run.name or run.job_id[:8] for run in comparison.runs]
    width = max(12, *(len(name) for name in names))
    header = "".join(f"{name[:width]:>{width + 2}}" for name in names)
    print(f"{'config (only what differs)':<34}{header}")
    if not comparison.config_diff:
        print("  (the specs are the same)")
    for field, values in comparison.config_diff.items():
        print(f"  {field[:32]:<32}" + "".join(f"{_figure(v)[:width]:>{width + 2}}" for v in values))
    print(f"{'metrics':<34}{header}")
    for evaluation, per_run in comparison.metrics.items():
        for metric in ("exact_match_rate", "mean_loss"):
            cells = [_figure(m[metric]) if m else "-" for m in per_run]
            print(f"  {evaluation + ' ' + metric:<32}" + "".join(f"{c:>{width + 2}}" for c in cells))
    agreement = comparison.influence_agreement
    if not agreement["available"]:
        print(f"influence agreement: not available ({agreement['reason']})")
    for pair in agreement["pairs"]:
        a, b = (names[comparison.ids.index(run)] for run in pair["runs"])
        print(
            f"influence agreement {a} vs {b}: top-k overlap {_figure(pair['mean_top_k_overlap'])}, "
            f"net influence Spearman {_figure(pair['net_influence_spearman'])}"
        )
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.training_examples(args.job, sort=args.sort, limit=args.limit, offset=args.offset)
    if args.json:
        print(page.model_dump_json(indent=2))
        return 0
    print(f"{page.total} training examples, by {args.sort}")
    print(
        f"{'rank':>5} {'id':<16} {'net influence':>14} {'self-influence':>14} {'loss':>8} "
        f"{'worst harm':>10}  text"
    )
    for row in page.examples:
        text = row.text.replace("\n", " -> ")[:60]
        worst = "-" if row.worst_harm is None else f"{row.worst_harm:+.2f}"
        print(
            f"{row.suspect_rank:>5} {row.id:<16} {row.net_influence:>+14.4e} {row.self_influence:>14.4e} "
            f"{row.train_loss:>8.4f} {worst:>10}  {text}"
        )
    return 0


def print_answer(answer: models.QueryAnswer) -> None:
    span = f" [{answer.span[0]}:{answer.span[1]}]" if answer.span else ""
    print(f"prompt: {answer.prompt}\nanswer: {answer.output}")
    if answer.target != answer.output:
        print(f"attributed: {answer.target}")
    print(f"loss{span} over {answer.span_tokens} tokens: {answer.loss:.4f}")
    for title, examples in (("helpful", answer.helpful), ("harmful", answer.harmful)):
        print(f"{title}:")
        for example in examples:
            text = f"  {example.text.prompt!r} -> {example.text.answer!r}" if example.text else ""
            print(f"  {example.score:+.4e}  {example.id}{text}")


def cmd_ask(args: argparse.Namespace) -> int:
    item: dict[str, Any] = {"prompt": args.prompt}
    if args.expected is not None:
        item["expected"] = args.expected
    if args.span is not None:
        item["span"] = args.span
    with _client(args) as client:
        submitted = client.submit_query(
            args.job, {"queries": [item], "top_k": args.top_k}, idempotency_key=args.idempotency_key
        )
        bar = ProgressBar(sys.stderr, sys.stderr.isatty())
        job = client.wait(submitted.query_job_id, on_event=bar.update)
        bar.finish(job)
        query = client.query(args.job, submitted.query_job_id)
    if query.result is None:
        return 1
    if args.json:
        _print_json(query)
        return 0
    for answer in query.result.results:
        print_answer(answer)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    request = {"shard_size_mb": args.shard_size_mb} if args.shard_size_mb is not None else {}
    with _client(args) as client:
        submitted = client.submit_merge(args.job, request, idempotency_key=args.idempotency_key)
        bar = ProgressBar(sys.stderr, sys.stderr.isatty())
        job = client.wait(submitted.merge_job_id, on_event=bar.update)
        bar.finish(job)
        merge = client.merge(args.job, submitted.merge_job_id)
        if merge.result is None:
            return 1
        if args.json:
            _print_json(merge)
        else:
            print_merge(merge)
        if args.download:
            for artifact in client.artifacts(merge.merge_job_id):
                path = client.download_artifact(merge.merge_job_id, artifact, args.download)
                print(f"downloaded {path}")
    return 0 if merge.result.check.passed is not False else 2


def print_merge(merge: models.MergeJob) -> None:
    result = merge.result
    assert result is not None
    print(f"merge {merge.merge_job_id}: {result.base_model} + adapter, {result.dtype}, on {result.merged_on}")
    print(f"{result.parameters:,} parameters, {result.weight_bytes / 1e6:.1f} MB in {result.shards} shard(s)")
    check = result.check
    verdict = {True: "passed", False: "FAILED", None: "not expected to match"}[check.passed]
    tolerance = f" (tolerance {check.tolerance:g})" if check.tolerance is not None else ""
    print(
        f"check: eval losses reproduced to {check.max_relative_difference:.2e} relative{tolerance}: {verdict}"
    )
    for note in result.notes:
        print(f"note: {note}")
    print(f"files (download with: influence artifacts {merge.merge_job_id} --download DIR):")
    for name in result.files:
        print(f"  merged/{name}")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="influence", description="The Influence Dashboard API from a shell.")
    root.add_argument(
        "--api",
        default=default_api(),
        help="gateway URL (default: $INFLUENCE_API or the local stack, %(default)s)",
    )
    commands = root.add_subparsers(dest="command", required=True)

    login = commands.add_parser("login", help="sign in and keep the token for this API URL")
    login.add_argument("--username", help="local sign-in name (default: your login name)")
    login.add_argument("--token", help="keep this bearer token (a JWT from your sign-in provider)")
    login.set_defaults(run=cmd_login)

    submit = commands.add_parser("submit", help="submit an experiment spec (a JSON file)")
    submit.add_argument("spec", type=Path)
    submit.add_argument(
        "--train",
        type=Path,
        help="a training file (JSONL, JSON, CSV, Parquet) stored as a dataset for the spec",
    )
    submit.add_argument("--eval", type=Path, help="an eval file, stored as a dataset the same way")
    submit.add_argument("--follow", action="store_true", help="show progress until the job ends")
    submit.add_argument("--idempotency-key", help="resubmitting with the same key answers the same job")
    submit.add_argument(
        "--max-cost-usd",
        type=float,
        help="spend cap: an estimate over it is refused, and the job is cancelled when it reaches it",
    )
    submit.set_defaults(run=cmd_submit)

    status = commands.add_parser("status", help="a job's status, stage and latest figures")
    status.add_argument("job")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_status)

    results = commands.add_parser("results", help="a finished job's results")
    results.add_argument("job")
    results.add_argument("--format", choices=("json", "csv"), default="json")
    results.add_argument(
        "--table",
        choices=("influence", "evals"),
        default="influence",
        help="CSV: influence scores (eval_id, train_id, score) or eval answers",
    )
    results.add_argument("-o", "--output", help="write to this file instead of stdout")
    results.set_defaults(run=cmd_results)

    artifacts = commands.add_parser("artifacts", help="list a job's files (adapter, scores)")
    artifacts.add_argument("job")
    artifacts.add_argument("--download", metavar="DIR", help="download every file into DIR (sha256 checked)")
    artifacts.set_defaults(run=cmd_artifacts)

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job")
    cancel.set_defaults(run=cmd_cancel)

    ask = commands.add_parser(
        "ask",
        help="ask a finished experiment's fine-tuned model; show the training examples that drove its answer",
    )
    ask.add_argument("job", help="the experiment")
    ask.add_argument("prompt")
    ask.add_argument("--expected", help="attribute this answer instead of the model's own")
    ask.add_argument(
        "--span",
        type=int,
        nargs=2,
        metavar=("START", "END"),
        help="attribute only these characters of the answer",
    )
    ask.add_argument("--top-k", type=int, default=5)
    ask.add_argument("--idempotency-key", help="asking again with the same key answers the same query")
    ask.add_argument("--json", action="store_true")
    ask.set_defaults(run=cmd_ask)

    merge = commands.add_parser(
        "merge",
        help="merge a finished experiment's adapter into its base: weights that load with from_pretrained",
    )
    merge.add_argument("job", help="the experiment")
    merge.add_argument("--shard-size-mb", type=float, help="largest weight shard (default 5000 MB)")
    merge.add_argument("--download", metavar="DIR", help="download the merged files into DIR")
    merge.add_argument("--idempotency-key", help="merging again with the same key answers the same merge")
    merge.add_argument("--json", action="store_true")
    merge.set_defaults(run=cmd_merge)

    examples = commands.add_parser(
        "examples", help="a finished experiment's training examples, ranked (harmful, suspect, ...)"
    )
    examples.add_argument("job", help="the experiment")
    examples.add_argument(
        "--sort",
        choices=("harmful", "helpful", "self_influence", "loss", "worst_harm", "suspect"),
        default="suspect",
    )
    examples.add_argument("--limit", type=int, default=20)
    examples.add_argument("--offset", type=int, default=0)
    examples.add_argument("--json", action="store_true")
    examples.set_defaults(run=cmd_examples)

    jobs = commands.add_parser("jobs", help="your experiments, newest first, with name, tags and outcome")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--tag", help="only experiments with this tag")
    jobs.add_argument("--model", help="only experiments of this model_id")
    jobs.add_argument("--method", help="only this influence method")
    jobs.add_argument("--status", help="only jobs in this status (queued ... cancelled)")
    jobs.set_defaults(run=cmd_jobs)

    label = commands.add_parser("label", help="rename, retag or annotate an experiment")
    label.add_argument("job")
    label.add_argument("--name", help="the new name ('' clears it)")
    label.add_argument("--tags", help="comma-separated tags, replacing the current ones ('' clears them)")
    label.add_argument("--note", help="the new note ('' clears it)")
    label.set_defaults(run=cmd_label)

    compare = commands.add_parser("compare", help="2 to 4 experiments side by side: config diff and metrics")
    compare.add_argument("jobs", nargs="+", metavar="JOB")
    compare.add_argument("--json", action="store_true", help="the whole comparison as JSON")
    compare.set_defaults(run=cmd_compare)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.api = args.api.rstrip("/")
    try:
        return args.run(args)
    except InfluenceError as exc:
        hint = "; sign in with: influence login" if exc.status == 401 else ""
        print(f"influence: {exc}{hint}", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:
        print(f"influence: cannot reach the gateway at {args.api}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"influence: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
