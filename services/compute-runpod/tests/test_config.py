"""Settings refuse bad values with a message naming the variable."""

from __future__ import annotations

import pytest

from compute_runpod.config import Settings
from service_runtime.settings import SettingsError


def test_defaults_follow_docs() -> None:
    settings = Settings()
    assert (settings.compute_runpod_port, settings.compute_runpod_metrics_port) == (50054, 9094)
    assert settings.runpod_rest_base_url == "https://api.runpod.io/v2"
    assert settings.runpod_job_base_url == "https://api.runpod.ai/v2"
    assert settings.runpod_graphql_url == "https://api.runpod.io/graphql"
    assert settings.runpod_execution_timeout_s == 7200
    assert "secret" not in repr(Settings(runpod_api_key="secret"))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RUNPOD_JOB_BASE_URL", "api.runpod.ai/v2"),
        ("COMPUTE_RUNPOD_PORT", "70000"),
        ("KEYVAULT_ADDR", "nohostport"),
        ("RUNPOD_QUEUE_TIMEOUT_S", "0"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        Settings.load()


def test_ttl_must_cover_the_execution_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_JOB_TTL_S", "60")
    with pytest.raises(SettingsError, match="RUNPOD_JOB_TTL_S"):
        Settings.load()
