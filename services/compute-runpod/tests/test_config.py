"""Settings refuse bad values with a message naming the variable."""

from __future__ import annotations

import pytest
from compute_runpod.config import Settings
from pydantic import ValidationError


def test_defaults_follow_docs() -> None:
    settings = Settings()
    assert (settings.COMPUTE_RUNPOD_PORT, settings.COMPUTE_RUNPOD_METRICS_PORT) == (50054, 9094)
    assert settings.RUNPOD_REST_BASE_URL == "https://api.runpod.io/v2"
    assert settings.RUNPOD_JOB_BASE_URL == "https://api.runpod.ai/v2"
    assert settings.RUNPOD_GRAPHQL_URL == "https://api.runpod.io/graphql"
    assert settings.RUNPOD_EXECUTION_TIMEOUT_S == 7200
    assert "secret" not in repr(Settings(RUNPOD_API_KEY="secret"))


@pytest.mark.parametrize(("variable", "value"), [
    ("RUNPOD_JOB_BASE_URL", "api.runpod.ai/v2"),
    ("COMPUTE_RUNPOD_PORT", "70000"),
    ("KEYVAULT_ADDR", "nohostport"),
    ("RUNPOD_QUEUE_TIMEOUT_S", "0"),
])
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=variable):
        Settings()


def test_ttl_must_cover_the_execution_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_JOB_TTL_S", "60")
    with pytest.raises(ValidationError, match="RUNPOD_JOB_TTL_S"):
        Settings()
