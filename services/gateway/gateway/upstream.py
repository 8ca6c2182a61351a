"""gRPC channels to the scheduler and keyvault, and the translation of their status codes into
HTTP answers with plain messages."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from influence.v1 import keyvault_pb2_grpc, scheduler_pb2_grpc
from service_runtime.grpc_server import insecure_channel

from gateway.config import Settings

log = logging.getLogger(__name__)

SCHEDULER_SERVICE = "influence.v1.Scheduler"
KEYVAULT_SERVICE = "influence.v1.KeyVault"
_READINESS_TIMEOUT_S = 2.0
# How the scheduler's UNAVAILABLE answers begin when its artifact store, not it, failed.
STORE_FAILURE_PREFIX = "the artifact store"
# Set by the scheduler on an UNAVAILABLE answer caused by a component behind it.
FAILED_COMPONENT_KEY = "x-failed-component"
# Set by the scheduler on a RESOURCE_EXHAUSTED refusal: seconds until a retry can succeed.
RETRY_AFTER_KEY = "retry-after-s"
_TRACE_HEADERS = ("traceparent", "tracestate")
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class ApiError(Exception):
    """An answer to the client: HTTP status and a plain message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Upstreams:
    scheduler: scheduler_pb2_grpc.SchedulerStub
    keyvault: keyvault_pb2_grpc.KeyVaultStub
    scheduler_channel: grpc.aio.Channel
    keyvault_channel: grpc.aio.Channel
    keyvault_metadata: tuple[tuple[str, str], ...]
    timeout_s: float

    async def close(self) -> None:
        await asyncio.gather(self.scheduler_channel.close(), self.keyvault_channel.close())

    def keyvault_call_metadata(self, trace: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        return (*self.keyvault_metadata, *trace)

    async def not_ready(self) -> list[str]:
        """Names of the dependencies whose readiness check is not SERVING."""
        checks = {
            "scheduler": (self.scheduler_channel, SCHEDULER_SERVICE),
            "keyvault": (self.keyvault_channel, KEYVAULT_SERVICE),
        }
        results = await asyncio.gather(
            *(_is_serving(channel, service) for channel, service in checks.values())
        )
        return [name for name, serving in zip(checks, results, strict=True) if not serving]


def scheduler_target(address: str) -> str:
    """SCHEDULER_ADDR as a gRPC target: one host:port (a DNS name resolving to every replica is
    balanced round robin), or a comma-separated list of ip:port, one per replica."""
    return f"ipv4:{address}" if "," in address else address


def open_upstreams(settings: Settings) -> Upstreams:
    """Open the channels (lazily connecting); call from inside the running event loop."""
    scheduler_channel = insecure_channel(
        scheduler_target(settings.scheduler_addr), [("grpc.lb_policy_name", "round_robin")]
    )
    keyvault_channel = insecure_channel(settings.keyvault_addr)
    token = settings.keyvault_token
    return Upstreams(
        scheduler=scheduler_pb2_grpc.SchedulerStub(scheduler_channel),
        keyvault=keyvault_pb2_grpc.KeyVaultStub(keyvault_channel),
        scheduler_channel=scheduler_channel,
        keyvault_channel=keyvault_channel,
        keyvault_metadata=(("x-caller-token", token.get_secret_value()),) if token else (),
        timeout_s=settings.gateway_rpc_timeout_s,
    )


async def _is_serving(channel: grpc.aio.Channel, service: str) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=_READINESS_TIMEOUT_S
        )
    except grpc.aio.AioRpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def trace_metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """W3C trace context from the incoming request, forwarded as gRPC metadata; a request
    without one starts a new trace here, so one id follows it through scheduler and compute."""
    if _TRACEPARENT.fullmatch(headers.get("traceparent", "")):
        return tuple((name, headers[name]) for name in _TRACE_HEADERS if headers.get(name))
    return (("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"),)


_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.OUT_OF_RANGE: 422,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    # Only the scheduler answers UNAUTHENTICATED, about a provider key the user gave.
    grpc.StatusCode.UNAUTHENTICATED: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _trailing(exc: grpc.aio.AioRpcError, name: str) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == name:
            return str(value)
    return ""


def _failed_component(exc: grpc.aio.AioRpcError) -> str:
    """The component the scheduler named as failed (trailing metadata), or ''."""
    return _trailing(exc, FAILED_COMPONENT_KEY)


def _sentence(text: str) -> str:
    text = text.strip()
    return (text[:1].upper() + text[1:]) if text else text


@contextmanager
def scheduler_errors(unavailable: str, not_found: str = "Not found") -> Iterator[None]:
    """Translate a scheduler RPC failure into an ApiError."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        status = _HTTP_STATUS.get(code)
        if code == grpc.StatusCode.UNAVAILABLE:
            component = _failed_component(exc)
            if component:
                # The scheduler answered: a component behind it failed, and its message says which.
                log.warning("upstream component unavailable", extra={"component": component})
                raise ApiError(503, _sentence(exc.details() or f"{component} is unavailable")) from None
            details = exc.details() or ""
            if details.startswith(STORE_FAILURE_PREFIX):
                # The scheduler is up; its artifact store is not: say which one failed.
                log.warning("artifact store unavailable", extra={"grpc_details": details})
                raise ApiError(503, f"{details[0].upper()}{details[1:]}; try again in a moment") from None
            log.warning("scheduler unavailable", extra={"grpc_details": details})
            raise ApiError(503, unavailable) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ApiError(504, "The scheduler did not answer in time; try again") from None
        if code == grpc.StatusCode.NOT_FOUND:
            raise ApiError(404, not_found) from None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry_after = _trailing(exc, RETRY_AFTER_KEY)
            headers = {"Retry-After": retry_after} if retry_after.isdigit() else None
            raise ApiError(429, exc.details() or "a usage limit was reached", headers) from None
        if status is None:
            log.error("scheduler call failed", extra={"grpc_code": code.name, "grpc_details": exc.details()})
            raise ApiError(502, "The scheduler failed to answer; try again") from None
        raise ApiError(status, exc.details() or code.name.replace("_", " ").lower()) from None


@contextmanager
def keyvault_errors(unavailable: str) -> Iterator[None]:
    """Translate a keyvault RPC failure. NOT_FOUND is left to the caller (it means 'no key')."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:
            raise
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # The gateway's own credential was refused: an operator problem, not the user's.
            log.error("keyvault refused the gateway's caller token (check KEYVAULT_TOKEN)")
            raise ApiError(503, unavailable) from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.warning("keyvault unavailable", extra={"grpc_code": code.name})
            raise ApiError(503, unavailable) from None
        status = _HTTP_STATUS.get(code)
        if status is None:
            log.error("keyvault call failed", extra={"grpc_code": code.name})
            raise ApiError(502, "The key vault failed to answer; try again") from None
        raise ApiError(status, exc.details() or code.name.replace("_", " ").lower()) from None
