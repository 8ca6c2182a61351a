"""The connection pool and the versioned, forward-only schema migrations.

Migrations are the SQL files in ``scheduler/migrations`` named ``NNNN_description.sql``, applied
in order, each in its own transaction, and recorded in ``schema_migrations``. A session-level
advisory lock serialises concurrent migrators (several replicas starting at once).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

# what a statement runs on: a connection of its own (`migrate`) or one the pool lends
DbConnection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def returned_row(row: asyncpg.Record | None) -> asyncpg.Record:
    """The row of a statement that always returns one (an aggregate, or RETURNING after an upsert)."""
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any fixed 64-bit number shared by every scheduler replica: "migrate" in ASCII.
_MIGRATION_LOCK_ID = 0x6D696772617465


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    migrations = []
    for entry in resources.files("scheduler.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        migrations.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return migrations


async def apply_migrations(conn: DbConnection) -> list[int]:
    """Apply every migration not yet recorded; returns the versions applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in load_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("migration applied", extra={"version": migration.version, "migration": migration.name})
            applied.append(migration.version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)


async def migrate(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()


# A JSON escape of NUL not preceded by an escaped backslash (``\\u0000`` is the text "\u0000").
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def encode_jsonb(value: Any) -> str:
    """JSON for a jsonb column. PostgreSQL's text cannot hold NUL, so a NUL in any string (a
    random model's generated answer can hold one) becomes U+FFFD instead of making the row, and
    with it a paid result, unstorable."""
    return _JSON_NUL.sub(r"\1\\ufffd", json.dumps(value))


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come and go as Python objects.
    await conn.set_type_codec("jsonb", encoder=encode_jsonb, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, max_size: int = 8, application_name: str = "scheduler") -> asyncpg.Pool:
    """The replica's pool; ``application_name`` names the replica in pg_stat_activity."""
    return await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        init=_init_connection,
        command_timeout=30,
        timeout=10,
        server_settings={"application_name": application_name},
    )
