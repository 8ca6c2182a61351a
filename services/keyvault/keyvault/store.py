"""The ``credentials`` table: sealed keys only (ciphertext, nonce, version) plus the last 4
characters and timestamps. Nothing here ever sees a plaintext key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from keyvault.crypto import SealedKey
from keyvault.migrations import apply_migrations

# SQLSTATE classes that mean "the database is not there right now", not "bad request":
# 08 connection exception, 53 insufficient resources, 57 operator intervention (shutdown).
_UNAVAILABLE_SQLSTATE_CLASSES = {"08", "53", "57"}
_UNAVAILABLE_SQLSTATES = {"3D000"}  # the database does not exist (dropped)
ACQUIRE_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 10.0


# Same shape as gateway/auth.py's AuthError and key dataclasses: an exception and frozen
# record types, each the domain of its own service; only the class layout is alike.
class DatabaseUnavailable(Exception):
    """The database cannot be reached or refused the connection."""


@dataclass(frozen=True)
class CredentialInfo:
    user_id: str
    provider: str
    last4: str
    key_version: int
    created_at: datetime
    verified_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class StoredCredential:
    user_id: str
    provider: str
    sealed: SealedKey


@dataclass(frozen=True)
class RotationCounts:
    rotated: int
    already_current: int
    unreadable: tuple[tuple[str, str, int], ...]  # (user_id, provider, key_version)


_INFO_COLUMNS = "user_id, provider, last4, key_version, created_at, verified_at, updated_at"


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES or sqlstate in _UNAVAILABLE_SQLSTATES
    return False


class CredentialStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                yield conn
        except Exception as exc:
            if is_unavailable(exc):
                raise DatabaseUnavailable(type(exc).__name__) from exc
            raise

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1", timeout=ACQUIRE_TIMEOUT_S)

    async def upsert(
        self, user_id: str, provider: str, sealed: SealedKey, last4: str, verified: bool
    ) -> CredentialInfo:
        """Store the sealed key, replacing any earlier key of this user and provider
        (created_at keeps the first store; updated_at is this store)."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"""
                INSERT INTO credentials
                    (user_id, provider, ciphertext, nonce, key_version, last4, verified_at)
                VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $7::boolean THEN now() END)
                ON CONFLICT (user_id, provider) DO UPDATE SET
                    ciphertext = EXCLUDED.ciphertext,
                    nonce = EXCLUDED.nonce,
                    key_version = EXCLUDED.key_version,
                    last4 = EXCLUDED.last4,
                    verified_at = EXCLUDED.verified_at,
                    updated_at = now()
                RETURNING {_INFO_COLUMNS}
                """,
                user_id,
                provider,
                sealed.ciphertext,
                sealed.nonce,
                sealed.key_version,
                last4,
                verified,
            )
        if row is None:
            raise RuntimeError("the credential upsert returned no row")
        return CredentialInfo(**dict(row))

    async def info(self, user_id: str, provider: str) -> CredentialInfo | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_INFO_COLUMNS} FROM credentials WHERE user_id = $1 AND provider = $2",
                user_id,
                provider,
            )
        return None if row is None else CredentialInfo(**dict(row))

    async def sealed(self, user_id: str, provider: str) -> SealedKey | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT ciphertext, nonce, key_version FROM credentials WHERE user_id = $1 AND provider = $2",
                user_id,
                provider,
            )
        return None if row is None else SealedKey(**dict(row))

    async def delete(self, user_id: str, provider: str) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(
                "DELETE FROM credentials WHERE user_id = $1 AND provider = $2", user_id, provider
            )
        return status == "DELETE 1"

    async def reseal_all(
        self, current_version: int, reseal: Callable[[StoredCredential], SealedKey | None]
    ) -> RotationCounts:
        """In one transaction, replace the sealed key of every row not under
        ``current_version`` with ``reseal(row)``; rows it cannot read (None) stay as they are."""
        rotated = 0
        unreadable: list[tuple[str, str, int]] = []
        async with self._connection() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT user_id, provider, ciphertext, nonce, key_version FROM credentials "
                "WHERE key_version <> $1 ORDER BY user_id, provider FOR UPDATE",
                current_version,
            )
            for row in rows:
                stored = StoredCredential(
                    user_id=row["user_id"],
                    provider=row["provider"],
                    sealed=SealedKey(row["ciphertext"], row["nonce"], row["key_version"]),
                )
                resealed = reseal(stored)
                if resealed is None:
                    unreadable.append((stored.user_id, stored.provider, stored.sealed.key_version))
                    continue
                await conn.execute(
                    "UPDATE credentials SET ciphertext = $3, nonce = $4, key_version = $5 "
                    "WHERE user_id = $1 AND provider = $2",
                    stored.user_id,
                    stored.provider,
                    resealed.ciphertext,
                    resealed.nonce,
                    resealed.key_version,
                )
                rotated += 1
            already_current = (
                await conn.fetchval(
                    "SELECT count(*) FROM credentials WHERE key_version = $1", current_version
                )
                - rotated
            )
        return RotationCounts(rotated=rotated, already_current=already_current, unreadable=tuple(unreadable))


async def open_database(dsn: str) -> asyncpg.Pool:
    """Connect and bring the schema up to date; DatabaseUnavailable when it cannot be reached."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=5, command_timeout=COMMAND_TIMEOUT_S, timeout=ACQUIRE_TIMEOUT_S
        )
    except Exception as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailable(type(exc).__name__) from exc
        raise
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn)
    except BaseException:
        await pool.close()
        raise
    return pool
