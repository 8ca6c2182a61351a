"""`make run` a second time: the embedded PostgreSQL and its database are found, not re-created,
and nothing is reported as an error."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from devstack.stack import Stack

pytestmark = pytest.mark.e2e


def test_second_start_finds_the_database_and_prints_no_error(capfd: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="client-pg-") as tmp:
        os.chmod(tmp, 0o755)  # pgserver runs postgres as its own user when we are root
        for _start in range(2):
            with Stack(data_dir=Path(tmp), services=()) as stack:
                assert stack.database_url.endswith("influence") or "/influence?" in stack.database_url
                listed = stack.postgres.server.psql("SELECT datname FROM pg_database ORDER BY datname;")
        captured = capfd.readouterr()
    assert listed.count(" influence\n") == 1, listed
    assert "ERROR" not in captured.err and "already exists" not in captured.err, captured.err
