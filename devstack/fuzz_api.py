"""Schema fuzzing of the gateway's OpenAPI document with schemathesis: valid (positive) and
invalid (negative) requests for every operation, signed in as one user, against a running stack.
A server error (any 5xx: every service is up) or a request without an answer is a finding.

`make bench-fuzz` runs it long against a fresh stack (FUZZ_CASES, default 10,000) and prints the
figures; tests/e2e/test_fuzz.py runs a few hundred cases in `make test`.

The schema says only "binary" for an uploaded data file, so :func:`fuzz_data_files` sends
``POST /api/data/parse`` hostile files of its own: Parquet bombs (millions of rows, repeated
long strings), deeply nested and bracket-heavy JSON, strings of up to 15 MB in JSON and CSV,
the right fields with values of the wrong type (JSON, JSONL, CSV, typed Parquet columns), bad
encodings, broken CSV quoting and garbage behind a Parquet magic number. Any 5xx, or an answer
slower than the timeout, is a finding. :func:`fuzz_upload_grants` does the same for the workers'
``POST /api/uploads/{job_id}/{secret}``, which is not in the OpenAPI document.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import string
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Err

from devstack.client import GatewayClient
from devstack.stack import Stack

# Hosted jobs the fuzzer gets through validation would run on this machine's CPU: the ceiling
# refuses them (422) after every other check, so the whole submit path is still exercised.
FUZZ_STACK_ENV = {
    "HOSTED_MAX_JOB_TIME_S": "0.001",
    "SCHEDULER_POLL_INTERVAL_S": "0.2",
    "COMPUTE_LOCAL_TORCH_THREADS": "1",
}
_REQUEST_TIMEOUT_S = 30.0


@dataclass
class FuzzReport:
    cases: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def found(self, finding: str) -> None:
        """Record a finding, and show it at once: a long run's findings are not kept to its end."""
        self.findings.append(finding)
        print(f"  finding: {finding}", file=sys.stderr, flush=True)

    def progress(self) -> None:
        """A line on stderr every 1,000 cases, so a long run shows where it is."""
        if self.cases % 1000 == 0:
            print(
                f"  ... {self.cases} cases, {len(self.findings)} server errors", file=sys.stderr, flush=True
            )

    def summary(self) -> str:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(self.by_status.items()))
        return (
            f"{self.cases} cases in {self.seconds:.0f} s, {len(self.findings)} server errors; "
            f"statuses {statuses}"
        )


def _is_finding(status: int) -> bool:
    return status >= 500


def fuzz(base_url: str, headers: dict[str, str], cases: int, seed: int = 0) -> FuzzReport:
    """At least ``cases`` generated requests, spread over every operation and both modes."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise RuntimeError(f"schemathesis cannot read an operation of the OpenAPI: {result.err()}")
        operations.append(result.ok())
    report = FuzzReport()
    started = time.monotonic()
    session = requests.Session()
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    round_number = 0
    while report.cases < cases:
        before = report.cases
        per_run = max(1, math.ceil((cases - report.cases) / (len(operations) * len(modes))))
        for operation in operations:
            for mode in modes:
                try:
                    _run(operation, mode, per_run, seed + round_number, base_url, headers, session, report)
                except Unsatisfiable:
                    pass  # e.g. no invalid request exists for an operation without parameters
        round_number += 1
        if report.cases == before:
            break
    report.seconds = time.monotonic() - started
    return report


def _run(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    examples: int,
    seed: int,
    base_url: str,
    headers: dict[str, str],
    session: requests.Session,
    report: FuzzReport,
) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, headers=headers))
    def call(case: schemathesis.Case) -> None:
        label = f"{operation.label} ({mode.value})"
        report.cases += 1
        report.progress()
        try:
            response = case.call(
                base_url=base_url, session=session, headers=headers, timeout=_REQUEST_TIMEOUT_S
            )
        except requests.RequestException as exc:
            report.by_status[0] += 1
            report.found(f"{label}: no answer ({type(exc).__name__}): {case.as_curl_command()}")
            return
        report.by_status[response.status_code] += 1
        if _is_finding(response.status_code):
            report.found(f"{label}: {response.status_code} {response.text[:200]!r}: {case.as_curl_command()}")

    # Each operation's runs get their own seed, so a longer run explores new inputs.
    call._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    call()


def _parquet(columns: dict[str, list[str]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, compression="zstd", use_dictionary=True)
    return buffer.getvalue()


def _typed_parquet(column_type: str) -> bytes:
    """A Parquet file whose prompt/completion columns are not strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = {
        "int": pa.array([1, 2, 3]),
        "list": pa.array([[1], [2, 3], []]),
        "struct": pa.array([{"a": 1}, {"a": 2}, {"a": None}]),
        "binary": pa.array([b"\xff\xfe", b"a", b""]),
    }[column_type]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"prompt": values, "completion": values}), buffer)
    return buffer.getvalue()


@st.composite
def hostile_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """(filename, bytes) of a data file built to hurt a parser."""
    kind = draw(
        st.sampled_from(
            [
                "rows-bomb",
                "string-bomb",
                "deep-json",
                "brackets",
                "encoding",
                "csv",
                "par1",
                "jsonl",
                "wrong-types",
                "huge-string",
                "bytes",
            ]
        )
    )
    if kind == "rows-bomb":
        rows = draw(st.integers(10_001, 3_000_000))
        return "rows.parquet", _parquet({"prompt": ["q"] * rows, "completion": ["a"] * rows})
    if kind == "string-bomb":
        text = "x" * draw(st.integers(100_000, 2_000_000))
        count = draw(st.integers(1, 60))
        return "strings.parquet", _parquet({"prompt": [text] * count, "completion": [text] * count})
    if kind == "deep-json":
        depth = draw(st.integers(10, 300_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"messages":', "}]")]))
        closed = draw(st.booleans())
        body = opener * depth + "1" + (closer * depth if closed else "")
        return draw(st.sampled_from(["deep.json", "deep.jsonl", "deep.csv"])), body.encode()
    if kind == "brackets":
        text = draw(st.text(alphabet='[]{}",:\\ \n0a', max_size=5000))
        return draw(st.sampled_from(["b.json", "b.jsonl"])), text.encode()
    if kind == "encoding":
        row = json.dumps({"prompt": draw(st.text(max_size=50)), "completion": "a"}, ensure_ascii=False)
        encoding = draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252", "utf-8"]))
        data = row.encode(encoding, errors="replace") + draw(st.binary(max_size=20))
        return draw(st.sampled_from(["e.jsonl", "e.csv"])), data
    if kind == "csv":
        text = draw(st.text(alphabet='"\r\n,ab\x00', max_size=3000))
        return "c.csv", ("prompt,completion\n" + text).encode()
    if kind == "par1":
        return draw(st.sampled_from(["p.parquet", "p.jsonl"])), b"PAR1" + draw(
            st.binary(max_size=2000)
        ) + b"PAR1"
    if kind == "wrong-types":
        # The right field names with values of the wrong type, in every format.
        odd = st.none() | st.booleans() | st.integers() | st.floats() | st.lists(st.integers(), max_size=3)
        typed = {
            field: draw(odd | st.text(max_size=20))
            for field in draw(
                st.sets(st.sampled_from(["prompt", "completion", "expected", "messages", "id"]))
            )
        }
        fmt = draw(st.sampled_from(["json", "jsonl", "csv", "parquet"]))
        if fmt == "json":
            return "w.json", json.dumps(draw(st.sampled_from([[typed], typed, {"rows": [typed]}]))).encode()
        if fmt == "jsonl":
            return "w.jsonl", (json.dumps(typed) + "\n").encode() * draw(st.integers(1, 5))
        if fmt == "csv":
            values = ",".join(json.dumps(value) for value in typed.values())
            return "w.csv", (",".join(typed) + "\n" + values).encode()
        return "w.parquet", _typed_parquet(draw(st.sampled_from(["int", "list", "struct", "binary"])))
    if kind == "huge-string":
        text = "y" * draw(st.integers(1_000_000, 15_000_000))
        fmt = draw(st.sampled_from(["jsonl", "json", "csv"]))
        if fmt == "csv":
            return "h.csv", f"prompt,completion\n{text},a\n".encode()
        row = json.dumps({"prompt": text, "completion": "a"})
        return f"h.{fmt}", (row if fmt == "jsonl" else f"[{row}]").encode()
    if kind == "jsonl":
        value = draw(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(),
                lambda c: st.lists(c) | st.dictionaries(st.text(), c),
                max_leaves=50,
            )
        )
        return "j.jsonl", (json.dumps(value) + "\n").encode()
    return draw(st.sampled_from(["x.jsonl", "x.csv", "x.parquet", "x"])), draw(
        st.binary(min_size=1, max_size=4000)
    )


def _drive(
    report: FuzzReport,
    cases: int,
    seed: int,
    examples: st.SearchStrategy[Any],
    request: Callable[[Any], tuple[str, Callable[[], requests.Response]]],
) -> None:
    """Sends ``cases`` generated examples (``request`` gives each one's label and call) and counts
    the answers; a 5xx, or no answer within the timeout, is a finding."""

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(example=examples)
    def call(example: Any) -> None:
        label, send = request(example)
        report.cases += 1
        report.progress()
        try:
            response = send()
        except requests.RequestException as exc:
            report.by_status[0] += 1
            report.found(f"{label}: no answer ({type(exc).__name__})")
            return
        report.by_status[response.status_code] += 1
        if _is_finding(response.status_code):
            report.found(f"{label}: {response.status_code} {response.text[:200]!r}")

    call._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    call()


def fuzz_data_files(base_url: str, headers: dict[str, str], cases: int, seed: int = 0) -> FuzzReport:
    """``cases`` hostile files to ``POST /api/data/parse``."""
    report = FuzzReport()
    started = time.monotonic()
    session = requests.Session()

    def request(example: tuple[tuple[str, bytes], str]) -> tuple[str, Callable[[], requests.Response]]:
        (name, data), kind = example
        return f"POST /api/data/parse ({name}, {len(data)} bytes)", lambda: session.post(
            f"{base_url}/api/data/parse",
            params={"kind": kind, "filename": name},
            data=data,
            headers=headers,
            timeout=_REQUEST_TIMEOUT_S,
        )

    _drive(report, cases, seed, st.tuples(hostile_files(), st.sampled_from(["train", "eval"])), request)
    report.seconds = time.monotonic() - started
    return report


_HEX = "0123456789abcdef"


@st.composite
def upload_grant_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A worker's ``POST /api/uploads/{job_id}/{secret}`` as anyone could send it: job ids that are
    UUIDs or not, secrets of any text, bodies of the right shape with wrong values, other JSON and
    no JSON at all."""
    job_id = draw(st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=80)))
    secret = draw(
        st.one_of(
            st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=64),
            st.text(min_size=1, max_size=300),
        )
    )
    shaped = st.fixed_dictionaries(
        {
            "name": st.one_of(
                st.sampled_from(["scores.npy", "result.json", "adapter/adapter_model.safetensors", "../x"]),
                st.text(max_size=1200),
            ),
            "bytes": st.one_of(st.integers(-5, 2**64), st.floats(), st.text(max_size=10)),
            "sha256": st.one_of(st.text(alphabet=_HEX, min_size=64, max_size=64), st.text(max_size=80)),
        }
    )
    other = st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.text(max_size=20), st.none()))
    body = draw(
        st.one_of(
            st.one_of(shaped, other).map(lambda value: json.dumps(value).encode()), st.binary(max_size=300)
        )
    )
    return job_id, secret, body


def fuzz_upload_grants(base_url: str, cases: int, seed: int = 0) -> FuzzReport:
    """``cases`` generated ``POST /api/uploads/...`` requests: the workers' route, outside the
    OpenAPI document, which needs no session (its URL's secret is the credential)."""
    report = FuzzReport()
    started = time.monotonic()
    session = requests.Session()

    def request(example: tuple[str, str, bytes]) -> tuple[str, Callable[[], requests.Response]]:
        job_id, secret, body = example
        path = f"/api/uploads/{quote(job_id, safe='')}/{quote(secret, safe='')}"
        return f"POST {path[:200]} ({len(body)} bytes)", lambda: session.post(
            f"{base_url}{path}",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=_REQUEST_TIMEOUT_S,
        )

    _drive(report, cases, seed, upload_grant_requests(), request)
    report.seconds = time.monotonic() - started
    return report


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.fuzz_api")
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument(
        "--data-cases",
        type=int,
        help="hostile data files and upload grants, each (default: a tenth of --cases)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="fuzz-") as data_dir,
        Stack(
            data_dir=Path(data_dir),
            extra_env=FUZZ_STACK_ENV,
            services=("keyvault", "compute-local", "scheduler", "gateway"),
        ) as stack,
    ):
        client = GatewayClient(stack.gateway_url)
        client.sign_in_locally("fuzzer")
        report = fuzz(stack.gateway_url, client.headers, args.cases, args.seed)
        data_cases = args.data_cases if args.data_cases is not None else max(1, args.cases // 10)
        data_report = fuzz_data_files(stack.gateway_url, client.headers, data_cases, args.seed)
        upload_report = fuzz_upload_grants(stack.gateway_url, data_cases, args.seed)
    print(f"fuzz: {report.summary()}")
    print(f"fuzz data files: {data_report.summary()}")
    print(f"fuzz upload grants: {upload_report.summary()}")
    findings = report.findings + data_report.findings + upload_report.findings
    for finding in findings[:50]:
        print(f"  {finding}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
