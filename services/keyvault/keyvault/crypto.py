"""AES-256-GCM sealing of provider keys under a master key.

Each encryption uses a fresh 96-bit nonce from ``os.urandom(12)``. The associated data binds
the ciphertext to its row and its master key: ``user_id``, ``provider`` and ``key_version``.
A ciphertext copied to another user's (or provider's) row, or relabelled with another
version, fails authentication and is reported as UndecryptableKey, which says nothing about
the key.

Key versions: a key's version is derived from the master key that encrypted it, a 31-bit
fingerprint (SHA-256 over a domain-separation label and the 32 key bytes, mapped to
1..2**31-1 so it fits the proto's int32 and is never the proto default 0). So the version
alone identifies the master key, and no version number has to be configured or kept in step
with the secret. Rotation: generate a new secret, move the old one into
RUNPOD_KEY_ENCRYPTION_OLD_SECRETS, restart, run ``python -m keyvault rotate``, and once it
reports nothing left to rotate, drop the old secret. 31 bits of a hash of a random 256-bit key
tell nothing about the key; two configured master keys with the same fingerprint refuse to
start.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY_BYTES = 32
NONCE_BYTES = 12
_VERSION_LABEL = b"influence-dashboard/keyvault/master-key-version/v1\x00"
_VERSION_SPACE = 2**31 - 1


class UndecryptableKey(Exception):
    """The stored ciphertext does not authenticate for this row (tampered, copied from another
    row, or a different master key with the same version)."""


class UnknownKeyVersion(Exception):
    """The row was encrypted under a master key that is not configured."""

    def __init__(self, key_version: int) -> None:
        super().__init__(
            f"the stored key was encrypted with master key version {key_version}, which is not "
            "configured; add that secret to RUNPOD_KEY_ENCRYPTION_OLD_SECRETS"
        )
        self.key_version = key_version


def _fingerprint(key: bytes) -> bytes:
    return hashlib.sha256(_VERSION_LABEL + key).digest()


def version_of_fingerprint(fingerprint: bytes) -> int:
    return int.from_bytes(fingerprint[:8], "big") % _VERSION_SPACE + 1


@dataclass(frozen=True)
class MasterKey:
    version: int
    fingerprint: bytes
    cipher: AESGCM = field(repr=False)

    @classmethod
    def from_bytes(cls, key: bytes) -> MasterKey:
        if len(key) != MASTER_KEY_BYTES:
            raise ValueError(f"a master key must be {MASTER_KEY_BYTES} bytes, got {len(key)}")
        fingerprint = _fingerprint(key)
        return cls(version=version_of_fingerprint(fingerprint), fingerprint=fingerprint, cipher=AESGCM(key))


@dataclass(frozen=True)
class SealedKey:
    ciphertext: bytes
    nonce: bytes
    key_version: int


def associated_data(user_id: str, provider: str, key_version: int) -> bytes:
    # JSON of a list is unambiguous for any strings (no separator an id could contain).
    return json.dumps(["keyvault/v1", user_id, provider, key_version]).encode()


class Keyring:
    """The current master key (encrypts) and older ones (decrypt only), by version."""

    def __init__(self, current: MasterKey, old: Iterable[MasterKey] = ()) -> None:
        self.current = current
        self._by_version: dict[int, MasterKey] = {current.version: current}
        for key in old:
            existing = self._by_version.get(key.version)
            # The same secret listed twice is harmless; two distinct secrets with one version
            # would make versions ambiguous.
            if existing is not None and existing.fingerprint != key.fingerprint:
                raise ValueError(f"two master keys share version {key.version}; generate a new secret")
            self._by_version.setdefault(key.version, key)

    def seal(self, user_id: str, provider: str, plaintext: str) -> SealedKey:
        nonce = os.urandom(NONCE_BYTES)
        version = self.current.version
        ciphertext = self.current.cipher.encrypt(
            nonce, plaintext.encode(), associated_data(user_id, provider, version)
        )
        return SealedKey(ciphertext=ciphertext, nonce=nonce, key_version=version)

    def open(self, user_id: str, provider: str, sealed: SealedKey) -> str:
        key = self._by_version.get(sealed.key_version)
        if key is None:
            raise UnknownKeyVersion(sealed.key_version)
        if len(sealed.nonce) != NONCE_BYTES:
            raise UndecryptableKey()
        try:
            data = key.cipher.decrypt(
                sealed.nonce,
                sealed.ciphertext,
                associated_data(user_id, provider, sealed.key_version),
            )
        except InvalidTag:
            raise UndecryptableKey() from None
        return data.decode()
