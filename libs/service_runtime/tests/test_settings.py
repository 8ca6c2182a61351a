"""The settings base: names derived from fields, the shared log level, one error message naming
every bad variable (never a value) and exit status 2 from an entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from pydantic import Field, SecretStr

from service_runtime.settings import EXIT_BAD_SETTINGS, ServiceSettings, SettingsError


class DemoSettings(ServiceSettings):
    service_name = "demo"

    demo_port: int = Field(default=50099, ge=0, le=65535)
    demo_token: SecretStr = Field(description="a 16-character token")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DEMO_PORT", "DEMO_TOKEN", "LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def test_fields_read_their_upper_case_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_PORT", "0")
    monkeypatch.setenv("DEMO_TOKEN", "t" * 16)
    monkeypatch.setenv("LOG_LEVEL", " debug ")
    settings = DemoSettings.load()
    assert (settings.demo_port, settings.demo_token.get_secret_value(), settings.log_level) == (
        0,
        "t" * 16,
        "DEBUG",
    )
    assert DemoSettings.load(demo_token="x", log_level="critical").log_level == "CRITICAL"


def test_one_message_names_every_bad_variable_and_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_PORT", "70000")
    monkeypatch.setenv("LOG_LEVEL", "chatty-hunter2")
    with pytest.raises(SettingsError) as refused:
        DemoSettings.load()
    message = str(refused.value)
    assert message.startswith("invalid demo settings: ")
    assert "DEMO_PORT: Input should be less than or equal to 65535" in message
    assert "LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in message
    assert "DEMO_TOKEN: is required but not set; expected a 16-character token" in message
    assert "hunter2" not in message and "70000" not in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_an_entry_point_refuses_a_bad_setting_with_one_line_and_status_2() -> None:
    program = textwrap.dedent(
        """
        from pydantic import Field
        from service_runtime.settings import ServiceSettings

        class DemoSettings(ServiceSettings):
            service_name = "demo"
            demo_port: int = Field(default=50099, ge=0, le=65535)

        DemoSettings.load_or_exit()
        print("started")
        """
    )
    env = {"PATH": "/usr/bin:/bin", "DEMO_PORT": "many", "LOG_LEVEL": "INFO"}
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == EXIT_BAD_SETTINGS == 2
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["service"]) == ("error", "demo")
    assert entry["message"].startswith("refusing to start: invalid demo settings: DEMO_PORT: ")
    assert "many" not in entry["message"]
