"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[EmbeddedPostgres]:  # noqa: F821
    """One real PostgreSQL server for the whole test run (pgserver binaries)."""
    from devstack.postgres import start_embedded_postgres

    with tempfile.TemporaryDirectory(prefix="pgtest-") as tmp:
        os.chmod(tmp, 0o755)
        pg = start_embedded_postgres(Path(tmp) / "pg")
        yield pg
        pg.stop()


@pytest.fixture
def database_url(embedded_postgres) -> str:
    """A fresh, empty database on the shared server: a DSN asyncpg accepts."""
    return embedded_postgres.create_database()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3TestServer]:  # noqa: F821
    """The S3 test server (moto on loopback) for the whole test run, one bucket."""
    from devstack.s3_server import s3_test_server

    with s3_test_server() as server:
        yield server


@pytest.fixture
def s3_store(s3_server) -> ArtifactStore:  # noqa: F821
    """An artifact store under a fresh prefix of the S3 test server's bucket."""
    from artifact_store import open_store

    return open_store(s3_server.store_settings(prefix=f"t-{os.urandom(4).hex()}"))
