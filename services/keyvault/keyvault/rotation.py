"""``python -m keyvault rotate``: re-encrypt every stored key under the current master key."""

from __future__ import annotations

from keyvault.config import Settings
from keyvault.store import CredentialStore, RotationCounts, open_database
from keyvault.vault import KeyVault


async def rotate(settings: Settings) -> RotationCounts:
    """One transaction over all rows; running it again changes nothing."""
    pool = await open_database(settings.database_url.get_secret_value())
    try:
        return await KeyVault(settings.keyring(), CredentialStore(pool)).rotate()
    finally:
        await pool.close()
