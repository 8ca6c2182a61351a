"""Settings of compute-runpod, read from environment variables (docs/services.md)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=True, extra="ignore")

    COMPUTE_RUNPOD_HOST: str = "127.0.0.1"
    COMPUTE_RUNPOD_PORT: int = Field(default=50054, ge=0, le=65535)
    COMPUTE_RUNPOD_METRICS_PORT: int = Field(default=9094, ge=-1, le=65535)
    LOG_LEVEL: str = "INFO"
    SHUTDOWN_GRACE_S: float = Field(default=10.0, ge=0)

    KEYVAULT_ADDR: str = "127.0.0.1:50052"
    KEYVAULT_TOKEN: SecretStr = SecretStr("")

    RUNPOD_REST_BASE_URL: str = "https://api.runpod.io/v2"
    RUNPOD_JOB_BASE_URL: str = "https://api.runpod.ai/v2"
    RUNPOD_GRAPHQL_URL: str = "https://api.runpod.io/graphql"
    RUNPOD_TEMPLATE_ID: str = ""
    # The operator's account, used for the hosted tier (Account.hosted) only.
    RUNPOD_API_KEY: SecretStr = SecretStr("")
    RUNPOD_HOSTED_ENDPOINT_ID: str = ""

    RUNPOD_ENDPOINT_NAME: str = "influence-dashboard"
    RUNPOD_DEFAULT_GPU_POOLS: list[str] = Field(default_factory=lambda: ["AMPERE_80"], min_length=1)
    RUNPOD_WORKERS_MAX: int = Field(default=1, ge=1, le=100)
    RUNPOD_IDLE_TIMEOUT_S: int = Field(default=300, ge=1, le=3600)
    RUNPOD_EXECUTION_TIMEOUT_S: int = Field(default=7200, ge=5, le=7 * 24 * 3600)
    # policy.ttl counts from submission, queue time included; expiry mid-run deletes the job.
    RUNPOD_JOB_TTL_S: int = Field(default=24 * 3600, ge=10, le=7 * 24 * 3600)
    # How long a job may sit IN_QUEUE while RunPod has no GPU for it before we give up.
    RUNPOD_QUEUE_TIMEOUT_S: float = Field(default=600.0, gt=0)
    # How long one GetStatus call may hold RunPod's /stream long poll (RunPod's minimum is 1 s).
    RUNPOD_STREAM_WAIT_MS: int = Field(default=1000, ge=1000, le=300_000)

    # Without an artifact store reachable from RunPod (the embedded default), a job's files come
    # back base64 inside its output, which RunPod caps at 10 MB: files above this are refused.
    RUNPOD_INLINE_ARTIFACTS_MAX_BYTES: int = Field(default=5_000_000, ge=0, le=6_000_000)

    RUNPOD_HTTP_TIMEOUT_S: float = Field(default=30.0, gt=0)
    RUNPOD_MAX_ATTEMPTS: int = Field(default=5, ge=1, le=20)
    RUNPOD_RETRY_BASE_S: float = Field(default=0.5, ge=0)
    RUNPOD_RETRY_MAX_WAIT_S: float = Field(default=30.0, ge=0)

    # A balance at or below zero is refused; below this a verified key carries a warning.
    RUNPOD_LOW_BALANCE_USD: float = Field(default=5.0, ge=0)

    @field_validator("RUNPOD_REST_BASE_URL", "RUNPOD_JOB_BASE_URL", "RUNPOD_GRAPHQL_URL")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("KEYVAULT_ADDR")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("must be host:port")
        return value

    @field_validator("LOG_LEVEL")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return value.upper()

    @model_validator(mode="after")
    def _ttl_covers_execution(self) -> Settings:
        if self.RUNPOD_JOB_TTL_S < self.RUNPOD_EXECUTION_TIMEOUT_S:
            raise ValueError(
                "RUNPOD_JOB_TTL_S must be at least RUNPOD_EXECUTION_TIMEOUT_S "
                "(RunPod deletes a job whose ttl expires mid-run)"
            )
        return self
