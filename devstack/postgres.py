"""Embedded PostgreSQL from the ``pgserver`` package (real Postgres binaries from PyPI).

Used when DATABASE_URL is not set (`make run`) and by the tests. Postgres refuses to run as
root; pgserver then runs it as its own unprivileged user. It listens on a Unix socket in the
data directory, so nothing is exposed on the network.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pgserver


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    server: pgserver.PostgresServer

    @property
    def admin_dsn(self) -> str:
        return _to_asyncpg_dsn(self.server.get_uri())

    def dsn(self, database: str) -> str:
        return _to_asyncpg_dsn(self.server.get_uri(database))

    def create_database(self, prefix: str = "test") -> str:
        """Create a fresh, empty database and return its DSN."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(f"bad database name {name!r}")
        self.server.psql(f"CREATE DATABASE {name};")
        return self.dsn(name)

    def ensure_database(self, name: str) -> str:
        """Create ``name`` unless it exists (a second `make run` finds it); return its DSN.

        psql reports a failed statement on stderr and still exits 0, so "CREATE DATABASE" of an
        existing database would print an ERROR line: the statement runs only when it is absent.
        """
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise ValueError(f"bad database name {name!r}")
        self.server.psql(
            f"SELECT 'CREATE DATABASE {name}' "
            f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{name}')\\gexec\n"
        )
        return self.dsn(name)

    def stop(self) -> None:
        self.server.cleanup()


def start_embedded_postgres(data_dir: Path, keep_running: bool = False) -> EmbeddedPostgres:
    """Start (or attach to) the embedded server whose data lives in ``data_dir``.

    ``keep_running=False`` stops the server when the last handle in this process exits.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode=None if keep_running else "stop")
    return EmbeddedPostgres(data_dir=data_dir, server=server)


def _to_asyncpg_dsn(uri: str) -> str:
    # pgserver gives postgresql://postgres:@/db?host=/socket/dir; asyncpg and libpq accept it.
    return uri
