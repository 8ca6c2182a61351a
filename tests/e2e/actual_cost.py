"""Checks of a finished job's real cost (issue 24, item 4), shared by the provider end-to-end
tests: the job API's ``actual`` and the ``influence status`` line that shows it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cost_model import price_table
from devstack.client import GatewayClient

INFLUENCE = Path(sys.executable).with_name("influence")


def assert_actual_cost(job: dict[str, Any], provider: str, gpu: str, measured_by: str) -> dict[str, Any]:
    """The job's ``actual``: measured seconds, the GPU ``gpu``, the price table's rate for it and
    their product."""
    actual = job["actual"]
    assert actual is not None, job
    assert actual["gpu"] == gpu
    assert actual["usd_per_second"] == price_table(provider).gpus[gpu].usd_per_second
    assert actual["gpu_seconds"] > 0
    assert actual["cost_usd"] == pytest.approx(actual["gpu_seconds"] * actual["usd_per_second"])
    assert actual["source"].startswith(f"{measured_by}; {provider} price table of ")
    return actual


def status_line(client: GatewayClient, job_id: str) -> str:
    """``influence status JOB`` as a researcher runs it, with ``client``'s sign-in."""
    env = {
        **os.environ,
        "INFLUENCE_API": str(client.http.base_url).rstrip("/"),
        "INFLUENCE_TOKEN": client.token,
    }
    done = subprocess.run(
        [str(INFLUENCE), "status", job_id], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_status_shows_actual(client: GatewayClient, job_id: str, actual: dict[str, Any]) -> None:
    out = status_line(client, job_id)
    assert f"actual: {actual['gpu_seconds']:.1f} GPU-s on {actual['gpu']}" in out, out
    assert f"= ${actual['cost_usd']:.4f}" in out, out
