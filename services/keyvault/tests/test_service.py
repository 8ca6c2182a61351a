"""The KeyVault gRPC service on a real server and a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import logging
import secrets
from urllib.parse import urlparse

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from influence.v1 import keyvault_pb2, keyvault_pb2_grpc
from keyvault.server import SERVICE_NAME, KeyVaultServer
from service_runtime.logs import JsonFormatter

Metadata = tuple[tuple[str, str], ...]


def ref(user_id: str = "alice", provider: str = "runpod") -> keyvault_pb2.KeyRef:
    return keyvault_pb2.KeyRef(user_id=user_id, provider=provider)


def store(user_id: str, plaintext: str, verified: bool = True) -> keyvault_pb2.StoreKeyRequest:
    return keyvault_pb2.StoreKeyRequest(
        user_id=user_id, provider="runpod", plaintext=plaintext, verified=verified
    )


async def until_status(
    health: health_pb2_grpc.HealthStub, request: health_pb2.HealthCheckRequest, status: int
) -> None:
    # Probes the way an orchestrator does. (Health.Watch would be the event to await, but
    # service_runtime's MetricsInterceptor cannot yet wrap the health servicer's Watch.)
    while (await health.Check(request)).status != status:
        await asyncio.sleep(0.02)


async def all_cells(database_url: str) -> list[object]:
    """Every value of every column of every row of every table keyvault's database holds."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        cells: list[object] = []
        for table in tables:
            for row in await conn.fetch(f'SELECT * FROM "{table["table_name"]}"'):
                cells.extend(row.values())
        return cells
    finally:
        await conn.close()


def contains(cell: object, plaintext: str) -> bool:
    if isinstance(cell, bytes | bytearray | memoryview):
        return plaintext.encode() in bytes(cell)
    return plaintext in str(cell)


async def test_store_info_reveal_delete_round_trip(
    stub: keyvault_pb2_grpc.KeyVaultStub, gateway: Metadata, compute_runpod: Metadata, api_key: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetKeyInfo(ref(), metadata=gateway)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no runpod key is stored for user alice" in missing.value.details()

    stored = await stub.StoreKey(store("alice", api_key), metadata=gateway)
    assert stored.last4 == api_key[-4:]
    assert stored.key_version > 0
    assert stored.HasField("verified_at")
    assert api_key not in str(stored)

    info = await stub.GetKeyInfo(ref(), metadata=gateway)
    assert (info.last4, info.key_version, info.created_at) == (
        stored.last4,
        stored.key_version,
        stored.created_at,
    )
    revealed = await stub.RevealKey(ref(), metadata=compute_runpod)
    assert revealed.plaintext == api_key

    # Storing again replaces the key; the row keeps its creation time.
    replacement = api_key[::-1]
    replaced = await stub.StoreKey(store("alice", replacement, verified=False), metadata=gateway)
    assert replaced.last4 == replacement[-4:]
    assert replaced.created_at == stored.created_at
    assert replaced.updated_at.ToDatetime() >= stored.updated_at.ToDatetime()
    assert not replaced.HasField("verified_at")
    assert (await stub.RevealKey(ref(), metadata=compute_runpod)).plaintext == replacement

    assert (await stub.DeleteKey(ref(), metadata=gateway)).deleted is True
    assert (await stub.DeleteKey(ref(), metadata=gateway)).deleted is False
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.RevealKey(ref(), metadata=compute_runpod)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_input_is_refused_without_echoing_the_key(
    stub: keyvault_pb2_grpc.KeyVaultStub, gateway: Metadata
) -> None:
    cases = [
        (
            keyvault_pb2.StoreKeyRequest(user_id="", provider="runpod", plaintext="sk-0123456789"),
            "user_id is empty",
        ),
        (
            keyvault_pb2.StoreKeyRequest(user_id="alice", provider="RunPod!", plaintext="sk-0123456789"),
            "provider",
        ),
        (
            keyvault_pb2.StoreKeyRequest(user_id="alice", provider="runpod", plaintext=""),
            "plaintext is empty",
        ),
        (
            keyvault_pb2.StoreKeyRequest(user_id="alice", provider="runpod", plaintext="sk-12"),
            "8-1024 characters",
        ),
        (
            keyvault_pb2.StoreKeyRequest(user_id="alice", provider="runpod", plaintext="sk-0123 456789"),
            "whitespace",
        ),
    ]
    for request, problem in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StoreKey(request, metadata=gateway)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in refused.value.details()
        if request.plaintext:
            assert request.plaintext not in refused.value.details()


async def test_plaintext_reaches_no_table_and_no_log_line(
    stub: keyvault_pb2_grpc.KeyVaultStub,
    gateway: Metadata,
    compute_runpod: Metadata,
    database_url: str,
    api_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    other_key = "rpa_" + api_key.upper()
    await stub.StoreKey(store("alice", api_key), metadata=gateway)
    await stub.StoreKey(store("bob", other_key), metadata=gateway)
    await stub.StoreKey(store("bob", other_key), metadata=gateway)
    assert (await stub.RevealKey(ref("alice"), metadata=compute_runpod)).plaintext == api_key
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.RevealKey(ref("bob"), metadata=gateway)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.StoreKey(store("carol", api_key + " x"), metadata=gateway)

    cells = await all_cells(database_url)
    assert any(isinstance(cell, bytes) for cell in cells), "the scan must see the ciphertext"
    for plaintext in (api_key, other_key):
        assert not [cell for cell in cells if contains(cell, plaintext)]
        # No fragment longer than the 4 characters shown to users either.
        assert not [cell for cell in cells if contains(cell, plaintext[-8:])]

    assert caplog.records, "the calls above log"
    formatter = JsonFormatter("keyvault")
    for record in caplog.records:
        for line in (record.getMessage(), formatter.format(record), str(record.__dict__)):
            assert api_key not in line
            assert other_key not in line


async def test_ciphertext_copied_to_another_users_row_does_not_decrypt(
    stub: keyvault_pb2_grpc.KeyVaultStub,
    gateway: Metadata,
    compute_runpod: Metadata,
    database_url: str,
    api_key: str,
) -> None:
    bobs_key = api_key[::-1]
    await stub.StoreKey(store("alice", api_key), metadata=gateway)
    await stub.StoreKey(store("bob", bobs_key), metadata=gateway)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            UPDATE credentials SET (ciphertext, nonce, key_version, last4) =
                (SELECT ciphertext, nonce, key_version, last4 FROM credentials WHERE user_id = 'alice')
            WHERE user_id = 'bob'
            """
        )
    finally:
        await conn.close()

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RevealKey(ref("bob"), metadata=compute_runpod)
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    details = refused.value.details()
    assert "cannot be decrypted" in details and "store the key again" in details
    assert api_key not in details and bobs_key not in details
    # Alice's own row is untouched and still reveals.
    assert (await stub.RevealKey(ref("alice"), metadata=compute_runpod)).plaintext == api_key


async def test_every_rpc_needs_a_known_caller_token(
    keyvault: KeyVaultServer, stub: keyvault_pb2_grpc.KeyVaultStub, gateway: Metadata, api_key: str
) -> None:
    await stub.StoreKey(store("alice", api_key), metadata=gateway)
    calls = [
        (stub.StoreKey, store("alice", api_key[::-1])),
        (stub.GetKeyInfo, ref()),
        (stub.DeleteKey, ref()),
        (stub.RevealKey, ref()),
    ]
    for metadata in ((), (("x-caller-token", "not-a-known-token-at-all"),), (("x-caller-token", ""),)):
        for method, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await method(request, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "x-caller-token" in refused.value.details()
    # Nothing was changed by the refused calls.
    info = await stub.GetKeyInfo(ref(), metadata=gateway)
    assert info.last4 == api_key[-4:]


async def test_only_compute_runpod_may_reveal(
    stub: keyvault_pb2_grpc.KeyVaultStub, gateway: Metadata, compute_runpod: Metadata, api_key: str
) -> None:
    await stub.StoreKey(store("alice", api_key), metadata=gateway)
    labels = {"caller": "gateway"}
    denied_before = REGISTRY.get_sample_value("keyvault_reveals_denied_total", labels) or 0.0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RevealKey(ref(), metadata=gateway)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'gateway' may not reveal keys" in refused.value.details()
    assert REGISTRY.get_sample_value("keyvault_reveals_denied_total", labels) == denied_before + 1

    reveal_labels = {"provider": "runpod", "caller": "compute-runpod"}
    revealed_before = REGISTRY.get_sample_value("keyvault_keys_revealed_total", reveal_labels) or 0.0
    assert (await stub.RevealKey(ref(), metadata=compute_runpod)).plaintext == api_key
    assert REGISTRY.get_sample_value("keyvault_keys_revealed_total", reveal_labels) == revealed_before + 1


async def test_each_caller_reveals_only_the_keys_it_hands_on(
    stub: keyvault_pb2_grpc.KeyVaultStub, gateway: Metadata, compute_runpod: Metadata, compute_modal: Metadata
) -> None:
    """compute-runpod: the RunPod key and the Hugging Face token (for the user's RunPod worker);
    compute-modal: the Hugging Face token only."""
    hf_token = "hf_" + secrets.token_hex(16)
    await stub.StoreKey(store("alice", "sk" + secrets.token_hex(20)), metadata=gateway)
    await stub.StoreKey(
        keyvault_pb2.StoreKeyRequest(user_id="alice", provider="huggingface", plaintext=hf_token),
        metadata=gateway,
    )
    assert (await stub.RevealKey(ref(provider="huggingface"), metadata=compute_modal)).plaintext == hf_token
    assert (await stub.RevealKey(ref(provider="huggingface"), metadata=compute_runpod)).plaintext == hf_token
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RevealKey(ref(provider="runpod"), metadata=compute_modal)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'compute-modal' may not reveal keys of 'runpod'" in refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stub.RevealKey(ref(provider="openai"), metadata=compute_runpod)
    assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_same_plaintext_gets_a_fresh_nonce_every_time(
    stub: keyvault_pb2_grpc.KeyVaultStub, gateway: Metadata, database_url: str, api_key: str
) -> None:
    stored_before = REGISTRY.get_sample_value("keyvault_keys_stored_total", {"provider": "runpod"}) or 0.0
    await stub.StoreKey(store("alice", api_key), metadata=gateway)
    conn = await asyncpg.connect(database_url)
    try:
        first = await conn.fetchrow("SELECT nonce, ciphertext FROM credentials WHERE user_id = 'alice'")
        await stub.StoreKey(store("alice", api_key), metadata=gateway)
        await stub.StoreKey(store("bob", api_key), metadata=gateway)
        rows = await conn.fetch("SELECT nonce, ciphertext FROM credentials")
    finally:
        await conn.close()
    nonces = {bytes(first["nonce"])} | {bytes(row["nonce"]) for row in rows}
    assert len(nonces) == 3
    assert all(len(nonce) == 12 for nonce in nonces)
    assert bytes(first["ciphertext"]) not in {bytes(row["ciphertext"]) for row in rows}
    assert (
        REGISTRY.get_sample_value("keyvault_keys_stored_total", {"provider": "runpod"}) == stored_before + 3
    )


async def test_readiness_follows_the_database(
    keyvault: KeyVaultServer,
    channel: grpc.aio.Channel,
    stub: keyvault_pb2_grpc.KeyVaultStub,
    gateway: Metadata,
    database_url: str,
    embedded_postgres,
    api_key: str,
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    readiness = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    assert (await health.Check(readiness)).status == health_pb2.HealthCheckResponse.SERVING

    database = urlparse(database_url).path.lstrip("/")
    admin = await asyncpg.connect(embedded_postgres.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    finally:
        await admin.close()

    await asyncio.wait_for(
        until_status(health, readiness, health_pb2.HealthCheckResponse.NOT_SERVING), timeout=10
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.StoreKey(store("alice", api_key), metadata=gateway)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "database is unavailable" in refused.value.details()
    assert api_key not in refused.value.details()
    liveness = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert liveness.status == health_pb2.HealthCheckResponse.SERVING
