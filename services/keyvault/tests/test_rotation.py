"""Master-key rotation: old keys decrypt, `rotate` re-encrypts every row under the new one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import asyncpg
import grpc
import pytest

from influence.v1 import keyvault_pb2, keyvault_pb2_grpc
from keyvault.__main__ import main
from keyvault.config import Settings
from keyvault.rotation import rotate
from keyvault.server import start_keyvault
from keyvault.store import CredentialStore, open_database
from keyvault.vault import KeyVault

Metadata = tuple[tuple[str, str], ...]
RUNPOD = "runpod"


def version_of(secret: str, make_settings: Callable[..., Settings]) -> int:
    return make_settings(secret).keyring().current.version


async def row_versions(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT user_id, key_version FROM credentials")
    finally:
        await conn.close()
    return {row["user_id"]: row["key_version"] for row in rows}


async def reveal_all(settings: Settings, users: list[str], metadata: Metadata) -> dict[str, str]:
    """Start a keyvault with ``settings`` (a restart), reveal every user's key, stop it."""
    server = await start_keyvault(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keyvault_pb2_grpc.KeyVaultStub(channel)
            return {
                user: (
                    await stub.RevealKey(
                        keyvault_pb2.KeyRef(user_id=user, provider=RUNPOD), metadata=metadata
                    )
                ).plaintext
                for user in users
            }
    finally:
        await server.stop()


async def test_rotation_moves_every_key_to_the_new_master(
    make_settings: Callable[..., Settings],
    new_secret: Callable[[], str],
    gateway: Metadata,
    compute_runpod: Metadata,
    database_url: str,
    api_key: str,
) -> None:
    old_secret, new_secret_value = new_secret(), new_secret()
    old_version = version_of(old_secret, make_settings)
    new_version = version_of(new_secret_value, make_settings)
    keys = {"alice": api_key, "bob": api_key[::-1]}

    server = await start_keyvault(make_settings(old_secret))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keyvault_pb2_grpc.KeyVaultStub(channel)
            for user, key in keys.items():
                info = await stub.StoreKey(
                    keyvault_pb2.StoreKeyRequest(user_id=user, provider=RUNPOD, plaintext=key, verified=True),
                    metadata=gateway,
                )
                assert info.key_version == old_version
    finally:
        await server.stop()

    # Restarted with only the new master key, the old rows say which secret is missing.
    server = await start_keyvault(make_settings(new_secret_value))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = keyvault_pb2_grpc.KeyVaultStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RevealKey(
                    keyvault_pb2.KeyRef(user_id="alice", provider=RUNPOD), metadata=compute_runpod
                )
    finally:
        await server.stop()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"master key version {old_version}" in refused.value.details()
    assert "RUNPOD_KEY_ENCRYPTION_OLD_SECRETS" in refused.value.details()

    both = make_settings(new_secret_value, old_secrets=old_secret)
    assert await reveal_all(both, list(keys), compute_runpod) == keys

    counts = await rotate(both)
    assert (counts.rotated, counts.already_current, counts.unreadable) == (2, 0, ())
    assert await row_versions(database_url) == {"alice": new_version, "bob": new_version}
    again = await rotate(both)
    assert (again.rotated, again.already_current, again.unreadable) == (0, 2, ())

    assert await reveal_all(make_settings(new_secret_value), list(keys), compute_runpod) == keys


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    # main() installs the JSON handler on the root logger; give pytest its own back.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_rotate_command_prints_counts_only_and_leaves_unreadable_rows(
    make_settings: Callable[..., Settings],
    new_secret: Callable[[], str],
    caller_tokens: str,
    database_url: str,
    api_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_root_logging: None,
) -> None:
    old_secret, current_secret = new_secret(), new_secret()

    async def store_under_old_master() -> None:
        pool = await open_database(database_url)
        try:
            vault = KeyVault(make_settings(old_secret).keyring(), CredentialStore(pool))
            await vault.store_key("alice", RUNPOD, api_key, verified=True)
            await vault.store_key("bob", RUNPOD, api_key[::-1], verified=True)
            # Bob's row gets Alice's ciphertext: it cannot be rotated, and must survive as is.
            await pool.execute(
                "UPDATE credentials SET (ciphertext, nonce) = "
                "(SELECT ciphertext, nonce FROM credentials WHERE user_id = 'alice') WHERE user_id = 'bob'"
            )
        finally:
            await pool.close()

    asyncio.run(store_under_old_master())
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("RUNPOD_KEY_ENCRYPTION_SECRET", current_secret)
    monkeypatch.setenv("RUNPOD_KEY_ENCRYPTION_OLD_SECRETS", old_secret)
    monkeypatch.setenv("KEYVAULT_CALLER_TOKENS", caller_tokens)

    assert main(["rotate"]) == 1
    first = capsys.readouterr()
    assert first.out == "rotated=1 already_current=0 unreadable=1\n"
    assert main(["rotate"]) == 1
    second = capsys.readouterr()
    assert second.out == "rotated=0 already_current=1 unreadable=1\n"
    for output in (first.out, first.err, second.out, second.err):
        assert api_key not in output and api_key[::-1] not in output

    versions = asyncio.run(row_versions(database_url))
    assert versions == {
        "alice": version_of(current_secret, make_settings),
        "bob": version_of(old_secret, make_settings),
    }


def test_rotate_command_refuses_a_bad_secret_naming_the_variable(
    database_url: str,
    caller_tokens: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_root_logging: None,
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("KEYVAULT_CALLER_TOKENS", caller_tokens)
    monkeypatch.setenv("RUNPOD_KEY_ENCRYPTION_SECRET", "dG9vLXNob3J0")  # base64 of "too-short"
    monkeypatch.delenv("RUNPOD_KEY_ENCRYPTION_OLD_SECRETS", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["rotate"])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "RUNPOD_KEY_ENCRYPTION_SECRET" in captured.err
    assert "dG9vLXNob3J0" not in captured.err
