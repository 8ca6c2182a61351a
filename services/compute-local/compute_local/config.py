"""Settings of compute-local, read from COMPUTE_LOCAL_* environment variables (and LOG_LEVEL)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from service_runtime.callers import checked_caller_tokens, require_caller_tokens_off_loopback
from service_runtime.settings import ServiceSettings

_DEVICE_PATTERN = re.compile(r"cpu|cuda:\d+")


class Settings(ServiceSettings):
    # An empty variable means unset.
    model_config = SettingsConfigDict(env_ignore_empty=True, frozen=True)
    service_name = "compute-local"

    compute_local_host: str = "127.0.0.1"
    compute_local_port: int = Field(default=50053, ge=0, le=65535)
    # 0 picks a free port, -1 disables the metrics endpoint.
    compute_local_metrics_port: int = Field(default=9093, ge=-1, le=65535)
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
            "COMPUTE_LOCAL_HOST",
            self.compute_local_host,
            self.allow_any_caller,
        )
        return self

    # One slot per device: a job runs alone on its device, later jobs wait in FIFO order.
    compute_local_devices: Annotated[tuple[str, ...], NoDecode] = ("cpu",)
    # Threads a child may use for torch/OpenMP; unset means every core of this host.
    compute_local_torch_threads: int | None = Field(default=None, ge=1, le=1024)
    compute_local_work_dir: Path = Path(".data/compute-local")
    compute_local_result_retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    # How long a child gets between SIGTERM and SIGKILL (cancel and shutdown).
    compute_local_cancel_grace_s: float = Field(default=10.0, gt=0, le=600)
    # Follow-up queries: at most this many warm workers, one per experiment, each keeping its
    # fine-tuned model and gradient index in memory (docs/services.md); 0 starts one per query.
    compute_local_warm_query_workers: int = Field(default=2, ge=0, le=64)
    # A warm worker without a query for this long is retired and its memory freed.
    compute_local_warm_query_idle_s: float = Field(default=300.0, gt=0, le=86400)
    # How long in-flight RPCs get to finish on SIGTERM.
    compute_local_shutdown_grace_s: float = Field(default=5.0, ge=0, le=600)

    @field_validator("compute_local_devices", mode="before")
    @classmethod
    def _parse_devices(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        devices = tuple(part.strip() for part in value.split(",") if part.strip())
        if not devices:
            raise ValueError("lists no device; use e.g. 'cpu' or 'cuda:0,cuda:1'")
        return devices

    @field_validator("compute_local_devices")
    @classmethod
    def _check_devices(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for device in value:
            if not _DEVICE_PATTERN.fullmatch(device):
                raise ValueError(f"{device!r} is not a device; use 'cpu' or 'cuda:<index>'")
        duplicates = sorted({d for d in value if value.count(d) > 1})
        if duplicates:
            raise ValueError(f"lists {', '.join(duplicates)} more than once")
        return value

    @property
    def address(self) -> str:
        return f"{self.compute_local_host}:{self.compute_local_port}"

    @property
    def child_threads(self) -> int:
        return self.compute_local_torch_threads or os.cpu_count() or 1
