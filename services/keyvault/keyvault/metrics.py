"""keyvault's business metrics (RPC counts and latencies come from service_runtime)."""

from __future__ import annotations

from prometheus_client import Counter

KEYS_STORED = Counter("keyvault_keys_stored_total", "Provider keys stored (new or replaced)", ["provider"])
KEYS_REVEALED = Counter(
    "keyvault_keys_revealed_total", "Provider keys revealed to callers", ["provider", "caller"]
)
REVEALS_DENIED = Counter(
    "keyvault_reveals_denied_total", "RevealKey calls refused to an authenticated caller", ["caller"]
)
UNAUTHENTICATED = Counter(
    "keyvault_unauthenticated_total", "KeyVault calls without a valid x-caller-token", ["method"]
)
