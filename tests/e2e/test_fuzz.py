"""Schema fuzzing of the OpenAPI document against the gateway with the real scheduler, keyvault
and compute-local behind it: a few hundred generated requests, valid and invalid, and not one
server error. `make bench-fuzz` runs the long version."""

from __future__ import annotations

import pytest

from devstack.client import GatewayClient
from devstack.fuzz_api import FUZZ_STACK_ENV, fuzz, fuzz_data_files, fuzz_upload_grants
from devstack.stack import Stack

pytestmark = pytest.mark.e2e

CASES = 150
DATA_CASES = 60
UPLOAD_CASES = 80


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with Stack(
        data_dir=tmp_path_factory.mktemp("fuzz"),
        extra_env=FUZZ_STACK_ENV,
        services=("keyvault", "compute-local", "scheduler", "gateway"),
    ) as running:
        yield running


def test_generated_requests_get_no_server_error(stack: Stack) -> None:
    client = GatewayClient(stack.gateway_url)
    client.sign_in_locally("fuzzer")
    report = fuzz(stack.gateway_url, client.headers, CASES, seed=14)
    print(f"fuzz: {report.summary()}")
    assert report.cases >= CASES
    assert report.findings == [], "\n".join(report.findings[:20])
    # Both the happy and the refusing paths were reached.
    assert report.by_status[200] > 0 and report.by_status[422] > 0


def test_hostile_data_files_get_no_server_error(stack: Stack) -> None:
    client = GatewayClient(stack.gateway_url)
    client.sign_in_locally("fuzzer")
    report = fuzz_data_files(stack.gateway_url, client.headers, DATA_CASES, seed=14)
    print(f"fuzz data files: {report.summary()}")
    assert report.cases == DATA_CASES
    assert report.findings == [], "\n".join(report.findings[:20])
    # Bombs are refused as too large, malformed files as problems.
    assert report.by_status[413] > 0 and report.by_status[422] > 0


def test_upload_grant_requests_get_no_server_error(stack: Stack) -> None:
    """The workers' upload route, which the OpenAPI fuzzing does not reach."""
    report = fuzz_upload_grants(stack.gateway_url, UPLOAD_CASES, seed=14)
    print(f"fuzz upload grants: {report.summary()}")
    assert report.cases == UPLOAD_CASES
    assert report.findings == [], "\n".join(report.findings[:20])
    # Malformed bodies are refused as such, well-formed ones for a job that does not exist.
    assert report.by_status[422] > 0 and report.by_status[404] > 0
