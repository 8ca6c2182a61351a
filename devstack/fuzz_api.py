"""Schema fuzzing of the gateway's OpenAPI document with schemathesis: valid (positive) and
invalid (negative) requests for every operation, signed in as one user, against a running stack.
A server error (any 5xx: every service is up) or a request without an answer is a finding.

`make bench-fuzz` runs it long against a fresh stack (FUZZ_CASES, default 5,000) and prints the
figures; tests/e2e/test_fuzz.py runs a few hundred cases in `make test`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
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
        try:
            response = case.call(
                base_url=base_url, session=session, headers=headers, timeout=_REQUEST_TIMEOUT_S
            )
        except requests.RequestException as exc:
            report.by_status[0] += 1
            report.findings.append(f"{label}: no answer ({type(exc).__name__}): {case.as_curl_command()}")
            return
        report.by_status[response.status_code] += 1
        if _is_finding(response.status_code):
            report.findings.append(
                f"{label}: {response.status_code} {response.text[:200]!r}: {case.as_curl_command()}"
            )

    # Each operation's runs get their own seed, so a longer run explores new inputs.
    call._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    call()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.fuzz_api")
    parser.add_argument("--cases", type=int, default=5000)
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
    print(f"fuzz: {report.summary()}")
    for finding in report.findings[:50]:
        print(f"  {finding}")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
