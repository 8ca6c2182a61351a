"""Who is calling a gRPC service: caller tokens in the ``x-caller-token`` metadata.

A service lists the callers it accepts as ``name=token,name=token`` (keyvault in
KEYVAULT_CALLER_TOKENS, the scheduler in SCHEDULER_CALLER_TOKENS, the compute services in
COMPUTE_CALLER_TOKENS); each caller sends its own token with every call
(:func:`caller_token_interceptors` on its channel). :class:`CallerCheck` answers a missing or
unknown token UNAUTHENTICATED before the servicer runs; the health and reflection services stay
open for probes. Tokens are compared in constant time against every configured token, so timing
reveals neither which token nor how much of it matched.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from pydantic import SecretStr

from service_runtime.metrics import HandlerWrappingInterceptor

CALLER_TOKEN_METADATA = "x-caller-token"
MIN_TOKEN_CHARS = 16
_CALLER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# Probes (kubelet, devstack) and grpcurl's listing carry no token.
_OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True)
class CallerTokens:
    tokens: dict[str, bytes] = field(repr=False)

    def identify(self, presented: str | bytes | None) -> str | None:
        """The caller's name for this token, or None."""
        if not presented:
            return None
        candidate = presented.encode() if isinstance(presented, str) else presented
        caller = None
        for name, token in self.tokens.items():
            # No early exit: every token is compared on every call.
            if hmac.compare_digest(candidate, token):
                caller = name
        return caller


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


def presented_token(metadata: Any) -> str | bytes | None:
    for key, value in metadata or ():
        if key == CALLER_TOKEN_METADATA:
            return cast(str | bytes, value)
    return None


class CallerCheck(HandlerWrappingInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose ``x-caller-token`` is not a listed caller's."""

    def __init__(self, callers: CallerTokens, service_label: str) -> None:
        self._callers = callers
        self._message = (
            f"{service_label} accepts only its listed callers: "
            f"send your caller token in the {CALLER_TOKEN_METADATA!r} metadata"
        )

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler_call_details.method.startswith(_OPEN_SERVICES):
            return handler
        if self._callers.identify(presented_token(handler_call_details.invocation_metadata)) is not None:
            return handler
        message = self._message

        async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # an async generator, as a streaming handler is

        deserialize, serialize = handler.request_deserializer, handler.response_serializer
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(refuse_stream, deserialize, serialize)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(refuse, deserialize, serialize)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(refuse_stream, deserialize, serialize)
        return grpc.unary_unary_rpc_method_handler(refuse, deserialize, serialize)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(CALLER_TOKEN_METADATA, token)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._token), request)


class _StreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._token), request)


class _ClientStreamToken(grpc.aio.StreamUnaryClientInterceptor):
    """A client stream (a dataset's chunks to the scheduler)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_with_token(client_call_details, self._token), request_iterator)


def caller_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Send this caller's token with every call on a channel. One object per kind of call:
    grpc.aio files an interceptor under the first kind it implements only."""
    return [_UnaryToken(token), _StreamToken(token), _ClientStreamToken(token)]


def checked_caller_tokens(value: SecretStr | None) -> SecretStr | None:
    """A settings validator for an optional ``name=token,...`` list (errors name no token)."""
    if value is not None:
        parse_caller_tokens(value.get_secret_value())
    return value


def caller_tokens_of(value: SecretStr | None) -> CallerTokens | None:
    return parse_caller_tokens(value.get_secret_value()) if value is not None else None


# Hosts only this machine can reach: a service bound to one of them may serve without tokens.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def require_caller_tokens_off_loopback(
    tokens_variable: str, tokens: SecretStr | None, host_variable: str, host: str, allow_any_caller: bool
) -> None:
    """Refuse (ValueError naming the variables) a service that would serve any caller on an
    address other machines can reach: unset caller tokens are for loopback (``make run``, tests)
    or, with ALLOW_ANY_CALLER=true, for a network the operator vouches for."""
    if tokens is None and host not in LOOPBACK_HOSTS and not allow_any_caller:
        raise ValueError(
            f"{tokens_variable} is unset, so every caller would be served, and {host_variable}={host} "
            f"is reachable from other machines: set {tokens_variable} (name=token,...), bind to "
            "loopback, or set ALLOW_ANY_CALLER=true for a network that admits only the callers"
        )
