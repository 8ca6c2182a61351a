"""Reveals a user's stored RunPod key and Hugging Face token from keyvault, per call (never cached)."""

from __future__ import annotations

from compute_runpod.errors import Code, ProviderError
from service_runtime.keyvault import HUGGINGFACE, KeyVaultError, KeyVaultReader

PROVIDER = "runpod"


class KeyVaultKeys:
    def __init__(self, address: str, caller_token: str, timeout_s: float = 10.0) -> None:
        self._reader = KeyVaultReader(address, caller_token, timeout_s)

    async def reveal(self, user_id: str) -> str:
        key = await self._reveal(user_id, PROVIDER)
        if key is None:
            raise ProviderError(
                Code.FAILED_PRECONDITION, "No RunPod API key is saved for this account; add one in Settings"
            )
        return key

    async def hf_token(self, user_id: str) -> str:
        """The user's own Hugging Face token, or "" when they saved none."""
        return await self._reveal(user_id, HUGGINGFACE) or ""

    async def _reveal(self, user_id: str, provider: str) -> str | None:
        try:
            return await self._reader.reveal(user_id, provider)
        except KeyVaultError as exc:
            if exc.refused:
                raise ProviderError(
                    Code.INTERNAL, "compute-runpod is not allowed to read keys (check KEYVAULT_TOKEN)"
                ) from None
            raise ProviderError(Code.UNAVAILABLE, f"The key store is unavailable ({exc.code.name})") from None

    async def close(self) -> None:
        await self._reader.close()
