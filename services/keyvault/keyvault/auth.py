"""Who is calling: every KeyVault RPC carries gRPC metadata ``x-caller-token``.

KEYVAULT_CALLER_TOKENS lists the allowed callers as ``name=token,name=token``; each caller
sends its own token (its KEYVAULT_TOKEN) in the ``x-caller-token`` metadata. A missing or
unknown token is UNAUTHENTICATED. RevealKey answers only the callers that hand a key to its
provider, and only for those keys (``REVEAL_POLICY``): ``compute-runpod`` the RunPod key and the
Hugging Face token (it passes the token to the user's RunPod worker), ``compute-modal`` the Hugging
Face token only; everyone else gets PERMISSION_DENIED. Tokens are compared in constant time, against every
configured token, so timing reveals neither which token nor how much of it matched.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field

CALLER_TOKEN_METADATA = "x-caller-token"
# Which stored keys each caller may reveal (key provider names as stored).
REVEAL_POLICY: dict[str, frozenset[str]] = {
    "compute-runpod": frozenset({"runpod", "huggingface"}),
    "compute-modal": frozenset({"huggingface"}),
}
MIN_TOKEN_CHARS = 16
_CALLER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class CallerTokens:
    tokens: dict[str, bytes] = field(repr=False)

    def identify(self, presented: str | None) -> str | None:
        """The caller's name for this token, or None."""
        if not presented:
            return None
        candidate = presented.encode()
        caller = None
        for name, token in self.tokens.items():
            # No early exit: every token is compared on every call.
            if hmac.compare_digest(candidate, token):
                caller = name
        return caller


def may_reveal(caller: str, provider: str) -> bool:
    return provider in REVEAL_POLICY.get(caller, frozenset())


def parse_caller_tokens(spec: str) -> CallerTokens:
    """Parse ``name=token,name=token``. Errors name the entry's position or caller name,
    never a token."""
    tokens: dict[str, bytes] = {}
    for position, entry in enumerate((part.strip() for part in spec.split(",")), start=1):
        if not entry:
            continue
        name, sep, token = entry.partition("=")
        name, token = name.strip(), token.strip()
        if not sep or not token:
            raise ValueError(f"entry {position} is not name=token")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"entry {position}: token is shorter than {MIN_TOKEN_CHARS} characters")
        if not _CALLER_NAME.match(name):
            raise ValueError(f"entry {position}: caller name must be lowercase letters, digits, '-' or '_'")
        if name in tokens:
            raise ValueError(f"caller {name!r} is listed twice")
        if token.encode() in tokens.values():
            raise ValueError(f"caller {name!r} has the same token as another caller")
        tokens[name] = token.encode()
    if not tokens:
        raise ValueError("lists no callers; expected name=token,name=token")
    return CallerTokens(tokens)
