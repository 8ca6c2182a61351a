"""Settings of compute-modal, read from environment variables (docs/services.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from cost_model.estimate import DEFAULT_MODAL_MAX_CONTAINERS
from gpu_core.schemas import MAX_SHARDS
from service_runtime.callers import checked_caller_tokens, require_caller_tokens_off_loopback
from service_runtime.settings import ServiceSettings, host_port


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(frozen=True)
    service_name = "compute-modal"

    compute_modal_host: str = "127.0.0.1"
    compute_modal_port: int = Field(default=50055, ge=0, le=65535)
    # 0 picks a free port, -1 disables the metrics endpoint.
    compute_modal_metrics_port: int = Field(default=9095, ge=-1, le=65535)
    # Who may call this service (name=token,...: the scheduler's COMPUTE_TOKEN);
    # unset: anyone, on loopback only.
    compute_caller_tokens: SecretStr | None = None

    _check_callers = field_validator("compute_caller_tokens")(checked_caller_tokens)
    # Unset caller tokens off loopback refuse to start unless this is true (service_runtime.callers).
    allow_any_caller: bool = False

    @model_validator(mode="after")
    def _callers_checked_off_loopback(self) -> Settings:
        require_caller_tokens_off_loopback(
            "COMPUTE_CALLER_TOKENS",
            self.compute_caller_tokens,
            "COMPUTE_MODAL_HOST",
            self.compute_modal_host,
            self.allow_any_caller,
        )
        return self

    shutdown_grace_s: float = Field(default=10.0, ge=0)

    # The operator's Modal account. Missing tokens are reported by VerifyCredentials and Submit.
    modal_token_id: SecretStr = SecretStr("")
    modal_token_secret: SecretStr = SecretStr("")
    modal_environment: str = "main"
    modal_app_name: str = "influence-dashboard"
    modal_function_name: str = "run_experiment_job"
    modal_progress_dict: str = "influence-progress"
    # The deployed function's max_containers (deploy with the same MODAL_MAX_CONTAINERS): how
    # many of the operator's GPUs Modal runs at once, which estimates count shard jobs by.
    modal_max_containers: int = Field(default=DEFAULT_MODAL_MAX_CONTAINERS, ge=1, le=MAX_SHARDS)
    # Keyvault, for each researcher's own Hugging Face token (passed to the function per job).
    # Either empty: no per-user tokens; gated models then load with the app's HF secret.
    keyvault_addr: str = ""
    keyvault_token: SecretStr = SecretStr("")
    # "inprocess" runs the Modal app's function body in this process (tests, offline demos).
    compute_modal_backend: Literal["modal", "inprocess"] = "modal"
    # How often readiness re-checks that Modal answers and the app is deployed.
    compute_modal_health_interval_s: float = Field(default=60.0, gt=0)

    @field_validator("modal_function_name")
    @classmethod
    def _function_name(cls, value: str) -> str:
        if not value or "." in value:
            raise ValueError("must be a function name without '.'")
        return value

    @field_validator("keyvault_addr")
    @classmethod
    def _keyvault_addr(cls, value: str) -> str:
        return host_port(value) if value else value

    @property
    def address(self) -> str:
        return f"{self.compute_modal_host}:{self.compute_modal_port}"
