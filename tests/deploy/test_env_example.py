"""Every environment variable a service's Settings reads is documented for operators (.env.example
and INSTRUCTIONS.md), and the Kubernetes config sets only variables that some service reads."""

from __future__ import annotations

import base64
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from service_runtime.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[2]
CONFIG_MODULES = [
    "gateway.config",
    "scheduler.config",
    "keyvault.config",
    "compute_local.config",
    "compute_runpod.config",
    "compute_modal.config",
    "artifact_store.config",
]
# Read by the dev overlay's PostgreSQL image, not by a service.
POSTGRES_IMAGE_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}


def env_names(settings: type[BaseSettings]) -> set[str]:
    """The environment variables pydantic-settings reads for ``settings``' fields."""
    config = settings.model_config
    prefix = config.get("env_prefix", "")
    case_sensitive = config.get("case_sensitive", False)
    names = set()
    for field_name, field in settings.model_fields.items():
        alias = field.validation_alias or field.alias
        if isinstance(alias, AliasChoices):
            candidates = [choice for choice in alias.choices if isinstance(choice, str)]
        elif isinstance(alias, str):
            candidates = [alias]
        else:
            candidates = [prefix + field_name]
        names.update(c if case_sensitive else c.upper() for c in candidates)
    return names


def service_variables() -> dict[str, set[str]]:
    return {m: env_names(_settings_class(importlib.import_module(m))) for m in CONFIG_MODULES}


def _settings_class(module: Any) -> type[BaseSettings]:
    # A library's settings class is named for it (artifact_store.config.StoreSettings).
    return getattr(module, "Settings", None) or module.StoreSettings


def documented(path: Path) -> set[str]:
    """Variables assigned in an env file, commented-out assignments included."""
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text(), flags=re.M))


def test_settings_expose_their_variables() -> None:
    variables = service_variables()
    assert {"GATEWAY_PORT", "AUTH_MODE", "JWT_JWKS_URL"} <= variables["gateway.config"]
    assert "COMPUTE_LOCAL_DEVICES" in variables["compute_local.config"]
    assert "LOG_LEVEL" in variables["compute_local.config"]
    assert "RUNPOD_KEY_ENCRYPTION_SECRET" in variables["keyvault.config"]


SERVICE_CONFIG_MODULES = [module for module in CONFIG_MODULES if not module.startswith("artifact_store")]


def test_every_service_builds_its_settings_on_the_shared_base() -> None:
    classes = [importlib.import_module(module).Settings for module in SERVICE_CONFIG_MODULES]
    for settings in classes:
        assert issubclass(settings, ServiceSettings), settings
        config = settings.model_config
        assert not config.get("case_sensitive") and not config.get("env_prefix"), settings
        assert config.get("hide_input_in_errors") is True, settings
        # One convention: each field is its environment variable, lower-cased.
        assert all(name == name.lower() for name in settings.model_fields), settings
        assert "log_level" in settings.model_fields, settings
    names = {settings.service_name for settings in classes}
    assert len(names) == len(classes) and ServiceSettings.service_name not in names


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_env_example_lists_every_variable(module: str) -> None:
    missing = service_variables()[module] - documented(REPO / ".env.example")
    assert not missing, f".env.example lacks {sorted(missing)} read by {module}"


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_instructions_describe_every_variable(module: str) -> None:
    text = (REPO / "INSTRUCTIONS.md").read_text()
    missing = {name for name in service_variables()[module] if f"`{name}`" not in text}
    assert not missing, f"INSTRUCTIONS.md does not describe {sorted(missing)} read by {module}"


def test_env_example_holds_no_real_secret() -> None:
    for line in (REPO / ".env.example").read_text().splitlines():
        name, sep, value = line.partition("=")
        if (
            sep
            and not name.startswith("#")
            and re.search(r"(SECRETS?|TOKENS?|API_KEY|PASSWORD|DATABASE_URL)$", name)
        ):
            assert value == "" or "change-me" in value or "dev-only" in value, f"{name} has a value"


def test_kubernetes_sets_only_variables_that_a_service_reads(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    known = set().union(*service_variables().values())
    for overlay, resources in rendered.items():
        for resource in resources:
            if resource["kind"] not in {"ConfigMap", "Secret"}:
                continue
            keys = set(resource.get("data", {}))
            if resource["kind"] == "Secret":
                # Secret values are base64 (kustomize wraps long ones; the API server ignores
                # the line breaks); decoding proves the data is well formed.
                for value in resource["data"].values():
                    base64.b64decode("".join(value.split()), validate=True)
            unknown = keys - known - POSTGRES_IMAGE_VARIABLES
            assert not unknown, f"{overlay}: {resource['metadata']['name']} sets unread {sorted(unknown)}"
