"""Every service's entry point refuses a bad setting the same way: one JSON error line on stderr
naming the variable (never its value), nothing on stdout, exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from service_runtime.settings import EXIT_BAD_SETTINGS

ENTRY_POINTS = {
    "gateway": "gateway",
    "scheduler": "scheduler",
    "keyvault": "keyvault",
    "compute_local": "compute-local",
    "compute_runpod": "compute-runpod",
    "compute_modal": "compute-modal",
}
BAD_LEVEL = "chatty-hunter2"


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_a_bad_setting_refuses_to_start_with_one_line_and_status_2(module: str) -> None:
    env = {**os.environ, "LOG_LEVEL": BAD_LEVEL}
    done = subprocess.run(
        [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == EXIT_BAD_SETTINGS, done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    entry = json.loads(line)
    service = ENTRY_POINTS[module]
    assert (entry["level"], entry["service"]) == ("error", service)
    assert entry["message"].startswith(f"refusing to start: invalid {service} settings: ")
    assert "LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in entry["message"]
    assert "hunter2" not in done.stderr
