"""Settings refuse bad secrets without echoing them; the AES-GCM sealing rules."""

from __future__ import annotations

import base64
import os

import pytest

from keyvault.config import Settings
from keyvault.crypto import Keyring, MasterKey, UndecryptableKey, UnknownKeyVersion
from service_runtime.callers import parse_caller_tokens
from service_runtime.settings import SettingsError

GOOD_ENV = {
    "DATABASE_URL": "postgresql://postgres@localhost/keyvault",
    "KEYVAULT_CALLER_TOKENS": "gateway=" + "a" * 20 + ",compute-runpod=" + "b" * 20,
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("KEYVAULT_", "RUNPOD_KEY_ENCRYPTION_")) or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    for name, value in GOOD_ENV.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_good_settings_load_with_documented_defaults(env: pytest.MonkeyPatch, master_key: str) -> None:
    env.setenv("RUNPOD_KEY_ENCRYPTION_SECRET", master_key)
    settings = Settings.load()
    assert settings.address == "127.0.0.1:50052"
    assert settings.keyvault_metrics_port == 9092
    assert set(settings.caller_tokens().tokens) == {"gateway", "compute-runpod"}
    assert master_key not in repr(settings)


def test_missing_secret_is_refused_naming_the_variable(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="RUNPOD_KEY_ENCRYPTION_SECRET: is required"):
        Settings.load()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (base64.b64encode(os.urandom(16)).decode(), "decodes to 16 bytes; expected exactly 32"),
        (base64.b64encode(os.urandom(33)).decode(), "decodes to 33 bytes; expected exactly 32"),
        ("not*base64*at*all-secret-value", "is not valid base64"),
        ("   ", "is empty"),
    ],
    # ids without the random values, so every pytest-xdist worker collects the same names
    ids=["16-bytes", "33-bytes", "not-base64", "blank"],
)
def test_bad_secret_is_refused_without_echoing_it(env: pytest.MonkeyPatch, value: str, problem: str) -> None:
    env.setenv("RUNPOD_KEY_ENCRYPTION_SECRET", value)
    with pytest.raises(SettingsError) as refused:
        Settings.load()
    message = str(refused.value)
    assert "RUNPOD_KEY_ENCRYPTION_SECRET" in message
    assert problem in message
    if value.strip():
        assert value not in message
        assert value not in str(refused.value.__context__)


def test_bad_old_secret_is_refused_naming_its_position(env: pytest.MonkeyPatch, master_key: str) -> None:
    short = base64.b64encode(os.urandom(31)).decode()
    env.setenv("RUNPOD_KEY_ENCRYPTION_SECRET", master_key)
    env.setenv("RUNPOD_KEY_ENCRYPTION_OLD_SECRETS", f"{master_key},{short}")
    with pytest.raises(
        SettingsError, match="RUNPOD_KEY_ENCRYPTION_OLD_SECRETS: entry 2 decodes to 31"
    ) as refused:
        Settings.load()
    assert short not in str(refused.value)


@pytest.mark.parametrize(
    ("tokens", "problem"),
    [
        ("gateway", "entry 1 is not name=token"),
        ("gateway=short", "entry 1: token is shorter than 16"),
        ("gateway=" + "x" * 20 + ",gateway=" + "y" * 20, "caller 'gateway' is listed twice"),
        ("gateway=" + "x" * 20 + ",compute-runpod=" + "x" * 20, "has the same token as another caller"),
        (",", "lists no callers"),
    ],
)
def test_bad_caller_tokens_are_refused(
    env: pytest.MonkeyPatch, master_key: str, tokens: str, problem: str
) -> None:
    env.setenv("RUNPOD_KEY_ENCRYPTION_SECRET", master_key)
    env.setenv("KEYVAULT_CALLER_TOKENS", tokens)
    with pytest.raises(SettingsError, match="KEYVAULT_CALLER_TOKENS") as refused:
        Settings.load()
    assert problem in str(refused.value)
    assert "x" * 20 not in str(refused.value)


def test_caller_tokens_identify_exactly_one_caller() -> None:
    callers = parse_caller_tokens("gateway=" + "g" * 20 + ", compute-runpod=" + "r" * 20)
    assert callers.identify("r" * 20) == "compute-runpod"
    assert callers.identify("g" * 20) == "gateway"
    assert callers.identify("g" * 19) is None
    assert callers.identify("") is None
    assert callers.identify(None) is None


def _master() -> MasterKey:
    return MasterKey.from_bytes(os.urandom(32))


def test_each_seal_uses_a_fresh_nonce() -> None:
    keyring = Keyring(_master())
    first = keyring.seal("alice", "runpod", "sk-the-same-key")
    second = keyring.seal("alice", "runpod", "sk-the-same-key")
    assert len(first.nonce) == 12
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext
    assert (
        keyring.open("alice", "runpod", first) == keyring.open("alice", "runpod", second) == "sk-the-same-key"
    )


def test_associated_data_binds_user_provider_and_version() -> None:
    keyring = Keyring(_master())
    sealed = keyring.seal("alice", "runpod", "sk-alices-key")
    with pytest.raises(UndecryptableKey):
        keyring.open("bob", "runpod", sealed)
    with pytest.raises(UndecryptableKey):
        keyring.open("alice", "modal", sealed)
    relabelled = type(sealed)(sealed.ciphertext, sealed.nonce, sealed.key_version + 1)
    with pytest.raises(UnknownKeyVersion, match="RUNPOD_KEY_ENCRYPTION_OLD_SECRETS"):
        keyring.open("alice", "runpod", relabelled)


def test_versions_identify_master_keys() -> None:
    raw = os.urandom(32)
    assert MasterKey.from_bytes(raw).version == MasterKey.from_bytes(raw).version
    old, new = _master(), _master()
    assert old.version != new.version
    assert 1 <= old.version < 2**31
    sealed_by_old = Keyring(old).seal("alice", "runpod", "sk-alices-key")
    assert sealed_by_old.key_version == old.version
    assert Keyring(new, [old]).open("alice", "runpod", sealed_by_old) == "sk-alices-key"
    with pytest.raises(UnknownKeyVersion):
        Keyring(new).open("alice", "runpod", sealed_by_old)
