"""The key vault's business rules, free of gRPC: validate, seal, store, reveal, rotate.

The plaintext only lives in memory for the duration of a call: it is sealed before it
reaches the store, and only ``reveal`` returns it. Logs carry user id, provider and key
version, never the key or its last 4 characters.
"""

from __future__ import annotations

import logging
import re

from keyvault.crypto import Keyring, SealedKey, UndecryptableKey, UnknownKeyVersion
from keyvault.store import CredentialInfo, CredentialStore, RotationCounts, StoredCredential

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 8
MAX_KEY_CHARS = 1024
MAX_USER_ID_CHARS = 256
_PROVIDER = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_USER_ID = re.compile(r"^[^\x00-\x1f\x7f]+$")


class InvalidKeyRequest(ValueError):
    """Bad input; the message names the field and never contains the key."""


class KeyNotFound(LookupError):
    def __init__(self, user_id: str, provider: str) -> None:
        super().__init__(f"no {provider} key is stored for user {user_id}")


class KeyUnreadable(Exception):
    """The stored key does not authenticate for its row (tampered or copied from another row);
    the message says what to do and nothing about the key."""


def validate_ref(user_id: str, provider: str) -> None:
    if not user_id:
        raise InvalidKeyRequest("user_id is empty")
    if len(user_id) > MAX_USER_ID_CHARS or not _USER_ID.match(user_id):
        raise InvalidKeyRequest(
            f"user_id must be 1-{MAX_USER_ID_CHARS} characters without control characters"
        )
    if not _PROVIDER.match(provider):
        raise InvalidKeyRequest(
            "provider must be a lowercase name (letters, digits, '-', '_'; up to 32), e.g. 'runpod'"
        )


def validate_plaintext(plaintext: str) -> None:
    # The messages give the rule, not the key: no length, no characters of it.
    if not plaintext:
        raise InvalidKeyRequest("plaintext is empty")
    if not MIN_KEY_CHARS <= len(plaintext) <= MAX_KEY_CHARS:
        raise InvalidKeyRequest(f"plaintext must be {MIN_KEY_CHARS}-{MAX_KEY_CHARS} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in plaintext):
        raise InvalidKeyRequest("plaintext contains whitespace or control characters; paste the key alone")


class KeyVault:
    def __init__(self, keyring: Keyring, store: CredentialStore) -> None:
        self._keyring = keyring
        self._store = store

    async def store_key(self, user_id: str, provider: str, plaintext: str, verified: bool) -> CredentialInfo:
        validate_ref(user_id, provider)
        validate_plaintext(plaintext)
        sealed = self._keyring.seal(user_id, provider, plaintext)
        info = await self._store.upsert(user_id, provider, sealed, plaintext[-4:], verified)
        log.info(
            "key stored",
            extra={
                "user_id": user_id,
                "provider": provider,
                "key_version": info.key_version,
                "verified": verified,
            },
        )
        return info

    # key_info and reveal_key share their first lines (validate, fetch, KeyNotFound when absent)
    # but read different store rows and return different types; a helper would save two lines.
    async def key_info(self, user_id: str, provider: str) -> CredentialInfo:
        validate_ref(user_id, provider)
        info = await self._store.info(user_id, provider)
        if info is None:
            raise KeyNotFound(user_id, provider)
        return info

    async def delete_key(self, user_id: str, provider: str) -> bool:
        validate_ref(user_id, provider)
        deleted = await self._store.delete(user_id, provider)
        log.info("key deleted", extra={"user_id": user_id, "provider": provider, "deleted": deleted})
        return deleted

    async def reveal_key(self, user_id: str, provider: str) -> str:
        validate_ref(user_id, provider)
        sealed = await self._store.sealed(user_id, provider)
        if sealed is None:
            raise KeyNotFound(user_id, provider)
        try:
            return self._keyring.open(user_id, provider, sealed)
        except UnknownKeyVersion as exc:
            log.error(
                "stored key under an unconfigured master key",
                extra={"user_id": user_id, "provider": provider, "key_version": exc.key_version},
            )
            raise
        except UndecryptableKey:
            log.error(
                "stored key failed authentication",
                extra={"user_id": user_id, "provider": provider, "key_version": sealed.key_version},
            )
            raise KeyUnreadable(
                f"the stored {provider} key for user {user_id} cannot be decrypted: it was not "
                "encrypted for this user and provider, or its master key is wrong; store the key again"
            ) from None

    async def rotate(self) -> RotationCounts:
        """Re-encrypt every row under the current master key. Idempotent: rows already under
        it are left alone; rows that cannot be read are left as they are and counted."""

        def reseal(row: StoredCredential) -> SealedKey | None:
            try:
                plaintext = self._keyring.open(row.user_id, row.provider, row.sealed)
            except (UnknownKeyVersion, UndecryptableKey):
                log.warning(
                    "cannot rotate a stored key: it does not decrypt",
                    extra={
                        "user_id": row.user_id,
                        "provider": row.provider,
                        "key_version": row.sealed.key_version,
                    },
                )
                return None
            return self._keyring.seal(row.user_id, row.provider, plaintext)

        counts = await self._store.reseal_all(self._keyring.current.version, reseal)
        log.info(
            "rotation finished",
            extra={
                "rotated": counts.rotated,
                "already_current": counts.already_current,
                "unreadable": len(counts.unreadable),
                "key_version": self._keyring.current.version,
            },
        )
        return counts
