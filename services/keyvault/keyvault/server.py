"""The gRPC face of the vault: ``influence.v1.KeyVault`` on grpc.aio.

Every RPC first checks the caller (metadata ``x-caller-token``, see keyvault.auth); RevealKey
answers only ``compute-runpod``. Readiness (health entry ``influence.v1.KeyVault``) is SERVING
only while the database answers: a monitor pings it every KEYVAULT_READINESS_INTERVAL_S, and a
failed query flips it at once. Errors map to status codes with messages that never carry a key:
INVALID_ARGUMENT, NOT_FOUND, DATA_LOSS (a ciphertext that does not belong to its row),
FAILED_PRECONDITION (its master key is not configured), UNAVAILABLE (database down).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from influence.v1 import keyvault_pb2, keyvault_pb2_grpc
from service_runtime.grpc_server import GrpcService, create_grpc_server, run_until_signal
from service_runtime.metrics import start_metrics_server

from keyvault import metrics
from keyvault.auth import CALLER_TOKEN_METADATA, CallerTokens, may_reveal
from keyvault.config import Settings
from keyvault.crypto import UnknownKeyVersion
from keyvault.store import CredentialInfo, CredentialStore, DatabaseUnavailable, open_database
from keyvault.vault import InvalidKeyRequest, KeyNotFound, KeyUnreadable, KeyVault

log = logging.getLogger(__name__)

SERVICE_NAME = keyvault_pb2.DESCRIPTOR.services_by_name["KeyVault"].full_name
POOL_CLOSE_TIMEOUT_S = 5.0
T = TypeVar("T")


class ReadinessMonitor:
    """Keeps the readiness entry in step with the database."""

    def __init__(self, store: CredentialStore, interval_s: float) -> None:
        self._store = store
        self._service: GrpcService | None = None
        self._interval_s = interval_s
        self._ready: bool | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def attach(self, service: GrpcService) -> None:
        """The server whose readiness entry this monitor drives (built after the servicer)."""
        self._service = service

    async def check(self) -> bool:
        try:
            await self._store.ping()
        except Exception as exc:  # any failure to answer SELECT 1 means not ready
            await self.set(False, reason=str(exc) or type(exc).__name__)
            return False
        await self.set(True)
        return True

    async def set(self, ready: bool, reason: str = "") -> None:
        if ready != self._ready:
            if ready:
                log.info("database reachable: ready")
            else:
                log.warning("database unreachable: not ready", extra={"reason": reason})
        self._ready = ready
        if self._service is not None:
            await self._service.set_ready(ready)

    async def start(self) -> None:
        await self.check()
        self._task = asyncio.create_task(self._run(), name="keyvault-readiness")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval_s)
            except TimeoutError:
                await self.check()


class KeyVaultServicer(keyvault_pb2_grpc.KeyVaultServicer):
    def __init__(self, vault: KeyVault, callers: CallerTokens, readiness: ReadinessMonitor) -> None:
        self._vault = vault
        self._callers = callers
        self._readiness = readiness

    async def StoreKey(  # noqa: N802 (gRPC method name)
        self, request: keyvault_pb2.StoreKeyRequest, context: grpc.aio.ServicerContext
    ) -> keyvault_pb2.KeyInfo:
        await self._authenticate(context, "StoreKey")
        info = await self._call(
            context,
            self._vault.store_key(request.user_id, request.provider, request.plaintext, request.verified),
        )
        metrics.KEYS_STORED.labels(info.provider).inc()
        return key_info_message(info)

    async def GetKeyInfo(  # noqa: N802
        self, request: keyvault_pb2.KeyRef, context: grpc.aio.ServicerContext
    ) -> keyvault_pb2.KeyInfo:
        await self._authenticate(context, "GetKeyInfo")
        info = await self._call(context, self._vault.key_info(request.user_id, request.provider))
        return key_info_message(info)

    async def DeleteKey(  # noqa: N802
        self, request: keyvault_pb2.KeyRef, context: grpc.aio.ServicerContext
    ) -> keyvault_pb2.DeleteKeyResponse:
        await self._authenticate(context, "DeleteKey")
        deleted = await self._call(context, self._vault.delete_key(request.user_id, request.provider))
        return keyvault_pb2.DeleteKeyResponse(deleted=deleted)

    async def RevealKey(  # noqa: N802
        self, request: keyvault_pb2.KeyRef, context: grpc.aio.ServicerContext
    ) -> keyvault_pb2.RevealKeyResponse:
        caller = await self._authenticate(context, "RevealKey")
        if not may_reveal(caller):
            metrics.REVEALS_DENIED.labels(caller).inc()
            log.warning(
                "reveal refused",
                extra={"caller": caller, "user_id": request.user_id, "provider": request.provider},
            )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"caller {caller!r} may not reveal keys")
        plaintext = await self._call(context, self._vault.reveal_key(request.user_id, request.provider))
        metrics.KEYS_REVEALED.labels(request.provider, caller).inc()
        log.info(
            "key revealed", extra={"caller": caller, "user_id": request.user_id, "provider": request.provider}
        )
        return keyvault_pb2.RevealKeyResponse(plaintext=plaintext)

    async def _authenticate(self, context: grpc.aio.ServicerContext, method: str) -> str:
        presented = None
        for key, value in context.invocation_metadata() or ():
            if key == CALLER_TOKEN_METADATA:
                presented = value if isinstance(value, str) else None
        caller = self._callers.identify(presented)
        if caller is None:
            metrics.UNAUTHENTICATED.labels(method).inc()
            log.warning("unauthenticated call", extra={"method": method, "peer": context.peer()})
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"missing or unknown {CALLER_TOKEN_METADATA} metadata; send this service's KEYVAULT_TOKEN",
            )
        return caller

    async def _call(self, context: grpc.aio.ServicerContext, operation: Awaitable[T]) -> T:
        try:
            return await operation
        except InvalidKeyRequest as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except KeyNotFound as exc:
            code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        except KeyUnreadable as exc:
            code, message = grpc.StatusCode.DATA_LOSS, str(exc)
        except UnknownKeyVersion as exc:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except DatabaseUnavailable as exc:
            await self._readiness.set(False, reason=str(exc))
            code, message = grpc.StatusCode.UNAVAILABLE, "the key database is unavailable; retry later"
        except Exception:
            # The status details of an unexpected exception would carry its text; say nothing.
            log.exception("unexpected error")
            code, message = grpc.StatusCode.INTERNAL, "internal error in keyvault"
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # abort always raises


def key_info_message(info: CredentialInfo) -> keyvault_pb2.KeyInfo:
    message = keyvault_pb2.KeyInfo(
        user_id=info.user_id,
        provider=info.provider,
        last4=info.last4,
        key_version=info.key_version,
        created_at=_timestamp(info.created_at),
        updated_at=_timestamp(info.updated_at),
    )
    if info.verified_at is not None:
        message.verified_at.CopyFrom(_timestamp(info.verified_at))
    return message


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


@dataclass
class KeyVaultServer:
    """A keyvault gRPC server with its database pool and readiness monitor."""

    service: GrpcService
    readiness: ReadinessMonitor
    pool: asyncpg.Pool

    @property
    def port(self) -> int:
        return self.service.port

    async def close(self) -> None:
        """Stop the monitor and release the database (the gRPC server is stopped already)."""
        await self.readiness.stop()
        try:
            await asyncio.wait_for(self.pool.close(), POOL_CLOSE_TIMEOUT_S)
        except TimeoutError:
            self.pool.terminate()

    async def stop(self, grace_s: float = 0.0) -> None:
        await self.service.stop(grace_s)
        await self.close()


async def create_keyvault(settings: Settings) -> KeyVaultServer:
    """Connect to the database, apply migrations and build the (not yet started) server."""
    keyring = settings.keyring()
    callers = settings.caller_tokens()
    pool = await open_database(settings.database_url.get_secret_value())
    store = CredentialStore(pool)
    vault = KeyVault(keyring, store)
    readiness = ReadinessMonitor(store, settings.keyvault_readiness_interval_s)
    servicer = KeyVaultServicer(vault, callers, readiness)

    def register(server: grpc.aio.Server) -> list[str]:
        keyvault_pb2_grpc.add_KeyVaultServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    try:
        service = create_grpc_server(settings.address, register, "keyvault")
    except BaseException:
        await pool.close()
        raise
    readiness.attach(service)
    log.info(
        "keyvault configured",
        extra={"key_version": keyring.current.version, "callers": sorted(callers.tokens)},
    )
    return KeyVaultServer(service=service, readiness=readiness, pool=pool)


async def start_keyvault(settings: Settings) -> KeyVaultServer:
    """Create and start a keyvault server (readiness checked once before returning); for
    tests and embedding. ``settings.keyvault_port`` 0 picks a free port: see ``.port``."""
    keyvault = await create_keyvault(settings)
    try:
        await keyvault.service.server.start()
        await keyvault.readiness.start()
    except BaseException:
        await keyvault.stop()
        raise
    return keyvault


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT: metrics, gRPC server, readiness; then drain and close."""
    metrics = start_metrics_server(settings.keyvault_host, settings.keyvault_metrics_port)
    if metrics is not None:
        log.info("metrics served", extra={"metrics_port": metrics.port})
    keyvault = await create_keyvault(settings)
    await run_until_signal(
        keyvault.service,
        settings.keyvault_shutdown_grace_s,
        on_start=keyvault.readiness.start,
        on_stop=keyvault.close,
    )
