"""The settings base every service derives from: one naming convention, shared validators, one
error message and one exit behaviour on a bad setting.

Convention: a field's name is its environment variable, lower-cased (``KEYVAULT_PORT`` ->
``keyvault_port``); names are matched without regard to case and carry no prefix. A bad value
refuses to start with one line naming every bad variable and none of the values (inputs are
hidden from validation errors, so a secret never reaches a log).
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, ClassVar, Self

from pydantic import AfterValidator, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from service_runtime.logs import configure_logging

log = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The exit status of a process refused for a bad setting (1 stays "failed while running").
EXIT_BAD_SETTINGS = 2
_ADDRESS = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the environment variable."""


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


LogLevel = Annotated[str, AfterValidator(_log_level)]


def host_port(value: str) -> str:
    """Check one ``host:port`` address (IPv6 hosts in brackets); returns it stripped."""
    value = value.strip()
    if not _ADDRESS.match(value):
        raise ValueError(f"expected host:port, got {value!r}")
    return value


class ServiceSettings(BaseSettings):
    """Base of every service's ``Settings``; ``service_name`` opens the error message."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", hide_input_in_errors=True
    )
    service_name: ClassVar[str] = "service"

    log_level: LogLevel = "INFO"

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Build the settings from the environment (``overrides`` win), or raise SettingsError
        naming every bad variable."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise SettingsError(describe_settings_error(cls, exc)) from None

    @classmethod
    def load_or_exit(cls, **overrides: Any) -> Self:
        """``load`` for an entry point: a bad setting logs one error line (JSON on stderr, as
        every later line) and exits with EXIT_BAD_SETTINGS."""
        try:
            return cls.load(**overrides)
        except SettingsError as exc:
            configure_logging(cls.service_name)
            log.error("refusing to start: %s", exc)
            raise SystemExit(EXIT_BAD_SETTINGS) from None


def describe_settings_error(settings: type[ServiceSettings], exc: ValidationError) -> str:
    """One line: ``invalid <service> settings: VARIABLE: problem; ...``. A missing variable's
    message adds the field's description, which says what to set it to."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "missing":
            message = "is required but not set"
            description = settings.model_fields[field].description if field in settings.model_fields else None
            if description:
                message += f"; expected {description}"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{field.upper()}: {message}" if field else message)
    return f"invalid {settings.service_name} settings: " + "; ".join(problems)
