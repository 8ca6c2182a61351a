"""Who may do what in keyvault: every RPC carries the caller's token (gRPC metadata
``x-caller-token``, checked as every service checks it: service_runtime.callers).

KEYVAULT_CALLER_TOKENS lists the allowed callers as ``name=token,name=token``; each caller
sends its own token (its KEYVAULT_TOKEN). A missing or unknown token is UNAUTHENTICATED; only
the caller named ``compute-runpod`` may RevealKey, everyone else gets PERMISSION_DENIED.
"""

from __future__ import annotations

REVEAL_CALLER = "compute-runpod"


def may_reveal(caller: str) -> bool:
    return caller == REVEAL_CALLER
