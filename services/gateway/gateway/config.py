"""The gateway's settings, read from environment variables (names in docs/services.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from gpu_core.formats import ReadBudget
from gpu_core.schemas import SpecLimits
from service_runtime.settings import ServiceSettings, host_port

# HS256 keys shorter than the hash output make brute-forcing a token's signature practical.
MIN_HMAC_SECRET_CHARS = 32
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class Settings(ServiceSettings):
    service_name = "gateway"

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    # /metrics on its own port, for Prometheus inside the cluster: not through the public app.
    gateway_metrics_port: int = Field(default=9090, ge=-1, le=65535)
    scheduler_addr: str = "127.0.0.1:50051"
    keyvault_addr: str = "127.0.0.1:50052"
    keyvault_token: SecretStr | None = None
    # Sent to the scheduler (its SCHEDULER_CALLER_TOKENS lists it as "gateway").
    scheduler_token: SecretStr | None = None
    # Who serves the hosted backend (a shared variable): the model catalog prices it.
    hosted_provider: Literal["local", "modal", "runpod"] = "local"

    auth_mode: Literal["local", "jwt"] = "local"
    # Local sign-in on an address other machines reach lets anyone act as any user: only with this.
    gateway_allow_insecure_local_sign_in: bool = False
    jwt_secret: SecretStr | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    gateway_local_jwt_secret: SecretStr | None = None
    gateway_local_token_ttl_s: int = Field(default=12 * 3600, ge=60)

    gateway_max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    gateway_max_train_examples: int = Field(default=10_000, ge=1)
    gateway_max_eval_examples: int = Field(default=1_000, ge=1)
    gateway_max_text_chars: int = Field(default=20_000, ge=1)
    # An uploaded data file's decoded rows (Parquet expands far past its size) and JSON nesting.
    gateway_max_decoded_file_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    gateway_max_json_depth: int = Field(default=64, ge=8)
    # Stored datasets (POST /api/datasets): the file's size and its examples. The inline limits
    # above stay for examples carried in a spec.
    gateway_max_dataset_bytes: int = Field(default=4 * 1024**3, ge=1024)
    gateway_max_dataset_train_examples: int = Field(default=1_000_000, ge=1)
    gateway_max_dataset_eval_examples: int = Field(default=100_000, ge=1)

    gateway_rpc_timeout_s: float = Field(default=30.0, gt=0)
    gateway_sse_heartbeat_s: float = Field(default=15.0, gt=0)
    # Progress streams (SSE) one user may hold open on this gateway at once; more are a 429.
    gateway_max_streams_per_user: int = Field(default=20, ge=1)
    # The RunPod behind compute-runpod is devstack's fake (DEVSTACK_FAKE_RUNPOD=1 make run).
    gateway_runpod_simulated: bool = False

    @field_validator("scheduler_addr", "keyvault_addr")
    @classmethod
    def _host_port(cls, value: str, info: ValidationInfo) -> str:
        # Scheduler replicas may be listed one by one: ip:port,ip:port.
        addresses = value.split(",") if info.field_name == "scheduler_addr" else [value]
        for address in addresses:
            host_port(address)
        return value

    @field_validator("jwt_jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value

    @field_validator("jwt_secret", "gateway_local_jwt_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_HMAC_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_HMAC_SECRET_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _local_sign_in_on_loopback(self) -> Settings:
        if (
            self.auth_mode == "local"
            and self.gateway_host not in LOOPBACK_HOSTS
            and not self.gateway_allow_insecure_local_sign_in
        ):
            raise ValueError(
                f"AUTH_MODE=local lets anyone sign in as any user, and GATEWAY_HOST={self.gateway_host} "
                "is reachable from other machines: use AUTH_MODE=jwt, a loopback GATEWAY_HOST, or "
                "GATEWAY_ALLOW_INSECURE_LOCAL_SIGN_IN=true for a trusted network"
            )
        return self

    @model_validator(mode="after")
    def _jwt_mode_complete(self) -> Settings:
        if self.auth_mode != "jwt":
            return self
        if self.jwt_secret is None and self.jwt_jwks_url is None:
            raise ValueError("AUTH_MODE=jwt needs JWT_SECRET or JWT_JWKS_URL")
        if not self.jwt_issuer:
            raise ValueError("AUTH_MODE=jwt needs JWT_ISSUER")
        if not self.jwt_audience:
            raise ValueError("AUTH_MODE=jwt needs JWT_AUDIENCE")
        return self

    @property
    def spec_limits(self) -> SpecLimits:
        return SpecLimits(
            max_train_examples=self.gateway_max_train_examples,
            max_eval_examples=self.gateway_max_eval_examples,
            max_text_chars=self.gateway_max_text_chars,
        )

    @property
    def dataset_limits(self) -> SpecLimits:
        return SpecLimits(
            max_train_examples=self.gateway_max_dataset_train_examples,
            max_eval_examples=self.gateway_max_dataset_eval_examples,
            max_text_chars=self.gateway_max_text_chars,
        )

    @property
    def read_budget(self) -> ReadBudget:
        return ReadBudget(
            max_decoded_bytes=self.gateway_max_decoded_file_bytes, max_depth=self.gateway_max_json_depth
        )
