"""Bearer-token authentication: JWTs from an OIDC issuer (shared secret or JWKS) and, in local
mode, tokens the gateway signs itself for a username. The user id is the token's ``sub``."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt

from gateway.config import Settings

LOCAL_ISSUER = "influence-dashboard-local"
LOCAL_AUDIENCE = "influence-dashboard"
LOCAL_SUBJECT_PREFIX = "local:"
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
_JWKS_ALGORITHMS = ("RS256", "ES256")
_CLOCK_LEEWAY_S = 30


class AuthError(Exception):
    """The request is not authenticated; the message says why, in plain words."""


class IdentityProviderUnavailable(Exception):
    """The identity provider's keys (JWT_JWKS_URL) could not be fetched: not the caller's fault."""


@dataclass(frozen=True)
class _HmacKey:
    secret: str
    issuer: str
    audience: str


@dataclass(frozen=True)
class _JwksKeys:
    client: jwt.PyJWKClient
    issuer: str
    audience: str


class TokenVerifier:
    """Checks signature, expiry, issuer and audience; answers the subject."""

    def __init__(self, settings: Settings, local_secret: str | None) -> None:
        self._hmac_keys: list[_HmacKey] = []
        if local_secret is not None:
            self._hmac_keys.append(_HmacKey(local_secret, LOCAL_ISSUER, LOCAL_AUDIENCE))
        if settings.jwt_secret is not None and settings.jwt_issuer and settings.jwt_audience:
            self._hmac_keys.append(
                _HmacKey(settings.jwt_secret.get_secret_value(), settings.jwt_issuer, settings.jwt_audience)
            )
        self._jwks = (
            _JwksKeys(
                jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True, timeout=10),
                settings.jwt_issuer,
                settings.jwt_audience,
            )
            if settings.jwt_jwks_url and settings.jwt_issuer and settings.jwt_audience
            else None
        )

    async def subject(self, authorization: str | None) -> str:
        token = _bearer_token(authorization)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("The bearer token is not a well-formed JWT") from None
        algorithm = header.get("alg")
        if algorithm == "HS256" and self._hmac_keys:
            claims = self._decode_hmac(token)
        elif algorithm in _JWKS_ALGORITHMS and self._jwks is not None:
            claims = await _decode_jwks(self._jwks, token, algorithm)
        else:
            raise AuthError(f"Tokens signed with {algorithm!r} are not accepted here")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError("The token has no subject (sub) claim")
        return subject

    def _decode_hmac(self, token: str) -> dict[str, Any]:
        last_error: jwt.InvalidTokenError | None = None
        for key in self._hmac_keys:
            try:
                return _decode(token, key.secret, ["HS256"], key.issuer, key.audience)
            except jwt.InvalidSignatureError as exc:
                last_error = exc
        raise AuthError(_describe(last_error or jwt.InvalidSignatureError()))


async def _decode_jwks(jwks: _JwksKeys, token: str, algorithm: str) -> dict[str, Any]:
    try:
        # PyJWKClient fetches over blocking urllib; keep the event loop free.
        signing_key = await asyncio.to_thread(jwks.client.get_signing_key_from_jwt, token)
    except jwt.PyJWKClientConnectionError:
        host = urlsplit(jwks.client.uri).netloc
        raise IdentityProviderUnavailable(
            f"The identity provider ({host}) did not answer for its signing keys; try again in a moment"
        ) from None
    except jwt.PyJWKClientError as exc:
        raise AuthError(f"The token's signing key could not be found: {exc}") from None
    try:
        return _decode(token, signing_key.key, [algorithm], jwks.issuer, jwks.audience)
    except jwt.InvalidTokenError as exc:
        raise AuthError(_describe(exc)) from None


def _decode(token: str, key: Any, algorithms: list[str], issuer: str, audience: str) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            key,
            algorithms=algorithms,
            issuer=issuer,
            audience=audience,
            leeway=_CLOCK_LEEWAY_S,
            options={"require": ["exp", "sub", "iss", "aud"]},
        )
    except jwt.InvalidSignatureError:
        raise
    except jwt.InvalidTokenError as exc:
        raise AuthError(_describe(exc)) from None


def _describe(error: jwt.InvalidTokenError) -> str:
    if isinstance(error, jwt.ExpiredSignatureError):
        return "The token has expired; sign in again"
    if isinstance(error, jwt.InvalidAudienceError):
        return "The token was issued for another audience"
    if isinstance(error, jwt.InvalidIssuerError):
        return "The token was issued by an issuer this gateway does not trust"
    if isinstance(error, jwt.InvalidSignatureError):
        return "The token's signature is not valid"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"The token lacks the {error.claim!r} claim"
    return f"The token is not valid: {error}"


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("Sign in first: this request needs an 'Authorization: Bearer <token>' header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("The Authorization header must be 'Bearer <token>'")
    return token.strip()


class LocalTokenIssuer:
    """Signs tokens for a username (AUTH_MODE=local only: no password, for one-machine use)."""

    def __init__(self, secret: str, ttl_s: int) -> None:
        self._secret = secret
        self._ttl_s = ttl_s

    def issue(self, username: str) -> str:
        now = int(time.time())
        claims = {
            "sub": LOCAL_SUBJECT_PREFIX + username,
            "preferred_username": username,
            "iss": LOCAL_ISSUER,
            "aud": LOCAL_AUDIENCE,
            "iat": now,
            "exp": now + self._ttl_s,
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")


def local_secret(settings: Settings) -> str | None:
    """The secret for local sign-in tokens: configured, or a fresh random one per process (tokens
    then stop working after a restart, which is acceptable on one machine)."""
    if settings.auth_mode != "local":
        return None
    if settings.gateway_local_jwt_secret is not None:
        return settings.gateway_local_jwt_secret.get_secret_value()
    return secrets.token_urlsafe(48)
