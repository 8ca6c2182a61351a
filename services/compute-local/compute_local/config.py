"""Settings of compute-local, read from COMPUTE_LOCAL_* environment variables (and LOG_LEVEL)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from service_runtime.callers import checked_caller_tokens, require_caller_tokens_off_loopback
from service_runtime.settings import ServiceSettings

_DEVICE_PATTERN = re.compile(r"cpu|cuda:\d+")


@dataclass(frozen=True)
class DeviceSlots:
    """A device, how many jobs it runs at once, and the torch threads each of its children gets."""

    device: str
    slots: int
    threads: int


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

    # One slot per GPU device and COMPUTE_LOCAL_CPU_SLOTS on "cpu"; later jobs wait in the queue.
    compute_local_devices: Annotated[tuple[str, ...], NoDecode] = ("cpu",)
    # Jobs "cpu" runs at once, each child with its share of the cores (docs/services.md: 1 by
    # default, since every running job holds its own model and training state in host memory).
    compute_local_cpu_slots: int = Field(default=1, ge=1, le=256)
    # Threads a child may use for torch/OpenMP; unset: every core of this host for a GPU job,
    # cores // COMPUTE_LOCAL_CPU_SLOTS for a CPU job.
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

    @model_validator(mode="after")
    def _cpu_slots_need_the_cpu(self) -> Settings:
        if self.compute_local_cpu_slots > 1 and "cpu" not in self.compute_local_devices:
            raise ValueError(
                f"COMPUTE_LOCAL_CPU_SLOTS is {self.compute_local_cpu_slots} but COMPUTE_LOCAL_DEVICES "
                f"({','.join(self.compute_local_devices)}) has no cpu; add cpu or set it to 1"
            )
        return self

    @property
    def address(self) -> str:
        return f"{self.compute_local_host}:{self.compute_local_port}"

    @property
    def device_slots(self) -> tuple[DeviceSlots, ...]:
        """Each device with its slots and its children's threads: a GPU runs one job at a time,
        "cpu" COMPUTE_LOCAL_CPU_SLOTS, each with an equal share of the cores (at least one)."""
        cores = os.cpu_count() or 1
        devices = []
        for device in self.compute_local_devices:
            slots = self.compute_local_cpu_slots if device == "cpu" else 1
            devices.append(
                DeviceSlots(device, slots, self.compute_local_torch_threads or max(1, cores // slots))
            )
        return tuple(devices)
