"""keyvault settings, read from environment variables (see docs/services.md).

A bad value refuses to start with a message naming the variable. Secret values never appear
in those messages: inputs are hidden from validation errors and every check words its own
message without the value.
"""

from __future__ import annotations

import base64
import binascii
import re

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from keyvault.auth import CallerTokens, parse_caller_tokens
from keyvault.crypto import MASTER_KEY_BYTES, Keyring, MasterKey

SECRET_HINT = "32 random bytes, base64 (e.g. `openssl rand -base64 32`)"
_LOG_LEVELS = {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the environment variable."""


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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(hide_input_in_errors=True, extra="ignore")

    keyvault_host: str = "127.0.0.1"
    keyvault_port: int = Field(50052, ge=0, le=65535)
    # 0 picks a free port, -1 disables the metrics server.
    keyvault_metrics_port: int = Field(9092, ge=-1, le=65535)
    database_url: SecretStr
    runpod_key_encryption_secret: SecretStr
    # Comma-separated base64 master keys that encrypted rows before the current one.
    runpod_key_encryption_old_secrets: SecretStr = SecretStr("")
    keyvault_caller_tokens: SecretStr
    # How often readiness re-checks the database.
    keyvault_readiness_interval_s: float = Field(5.0, gt=0, le=300)
    keyvault_shutdown_grace_s: float = Field(5.0, ge=0, le=300)
    log_level: str = "INFO"

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

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.upper() not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(sorted(_LOG_LEVELS))}")
        return value.upper()

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


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment (``overrides`` win), or raise SettingsError
    whose message names every bad variable and none of the values."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    settings.keyring()  # a clash between master keys refuses to start as well
    return settings


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        variable = str(error["loc"][0]).upper() if error["loc"] else "settings"
        if error["type"] == "missing":
            message = "is required but not set"
            if variable.startswith("RUNPOD_KEY_ENCRYPTION"):
                message += f"; expected {SECRET_HINT}"
        else:
            message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{variable}: {message}")
    return "invalid keyvault settings: " + "; ".join(problems)


def _split(entries: str) -> list[str]:
    return [entry.strip() for entry in entries.split(",") if entry.strip()]
