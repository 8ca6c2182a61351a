"""keyvault settings, read from environment variables (see docs/services.md).

A bad value refuses to start with a message naming the variable (service_runtime.settings).
Secret values never appear in those messages: inputs are hidden from validation errors and
every check words its own message without the value.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator

from keyvault.crypto import MASTER_KEY_BYTES, Keyring, MasterKey
from service_runtime.callers import CallerTokens, parse_caller_tokens
from service_runtime.settings import ServiceSettings, SettingsError

SECRET_HINT = "32 random bytes, base64 (e.g. `openssl rand -base64 32`)"


def decode_master_key(encoded: str, what: str) -> bytes:
    """Decode one base64 master key; ``what`` names it in the error (never the value)."""
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64; expected {SECRET_HINT}") from None
    if len(raw) != MASTER_KEY_BYTES:
        raise ValueError(
            f"{what} decodes to {len(raw)} bytes; expected exactly {MASTER_KEY_BYTES} ({SECRET_HINT})"
        )
    return raw


class Settings(ServiceSettings):
    service_name = "keyvault"

    keyvault_host: str = "127.0.0.1"
    keyvault_port: int = Field(50052, ge=0, le=65535)
    # 0 picks a free port, -1 disables the metrics server.
    keyvault_metrics_port: int = Field(9092, ge=-1, le=65535)
    database_url: SecretStr
    runpod_key_encryption_secret: SecretStr = Field(description=SECRET_HINT)
    # Comma-separated base64 master keys that encrypted rows before the current one.
    runpod_key_encryption_old_secrets: SecretStr = SecretStr("")
    keyvault_caller_tokens: SecretStr
    # How often readiness re-checks the database.
    keyvault_readiness_interval_s: float = Field(5.0, gt=0, le=300)
    keyvault_shutdown_grace_s: float = Field(5.0, ge=0, le=300)

    @field_validator("database_url")
    @classmethod
    def _check_dsn(cls, value: SecretStr) -> SecretStr:
        if not re.match(r"^postgres(ql)?://", value.get_secret_value()):
            raise ValueError("must be a PostgreSQL DSN starting with postgresql:// or postgres://")
        return value

    @field_validator("runpod_key_encryption_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError(f"is empty; expected {SECRET_HINT}")
        decode_master_key(value.get_secret_value(), "the value")
        return value

    @field_validator("runpod_key_encryption_old_secrets")
    @classmethod
    def _check_old_secrets(cls, value: SecretStr) -> SecretStr:
        for position, entry in enumerate(_split(value.get_secret_value()), start=1):
            decode_master_key(entry, f"entry {position}")
        return value

    @field_validator("keyvault_caller_tokens")
    @classmethod
    def _check_tokens(cls, value: SecretStr) -> SecretStr:
        parse_caller_tokens(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _check_keyring(self) -> Self:
        self.keyring()  # a clash between master keys refuses to start as well
        return self

    @property
    def address(self) -> str:
        return f"{self.keyvault_host}:{self.keyvault_port}"

    def keyring(self) -> Keyring:
        current = MasterKey.from_bytes(
            decode_master_key(self.runpod_key_encryption_secret.get_secret_value(), "current")
        )
        old = [
            MasterKey.from_bytes(decode_master_key(entry, "old"))
            for entry in _split(self.runpod_key_encryption_old_secrets.get_secret_value())
        ]
        try:
            return Keyring(current, old)
        except ValueError as exc:
            raise SettingsError(f"RUNPOD_KEY_ENCRYPTION_OLD_SECRETS: {exc}") from None

    def caller_tokens(self) -> CallerTokens:
        return parse_caller_tokens(self.keyvault_caller_tokens.get_secret_value())


def _split(entries: str) -> list[str]:
    return [entry.strip() for entry in entries.split(",") if entry.strip()]
