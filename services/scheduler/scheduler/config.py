"""The scheduler's settings, read from environment variables (see docs/services.md)."""

from __future__ import annotations

import os
import posixpath
import socket
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from service_runtime.callers import checked_caller_tokens, require_caller_tokens_off_loopback
from service_runtime.settings import ServiceSettings, host_port


def checked_tracking_url(value: str) -> str:
    """An http(s) URL without credentials in it (a token goes in its own secret setting, never in a
    URL that is shown and logged); the trailing slash dropped."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "expected an http:// or https:// URL (MLflow is reached through its REST API: a file:, "
            "sqlite: or databricks URI cannot be used)"
        )
    if parts.username or parts.password:
        raise ValueError("must not contain a user name or password; give the token separately")
    return value.strip().rstrip("/")


ProviderName = Literal["local", "modal", "runpod"]


class Settings(ServiceSettings):
    service_name = "scheduler"

    scheduler_host: str = "127.0.0.1"
    scheduler_port: int = Field(default=50051, ge=0, le=65535)
    scheduler_metrics_port: int = Field(default=9091, ge=-1, le=65535)
    # Who may call the scheduler (name=token,...: the gateway's SCHEDULER_TOKEN);
    # unset: anyone, on loopback only.
    scheduler_caller_tokens: SecretStr | None = None
    # Sent to the compute services (their COMPUTE_CALLER_TOKENS lists it as "scheduler").
    compute_token: SecretStr | None = None

    _check_callers = field_validator("scheduler_caller_tokens")(checked_caller_tokens)
    # Unset caller tokens off loopback refuse to start unless this is true (service_runtime.callers).
    allow_any_caller: bool = False

    @model_validator(mode="after")
    def _callers_checked_off_loopback(self) -> Settings:
        require_caller_tokens_off_loopback(
            "SCHEDULER_CALLER_TOKENS",
            self.scheduler_caller_tokens,
            "SCHEDULER_HOST",
            self.scheduler_host,
            self.allow_any_caller,
        )
        return self

    @field_validator("scheduler_webhook_base_url")
    @classmethod
    def _webhook_base(cls, value: str) -> str:
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.netloc or parts.query):
            raise ValueError("must be the gateway's public http(s) base URL, e.g. https://dash.example.org")
        return value.rstrip("/")

    database_url: SecretStr
    hosted_provider: ProviderName = "local"
    compute_local_addr: str = "127.0.0.1:50053"
    compute_modal_addr: str = ""
    compute_runpod_addr: str = ""
    # Polls of a job come this often right after its submit and while it makes progress, then
    # slow down (x1.5 each unchanged poll) to scheduler_poll_max_interval_s while it waits.
    scheduler_poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    scheduler_poll_max_interval_s: float = Field(default=10.0, gt=0, le=600)
    # Status calls in flight per provider, and how many refusals in a row (an answer that is
    # not retryable: a removed key, a missing endpoint) fail a job with the provider's words.
    # The gateway's public base URL as RunPod and Modal workers can reach it (e.g.
    # https://dash.example.org). Each RunPod job is then sent with a webhook there
    # (/api/webhooks/runpod/{job id}/{secret}) that makes its next poll due at once, and every
    # worker that uploads to the store asks there for each file's URL, of that file's exact size
    # (/api/uploads/{job id}/{secret}; scheduler.uploads). Empty: polling only, and upload URLs
    # minted at dispatch, not bounded in size (docs/services.md, "Uploads bounded in size").
    scheduler_webhook_base_url: str = ""
    scheduler_poll_concurrency: int = Field(default=16, ge=1, le=1000)
    scheduler_poll_max_failures: int = Field(default=5, ge=1, le=1000)
    # A sharded experiment's index shard that fails (its worker died, its provider reported a
    # failure) runs again alone this many times before the experiment fails (scheduler.graph).
    scheduler_shard_retries: int = Field(default=2, ge=0, le=10)
    # A failed shard's next attempt waits this long after the failure, doubling with each
    # attempt (5 s, 10 s, 20 s, ...), so a provider outage does not spend every attempt at once.
    scheduler_shard_retry_backoff_s: float = Field(default=5.0, ge=0, le=600)
    # Submits in flight per provider on one replica (the dispatcher's bound).
    scheduler_dispatch_concurrency: int = Field(default=8, ge=1, le=1000)
    # Database connections of one replica's pool (the LISTEN connection is one more), and how
    # long a statement waits for a free one before it fails (readiness then goes NOT_SERVING).
    scheduler_db_pool_size: int = Field(default=8, ge=2, le=100)
    scheduler_db_acquire_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # Longest wait between retries while a provider or the database is unreachable.
    scheduler_retry_max_s: float = Field(default=30.0, gt=0, le=600)
    scheduler_db_check_interval_s: float = Field(default=5.0, gt=0, le=300)
    # WatchJob streams one user may hold open on one replica (the gateways' streams together).
    scheduler_max_watches_per_user: int = Field(default=100, ge=1)
    # The job gauges count every job row: refreshed by the health check at most this often.
    scheduler_job_gauges_interval_s: float = Field(default=60.0, ge=0)
    scheduler_provider_timeout_s: float = Field(default=60.0, gt=0, le=600)
    scheduler_shutdown_grace_s: float = Field(default=10.0, ge=0, le=300)
    # How long a provider may keep failing to hand over a ready result before the job fails.
    scheduler_result_deadline_s: float = Field(default=600.0, gt=0, le=86400)
    # How long one check of a job's uploaded files retries a store that fails without a definite
    # answer (scheduler.uploads), and how long such checks may keep failing before the job fails
    # (the job stays running meanwhile; its files are never deleted for it; counted by the
    # replica following the job).
    scheduler_verify_deadline_s: float = Field(default=300.0, gt=0, le=86400)
    scheduler_store_deadline_s: float = Field(default=6 * 3600.0, gt=0, le=7 * 86400)
    # Tries per artifact when moving it into the store, and the deadline of one transfer.
    scheduler_artifact_attempts: int = Field(default=3, ge=1, le=10)
    scheduler_artifact_timeout_s: float = Field(default=1800.0, gt=0, le=86400)
    # Lifetime of the presigned PUT URLs a RunPod or Modal worker uploads a job's files with: they
    # are used at the end of the run, so this outlives RunPod's whole ttl (RUNPOD_JOB_TTL_S, 24 h:
    # queue wait and run together; compute-runpod keeps the ttl within it) and Modal's timeout.
    # (Tests shorten it to seconds.)
    scheduler_upload_url_ttl_s: int = Field(default=25 * 3600, ge=1, le=7 * 24 * 3600)
    # Uploads asked for at upload time (scheduler.uploads.grant_upload): the largest file a job may
    # upload (S3's limit for one PUT is 5 GiB; a merge's default 5 GB weight shards fit), what a
    # job's files may add up to (a 12B model's merged bf16 weights are about 24 GB; raise it to
    # 60 GB to offer merges of 27B models), how long each such URL lives, and whether it also
    # signs the file's sha256 (x-amz-checksum-sha256, which S3, R2 and MinIO check; turn it off
    # for a store that refuses the header).
    scheduler_upload_max_file_bytes: int = Field(default=5 * 1024**3, ge=1, le=5 * 1024**3)
    scheduler_upload_max_job_bytes: int = Field(default=32_000_000_000, ge=1)
    scheduler_upload_grant_ttl_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    scheduler_upload_checksum: bool = True
    # A RunPod submit whose answer was lost (compute-runpod's UNKNOWN) is never sent again while
    # a worker may still claim it: the scheduler waits for the worker's claim until the upload
    # URLs minted for that call (the claim's among them) have expired plus this margin (a claim
    # PUT in flight at expiry), and only then, with no claim, submits it again.
    scheduler_claim_margin_s: float = Field(default=300.0, ge=0, le=86400)
    # Artifacts of jobs finished longer ago are deleted (the job and its small result stay);
    # 0 keeps them forever. The sweep runs every scheduler_retention_sweep_s.
    artifact_retention_days: float = Field(default=30.0, ge=0, le=36500)
    scheduler_retention_sweep_s: float = Field(default=3600.0, gt=0, le=86400)
    # Replicas: each follows the jobs it holds a lease on, renewed every third of the lease; a
    # dead replica's jobs are taken over once its leases expire. The id names this replica in
    # the jobs table (a stable one, e.g. the pod name, reclaims its own jobs at once on restart).
    scheduler_replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", min_length=1, max_length=200
    )
    scheduler_lease_s: float = Field(default=15.0, ge=0.3, le=600)
    # Where a hosted job's model, when not in the catalog, is sized from its config.json
    # (scheduler.hub_models); the variable the Hugging Face libraries read. A mirror works too.
    hf_endpoint: str = "https://huggingface.co"
    scheduler_hub_timeout_s: float = Field(default=5.0, gt=0, le=60)
    # Admission limits per user (0 = no limit); only the active-jobs cap applies to BYOK jobs.
    hosted_max_active_jobs: int = Field(default=3, ge=0)
    byok_max_active_jobs: int = Field(default=10, ge=0)
    hosted_max_submissions_per_hour: int = Field(default=20, ge=0)
    hosted_gpu_seconds_per_month: float = Field(default=36_000.0, ge=0)
    hosted_max_job_time_s: float = Field(default=7_200.0, ge=0)
    hosted_max_job_cost_usd: float = Field(default=10.0, ge=0)
    # Comma-separated absolute directories under which hosted jobs may name a local model.
    allowed_model_dirs: str = ""
    # Experiment tracking (scheduler/tracking.py): the operator's MLflow and W&B, which every
    # experiment is logged to unless its researcher set their own in Settings. The names are the
    # ones MLflow and W&B read themselves.
    mlflow_tracking_uri: str = ""
    mlflow_tracking_token: SecretStr | None = None
    mlflow_experiment_name: str = Field(default="influence-dashboard", min_length=1, max_length=500)
    wandb_project: str = Field(default="", max_length=128)
    wandb_entity: str = Field(default="", max_length=128)
    wandb_api_key: SecretStr | None = None
    wandb_base_url: str = ""
    # offline: W&B runs are written under wandb_dir and never sent (tests; `wandb sync` sends them);
    # disabled: no W&B export at all (W&B's own values; dryrun is W&B's old name for offline).
    wandb_mode: Literal["online", "offline", "disabled", "dryrun"] = "online"
    wandb_dir: str = ".data/wandb"
    # The dashboard's public address: the trackers link each run to its results and files there.
    tracking_dashboard_url: str = "http://127.0.0.1:8080"
    # Tries per experiment (a tracker that is down is retried, backing off from 30 s), the
    # deadline of one export, and how often a replica looks for experiments to export.
    scheduler_tracking_attempts: int = Field(default=5, ge=1, le=50)
    scheduler_tracking_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    scheduler_tracking_interval_s: float = Field(default=5.0, gt=0, le=3600)
    # keyvault, for a researcher's own W&B key and MLflow token (it lets "scheduler" reveal only those).
    keyvault_addr: str = "127.0.0.1:50052"
    keyvault_token: SecretStr = SecretStr("")

    @field_validator("mlflow_tracking_uri", "wandb_base_url", "tracking_dashboard_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return checked_tracking_url(value) if value.strip() else ""

    @field_validator("compute_local_addr", "compute_modal_addr", "compute_runpod_addr", "keyvault_addr")
    @classmethod
    def _address(cls, value: str) -> str:
        return host_port(value) if value.strip() else ""

    @field_validator("allowed_model_dirs")
    @classmethod
    def _model_dirs(cls, value: str) -> str:
        roots = [root.strip() for root in value.split(",") if root.strip()]
        for root in roots:
            if not root.startswith("/") or posixpath.normpath(root) != root.rstrip("/") or root == "/":
                raise ValueError(f"expected absolute, normalised directories other than /, got {root!r}")
        return ",".join(root.rstrip("/") for root in roots)

    @property
    def model_dir_roots(self) -> tuple[str, ...]:
        return tuple(root for root in self.allowed_model_dirs.split(",") if root)

    @field_validator("database_url")
    @classmethod
    def _dsn(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("postgres://", "postgresql://")):
            raise ValueError("expected a postgresql:// DSN")
        return value

    def provider_address(self, provider: ProviderName) -> str:
        """The configured address of ``provider``'s compute service ('' when not configured)."""
        return {
            "local": self.compute_local_addr,
            "modal": self.compute_modal_addr,
            "runpod": self.compute_runpod_addr,
        }[provider]
