"""Settings of compute-local, read from COMPUTE_LOCAL_* environment variables (and LOG_LEVEL)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "COMPUTE_LOCAL_"
_DEVICE_PATTERN = re.compile(r"cpu|cuda:\d+")


class SettingsError(ValueError):
    """A setting has a bad value; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=50053, ge=0, le=65535)
    # 0 picks a free port, -1 disables the metrics endpoint.
    metrics_port: int = Field(default=9093, ge=-1, le=65535)
    # One slot per device: a job runs alone on its device, later jobs wait in FIFO order.
    devices: Annotated[tuple[str, ...], NoDecode] = ("cpu",)
    # Threads a child may use for torch/OpenMP; unset means every core of this host.
    torch_threads: int | None = Field(default=None, ge=1, le=1024)
    work_dir: Path = Path(".data/compute-local")
    result_retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    # How long a child gets between SIGTERM and SIGKILL (cancel and shutdown).
    cancel_grace_s: float = Field(default=10.0, gt=0, le=600)
    # How long in-flight RPCs get to finish on SIGTERM.
    shutdown_grace_s: float = Field(default=5.0, ge=0, le=600)
    log_level: str = Field(
        default="INFO", validation_alias=AliasChoices("LOG_LEVEL", "log_level")
    )

    @field_validator("devices", mode="before")
    @classmethod
    def _parse_devices(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        devices = tuple(part.strip() for part in value.split(",") if part.strip())
        if not devices:
            raise ValueError("lists no device; use e.g. 'cpu' or 'cuda:0,cuda:1'")
        return devices

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for device in value:
            if not _DEVICE_PATTERN.fullmatch(device):
                raise ValueError(f"{device!r} is not a device; use 'cpu' or 'cuda:<index>'")
        duplicates = sorted({d for d in value if value.count(d) > 1})
        if duplicates:
            raise ValueError(f"lists {', '.join(duplicates)} more than once")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"{value!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def child_threads(self) -> int:
        return self.torch_threads or os.cpu_count() or 1


def _env_name(field: str) -> str:
    return "LOG_LEVEL" if field == "log_level" else f"{ENV_PREFIX}{field.upper()}"


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build the settings from ``env`` (default: the process environment) plus ``overrides``;
    a bad value raises SettingsError naming the variable."""
    source = os.environ if env is None else env
    values: dict[str, object] = {}
    for field in Settings.model_fields:
        name = _env_name(field)
        # An empty variable means unset, as with pydantic-settings' env_ignore_empty.
        if source.get(name, "") != "":
            values[field] = source[name]
    values.update(overrides)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{_env_name(field)}: {message}")
        raise SettingsError("; ".join(problems)) from None
