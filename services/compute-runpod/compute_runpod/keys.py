"""Reveals a user's stored RunPod key from keyvault, per call (never cached)."""

from __future__ import annotations

import grpc

from compute_runpod.errors import Code, ProviderError
from influence.v1 import keyvault_pb2, keyvault_pb2_grpc
from service_runtime.grpc_server import insecure_channel

PROVIDER = "runpod"


class KeyVaultKeys:
    def __init__(self, address: str, caller_token: str, timeout_s: float = 10.0) -> None:
        self._channel = insecure_channel(address)
        self._stub = keyvault_pb2_grpc.KeyVaultStub(self._channel)
        self._metadata = (("x-caller-token", caller_token),)
        self._timeout_s = timeout_s

    async def reveal(self, user_id: str) -> str:
        try:
            answer = await self._stub.RevealKey(
                keyvault_pb2.KeyRef(user_id=user_id, provider=PROVIDER),
                metadata=self._metadata,
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise ProviderError(
                    Code.FAILED_PRECONDITION,
                    "No RunPod API key is saved for this account; add one in Settings",
                ) from None
            if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                raise ProviderError(
                    Code.INTERNAL, "compute-runpod is not allowed to read keys (check KEYVAULT_TOKEN)"
                ) from None
            raise ProviderError(
                Code.UNAVAILABLE, f"The key store is unavailable ({exc.code().name})"
            ) from None
        return answer.plaintext

    async def close(self) -> None:
        await self._channel.close()
