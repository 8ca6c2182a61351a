"""Against the real RunPod: runs only with RUNPOD_API_KEY set (never in CI here). It reads the
account and lists endpoints; it creates nothing and spends nothing."""

from __future__ import annotations

import os

import pytest

from compute_runpod.client import RunPodClient
from compute_runpod.config import Settings
from compute_runpod.provider import AccountRef, RunPodProvider

LIVE_KEY = os.environ.get("RUNPOD_API_KEY", "")
pytestmark = pytest.mark.skipif(
    not LIVE_KEY, reason="RUNPOD_API_KEY is not set: the live RunPod test needs a real key"
)


async def test_real_key_verifies_and_endpoints_list() -> None:
    settings = Settings(runpod_api_key=LIVE_KEY)
    client = RunPodClient(settings)

    async def no_stored_keys(user_id: str) -> str:
        raise AssertionError(f"the live test uses the key being saved, not {user_id}'s")

    try:
        provider = RunPodProvider(settings, client, no_stored_keys)
        verification = await provider.verify(AccountRef(user_id="live"), api_key=LIVE_KEY)
        assert verification.account_id and verification.balance_usd > 0
        assert LIVE_KEY not in verification.message
        assert isinstance(await client.list_endpoints(LIVE_KEY), list)
    finally:
        await client.aclose()
