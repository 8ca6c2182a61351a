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
from typing import TypeVar

import asyncpg
import grpc

from influence.v1 import keyvault_pb2, keyvault_pb2_grpc
from keyvault import metrics
from keyvault.auth import may_reveal
from keyvault.config import Settings
from keyvault.crypto import UnknownKeyVersion
from keyvault.store import CredentialInfo, CredentialStore, DatabaseUnavailable, open_database
from keyvault.vault import InvalidKeyRequest, KeyNotFound, KeyUnreadable, KeyVault
from service_runtime.callers import CALLER_TOKEN_METADATA, CallerTokens
from service_runtime.grpc_server import GrpcService, create_grpc_server
from service_runtime.jobs import timestamp
from service_runtime.lifecycle import Readiness, run_service
from service_runtime.metrics import MetricsServer, start_metrics_server

log = logging.getLogger(__name__)

SERVICE_NAME = keyvault_pb2.DESCRIPTOR.services_by_name["KeyVault"].full_name
POOL_CLOSE_TIMEOUT_S = 5.0
T = TypeVar("T")


class KeyVaultServicer(keyvault_pb2_grpc.KeyVaultServicer):
    def __init__(self, vault: KeyVault, callers: CallerTokens, readiness: Readiness) -> None:
        self._vault = vault
        self._callers = callers
        self._readiness = readiness

    async def StoreKey(
        self, request: keyvault_pb2.StoreKeyRequest, context: grpc.aio.ServicerContext
    ) -> keyvault_pb2.KeyInfo:
        await self._authenticate(context, "StoreKey")
        info = await self._call(
            context,
            self._vault.store_key(request.user_id, request.provider, request.plaintext, request.verified),
        )
        metrics.KEYS_STORED.labels(info.provider).inc()
        return key_info_message(info)

    # Same shape as StoreKey/DeleteKey: each RPC authenticates under its own name, calls its own
    # vault method and builds its own response; grpc reads each method's signature.
    async def GetKeyInfo(
        self, request: keyvault_pb2.KeyRef, context: grpc.aio.ServicerContext
    ) -> keyvault_pb2.KeyInfo:
        await self._authenticate(context, "GetKeyInfo")
        info = await self._call(context, self._vault.key_info(request.user_id, request.provider))
        return key_info_message(info)

    async def DeleteKey(
        self, request: keyvault_pb2.KeyRef, context: grpc.aio.ServicerContext
    ) -> keyvault_pb2.DeleteKeyResponse:
        await self._authenticate(context, "DeleteKey")
        deleted = await self._call(context, self._vault.delete_key(request.user_id, request.provider))
        return keyvault_pb2.DeleteKeyResponse(deleted=deleted)

    async def RevealKey(
        self, request: keyvault_pb2.KeyRef, context: grpc.aio.ServicerContext
    ) -> keyvault_pb2.RevealKeyResponse:
        caller = await self._authenticate(context, "RevealKey")
        if not may_reveal(caller, request.provider):
            metrics.REVEALS_DENIED.labels(caller).inc()
            log.warning(
                "reveal refused",
                extra={"caller": caller, "user_id": request.user_id, "provider": request.provider},
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"caller {caller!r} may not reveal keys of {request.provider!r}",
            )
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
    return keyvault_pb2.KeyInfo(
        user_id=info.user_id,
        provider=info.provider,
        last4=info.last4,
        key_version=info.key_version,
        created_at=timestamp(info.created_at),
        updated_at=timestamp(info.updated_at),
        verified_at=timestamp(info.verified_at),
    )


@dataclass
class KeyVaultServer:
    """A keyvault gRPC server with its database pool, readiness loop and metrics endpoint."""

    settings: Settings
    grpc: GrpcService
    readiness: Readiness
    pool: asyncpg.Pool
    metrics_server: MetricsServer | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    async def start(self) -> None:
        """Serve, check the database once (readiness), then keep checking in the background."""
        await self.grpc.server.start()
        await self.grpc.set_ready(False)
        self.metrics_server = start_metrics_server(
            self.settings.keyvault_host, self.settings.keyvault_metrics_port
        )
        await self.readiness.start()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain RPCs, stop the readiness loop and the metrics endpoint, release the database."""
        await self.grpc.stop(self.settings.keyvault_shutdown_grace_s if grace_s is None else grace_s)
        await self.readiness.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        try:
            await asyncio.wait_for(self.pool.close(), POOL_CLOSE_TIMEOUT_S)
        except TimeoutError:
            self.pool.terminate()


async def create_keyvault(settings: Settings) -> KeyVaultServer:
    """Connect to the database, apply migrations and build the (not yet started) server."""
    keyring = settings.keyring()
    callers = settings.caller_tokens()
    pool = await open_database(settings.database_url.get_secret_value())
    store = CredentialStore(pool)
    vault = KeyVault(keyring, store)

    async def database_answers() -> bool:
        await store.ping()  # raises when the database does not answer SELECT 1
        return True

    readiness = Readiness("keyvault", database_answers, settings.keyvault_readiness_interval_s)
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
    return KeyVaultServer(settings=settings, grpc=service, readiness=readiness, pool=pool)


async def start_keyvault(settings: Settings) -> KeyVaultServer:
    """Create and start a keyvault server (readiness checked once before returning); for
    tests and embedding. ``settings.keyvault_port`` 0 picks a free port: see ``.port``."""
    keyvault = await create_keyvault(settings)
    try:
        await keyvault.start()
    except BaseException:
        await keyvault.stop(0)
        raise
    return keyvault


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain and close (service_runtime.lifecycle)."""
    await run_service(await create_keyvault(settings), "keyvault")
