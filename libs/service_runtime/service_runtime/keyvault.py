"""Reading a user's stored secret from keyvault, per call and never cached: what the compute
services that hand a secret to a provider's worker share (compute-runpod the RunPod key and the
Hugging Face token, compute-modal the Hugging Face token). Keyvault decides who may reveal what.
"""

from __future__ import annotations

import grpc

from influence.v1 import keyvault_pb2, keyvault_pb2_grpc
from service_runtime.grpc_server import insecure_channel

# The key provider name a researcher's own Hugging Face token is stored under.
HUGGINGFACE = "huggingface"


class KeyVaultError(Exception):
    """Keyvault refused the caller (``refused``: check KEYVAULT_TOKEN) or could not answer."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code

    @property
    def refused(self) -> bool:
        return self.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class KeyVaultReader:
    def __init__(self, address: str, caller_token: str, timeout_s: float = 10.0) -> None:
        self._channel = insecure_channel(address)
        self._stub = keyvault_pb2_grpc.KeyVaultStub(self._channel)
        self._metadata = (("x-caller-token", caller_token),)
        self._timeout_s = timeout_s

    async def reveal(self, user_id: str, provider: str) -> str | None:
        """The user's stored ``provider`` secret in plain text, or None when none is stored."""
        try:
            answer = await self._stub.RevealKey(
                keyvault_pb2.KeyRef(user_id=user_id, provider=provider),
                metadata=self._metadata,
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise KeyVaultError(
                f"keyvault did not reveal the {provider} key ({exc.code().name})", exc.code()
            ) from None
        return answer.plaintext

    async def close(self) -> None:
        await self._channel.close()
