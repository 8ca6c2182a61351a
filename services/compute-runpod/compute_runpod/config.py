"""Settings of compute-runpod, read from environment variables (docs/services.md)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator

from service_runtime.callers import checked_caller_tokens, require_caller_tokens_off_loopback
from service_runtime.settings import ServiceSettings, host_port


class Settings(ServiceSettings):
    service_name = "compute-runpod"

    compute_runpod_host: str = "127.0.0.1"
    compute_runpod_port: int = Field(default=50054, ge=0, le=65535)
    compute_runpod_metrics_port: int = Field(default=9094, ge=-1, le=65535)
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
            "COMPUTE_RUNPOD_HOST",
            self.compute_runpod_host,
            self.allow_any_caller,
        )
        return self

    shutdown_grace_s: float = Field(default=10.0, ge=0)

    keyvault_addr: str = "127.0.0.1:50052"
    keyvault_token: SecretStr = SecretStr("")

    runpod_rest_base_url: str = "https://api.runpod.io/v2"
    runpod_job_base_url: str = "https://api.runpod.ai/v2"
    runpod_graphql_url: str = "https://api.runpod.io/graphql"
    runpod_template_id: str = ""
    # The operator's account, used for the hosted tier (Account.hosted) only.
    runpod_api_key: SecretStr = SecretStr("")
    runpod_hosted_endpoint_id: str = ""

    runpod_endpoint_name: str = "influence-dashboard"
    runpod_default_gpu_pools: list[str] = Field(default_factory=lambda: ["AMPERE_80"], min_length=1)
    # An endpoint lists the pools that fit its job up to this multiple of the cheapest one's
    # price: more pools, fewer waits for a GPU; a narrower band, a tighter bill (costs.gpu_pools).
    runpod_pool_price_band: float = Field(default=3.0, ge=1.0, le=100.0)
    runpod_workers_max: int = Field(default=1, ge=1, le=100)
    runpod_idle_timeout_s: int = Field(default=300, ge=1, le=3600)
    # The endpoint's execution timeout: the most any one job may run. Each job's own
    # policy.executionTimeout is its estimate times the headroom, at least the minimum, at most this.
    runpod_execution_timeout_s: int = Field(default=7200, ge=5, le=7 * 24 * 3600)
    runpod_timeout_headroom: float = Field(default=2.0, ge=1.0, le=20.0)
    runpod_min_execution_timeout_s: int = Field(default=600, ge=5, le=7 * 24 * 3600)
    # policy.ttl counts from submission, queue time included; expiry mid-run deletes the job.
    runpod_job_ttl_s: int = Field(default=24 * 3600, ge=10, le=7 * 24 * 3600)
    # How long a job may sit IN_QUEUE while RunPod has no GPU for it before we give up.
    runpod_queue_timeout_s: float = Field(default=600.0, gt=0)
    # Past this wait (a cold start's length) a queued job's page says when RunPod has no GPU free
    # in its pools, looking at the endpoint's workers at most once per check interval.
    runpod_no_gpu_notice_s: float = Field(default=120.0, ge=0)
    runpod_queue_check_interval_s: float = Field(default=30.0, ge=0)
    # How long one GetStatus call may hold RunPod's /stream long poll (RunPod's minimum is 1 s).
    runpod_stream_wait_ms: int = Field(default=1000, ge=1000, le=300_000)

    # Without an artifact store reachable from RunPod (the embedded default), a job's files come
    # back base64 inside its output, which RunPod caps at 10 MB: files above this are refused.
    runpod_inline_artifacts_max_bytes: int = Field(default=5_000_000, ge=0, le=6_000_000)

    runpod_http_timeout_s: float = Field(default=30.0, gt=0)
    runpod_max_attempts: int = Field(default=5, ge=1, le=20)
    runpod_retry_base_s: float = Field(default=0.5, ge=0)
    runpod_retry_max_wait_s: float = Field(default=30.0, ge=0)

    # A balance at or below zero is refused; below this a verified key carries a warning.
    runpod_low_balance_usd: float = Field(default=5.0, ge=0)

    @field_validator("runpod_rest_base_url", "runpod_job_base_url", "runpod_graphql_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("keyvault_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return host_port(value)

    @model_validator(mode="after")
    def _ttl_covers_execution(self) -> Settings:
        if self.runpod_job_ttl_s < self.runpod_execution_timeout_s:
            raise ValueError(
                "RUNPOD_JOB_TTL_S must be at least RUNPOD_EXECUTION_TIMEOUT_S "
                "(RunPod deletes a job whose ttl expires mid-run)"
            )
        return self
