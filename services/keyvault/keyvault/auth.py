"""Who may do what in keyvault: every RPC carries the caller's token (gRPC metadata
``x-caller-token``, checked as every service checks it: service_runtime.callers).

KEYVAULT_CALLER_TOKENS lists the allowed callers as ``name=token,name=token``; each caller
sends its own token (its KEYVAULT_TOKEN). A missing or unknown token is UNAUTHENTICATED.
RevealKey answers only the callers that hand a key to its provider, and only for those keys
(``REVEAL_POLICY``): ``compute-runpod`` the RunPod key and the Hugging Face token (it passes the
token to the user's RunPod worker), ``compute-modal`` the Hugging Face token only, ``scheduler``
a researcher's W&B key and MLflow token (its exporter logs their experiments there:
scheduler/tracking.py); everyone else gets PERMISSION_DENIED.
"""

from __future__ import annotations

# Which stored keys each caller may reveal (key provider names as stored).
REVEAL_POLICY: dict[str, frozenset[str]] = {
    "compute-runpod": frozenset({"runpod", "huggingface"}),
    "compute-modal": frozenset({"huggingface"}),
    "scheduler": frozenset({"wandb", "mlflow"}),
}


def may_reveal(caller: str, provider: str) -> bool:
    return provider in REVEAL_POLICY.get(caller, frozenset())
