"""Settings of compute-modal, read from environment variables (docs/services.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """A setting has a bad value; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=True, extra="ignore", frozen=True)

    COMPUTE_MODAL_HOST: str = "127.0.0.1"
    COMPUTE_MODAL_PORT: int = Field(default=50055, ge=0, le=65535)
    # 0 picks a free port, -1 disables the metrics endpoint.
    COMPUTE_MODAL_METRICS_PORT: int = Field(default=9095, ge=-1, le=65535)
    LOG_LEVEL: str = "INFO"
    SHUTDOWN_GRACE_S: float = Field(default=10.0, ge=0)

    # The operator's Modal account. Missing tokens are reported by VerifyCredentials and Submit.
    MODAL_TOKEN_ID: SecretStr = SecretStr("")
    MODAL_TOKEN_SECRET: SecretStr = SecretStr("")
    MODAL_ENVIRONMENT: str = "main"
    MODAL_APP_NAME: str = "influence-dashboard"
    MODAL_FUNCTION_NAME: str = "run_experiment_job"
    MODAL_PROGRESS_DICT: str = "influence-progress"
    # "inprocess" runs the Modal app's function body in this process (tests, offline demos).
    COMPUTE_MODAL_BACKEND: Literal["modal", "inprocess"] = "modal"
    # How often readiness re-checks that Modal answers and the app is deployed.
    COMPUTE_MODAL_HEALTH_INTERVAL_S: float = Field(default=60.0, gt=0)

    @field_validator("LOG_LEVEL")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value.upper()

    @field_validator("MODAL_FUNCTION_NAME")
    @classmethod
    def _function_name(cls, value: str) -> str:
        if not value or "." in value:
            raise ValueError("must be a function name without '.'")
        return value

    @property
    def address(self) -> str:
        return f"{self.COMPUTE_MODAL_HOST}:{self.COMPUTE_MODAL_PORT}"


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment plus ``overrides``; a bad value raises SettingsError naming
    the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in error['loc'])}: {str(error['msg']).removeprefix('Value error, ')}"
            for error in exc.errors()
        ]
        raise SettingsError("; ".join(problems)) from None
