"""keyvault's own forward-only schema migrations, recorded in ``keyvault_schema_migrations``.

Applied at start (and by ``python -m keyvault rotate``) under a transaction-scoped advisory
lock, so replicas starting together apply each migration once. Never edit a released
migration: append a new one.
"""

from __future__ import annotations

import logging

import asyncpg

log = logging.getLogger(__name__)

# An arbitrary constant that names keyvault's migration lock among other advisory locks.
_ADVISORY_LOCK_ID = 0x6B76_6D69

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "create credentials",
        """
        CREATE TABLE credentials (
            user_id     text        NOT NULL CHECK (user_id <> ''),
            provider    text        NOT NULL CHECK (provider <> ''),
            ciphertext  bytea       NOT NULL,
            nonce       bytea       NOT NULL CHECK (octet_length(nonce) = 12),
            key_version integer     NOT NULL CHECK (key_version > 0),
            last4       text        NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            verified_at timestamptz,
            updated_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (user_id, provider)
        );
        CREATE INDEX credentials_key_version ON credentials (key_version);
        """,
    ),
)


class SchemaTooNew(RuntimeError):
    pass


async def apply_migrations(conn: asyncpg.pool.PoolConnectionProxy) -> list[int]:
    """Apply every migration not yet recorded; return the versions applied now."""
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _ADVISORY_LOCK_ID)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS keyvault_schema_migrations (
                version    integer     PRIMARY KEY,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM keyvault_schema_migrations")}
        newest_known = MIGRATIONS[-1][0]
        if done and max(done) > newest_known:
            raise SchemaTooNew(
                f"the database's keyvault schema is at version {max(done)}, newer than this "
                f"keyvault knows ({newest_known}); deploy a newer keyvault"
            )
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO keyvault_schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied_now.append(version)
            log.info("migration applied", extra={"version": version, "migration": name})
    return applied_now
