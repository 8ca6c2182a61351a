"""What every route needs: the gateway's state, the authenticated user, error formatting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from gateway.auth import AuthError, IdentityProviderUnavailable, LocalTokenIssuer, TokenVerifier
from gateway.config import Settings
from gateway.upstream import ApiError, KeyVaultClient, Metadata, SchedulerClient, Upstreams, trace_metadata
from gpu_core.schemas import ExperimentSpec, SpecLimits


class StreamSlots:
    """Open event streams per user, at most ``per_user`` each: a stream holds the scheduler's
    WatchJob call and a connection, so one user's thousand streams would starve everyone."""

    def __init__(self, per_user: int) -> None:
        self.per_user = per_user
        self._open: dict[str, int] = {}

    def take(self, user: str) -> StreamSlot:
        count = self._open.get(user, 0)
        if count >= self.per_user:
            raise ApiError(
                429,
                f"You have {count} progress streams open; the limit is {self.per_user} per user "
                "(GATEWAY_MAX_STREAMS_PER_USER): close one first",
            )
        self._open[user] = count + 1
        return StreamSlot(self, user)

    def _give_back(self, user: str) -> None:
        left = self._open[user] - 1
        if left:
            self._open[user] = left
        else:
            del self._open[user]


class StreamSlot:
    def __init__(self, slots: StreamSlots, user: str) -> None:
        self._slots = slots
        self._user = user
        self._held = True

    def release(self) -> None:
        """Idempotent: both the stream's end and the response's end call it."""
        if self._held:
            self._held = False
            self._slots._give_back(self._user)


@dataclass
class GatewayState:
    settings: Settings
    verifier: TokenVerifier
    local_issuer: LocalTokenIssuer | None
    upstreams: Upstreams | None = None
    # Uploaded files read at once: each may decode up to the read budget, so memory stays bounded.
    file_reads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    streams: StreamSlots = field(init=False)

    def __post_init__(self) -> None:
        self.streams = StreamSlots(self.settings.gateway_max_streams_per_user)

    @property
    def spec_limits(self) -> SpecLimits:
        return self.settings.spec_limits


# The dependencies are `async def` although none awaits: FastAPI runs a plain `def` dependency
# in its thread pool, a thread hand-off (and GIL contention) per dependency on every request.
async def gateway_state(request: Request) -> GatewayState:
    return request.app.state.gateway


async def upstreams(request: Request) -> Upstreams:
    state: GatewayState = request.app.state.gateway
    if state.upstreams is None:
        # Only between the app's creation and its lifespan opening the channels (or after close).
        raise ApiError(
            503, "The gateway is not connected to the scheduler and key vault yet; try again in a moment"
        )
    return state.upstreams


# Declared for the OpenAPI page (its Authorize button); the header itself is checked below so
# that every failure gets a specific message.
_bearer_scheme = HTTPBearer(auto_error=False, description="A JWT from the sign-in provider")


async def current_user(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
) -> str:
    state: GatewayState = request.app.state.gateway
    try:
        return await state.verifier.subject(request.headers.get("authorization"))
    except AuthError as exc:
        raise ApiError(401, str(exc)) from None
    except IdentityProviderUnavailable as exc:
        raise ApiError(503, str(exc)) from None


async def trace(request: Request) -> Metadata:
    return trace_metadata(request.headers)


# FastAPI runs a dependency once per request, so both clients carry the same (possibly new) trace.
Trace = Annotated[Metadata, Depends(trace)]
Clients = Annotated[Upstreams, Depends(upstreams)]


async def scheduler_client(clients: Clients, trace: Trace) -> SchedulerClient:
    return clients.scheduler_client(trace)


async def keyvault_client(clients: Clients, trace: Trace) -> KeyVaultClient:
    return clients.keyvault_client(trace)


CurrentUser = Annotated[str, Depends(current_user)]
State = Annotated[GatewayState, Depends(gateway_state)]
Scheduler = Annotated[SchedulerClient, Depends(scheduler_client)]
KeyVault = Annotated[KeyVaultClient, Depends(keyvault_client)]


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("training_data", 3, "completion")`` -> ``training_data[3].completion``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or "body"


def validation_problems(errors: Sequence[Mapping[str, Any]], strip_location: bool) -> list[dict[str, str]]:
    """One ``{field, message}`` per error; never the input value (it may be a secret)."""
    problems = []
    for error in errors:
        loc = list(error.get("loc", ()))
        if strip_location and loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        message = str(error.get("msg", "is not valid")).removeprefix("Value error, ")
        problems.append({"field": field_path(loc), "message": message})
    return problems


def json_error(errors: Sequence[Mapping[str, Any]]) -> ApiError | None:
    """A 400 for a body that is not JSON at all, else None."""
    for error in errors:
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            reason = ctx.get("error") or error.get("msg", "")
            return ApiError(400, f"The request body is not valid JSON: {reason}")
    return None


def text_problems(value: Any, loc: tuple[Any, ...] = ()) -> list[dict[str, str]]:
    """One problem per string in ``value`` (a parsed JSON body) that protobuf cannot carry:
    UTF-8 cannot encode a lone surrogate (``"\\ud800"``), so no service behind the gateway could
    receive it. Checked here once, before anything is sent on."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            position = exc.start
            code = f"U+{ord(value[position]):04X}"
            return [
                {
                    "field": field_path(loc),
                    "message": f"contains a lone surrogate ({code} at character {position}), "
                    "which is not valid Unicode text",
                }
            ]
        return []
    problems: list[dict[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            problems += text_problems(key, loc) + text_problems(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            problems += text_problems(item, (*loc, index))
    return problems


def require_text(value: str) -> str:
    """For pydantic validators of string fields: refuse text protobuf cannot carry."""
    problems = text_problems(value)
    if problems:
        raise ValueError(problems[0]["message"])
    return value


class SpecInvalid(Exception):
    """A 422 listing each field of the experiment spec that is wrong."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("invalid experiment spec")
        self.problems = problems


async def read_spec(request: Request, limits: SpecLimits) -> bytes:
    """Validate the body as a gpu_core ExperimentSpec under the operator's limits; answer the
    normalised JSON (ids filled in) that the scheduler stores."""
    body = await request.body()
    if not body.strip():
        raise ApiError(400, "The request body is empty; send the experiment spec as JSON")
    try:
        spec = ExperimentSpec.model_validate_json(body, context={"limits": limits})
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(e.get("type") == "json_invalid" for e in errors):
            # pydantic's JSON parser refuses a lone surrogate as invalid JSON without saying
            # where; Python's accepts it, so it finds the field.
            problems = _surrogate_problems(body)
            if problems:
                raise SpecInvalid(problems) from None
        raise json_error(errors) or SpecInvalid(validation_problems(errors, False)) from None
    return spec.model_dump_json().encode()


def _surrogate_problems(body: bytes) -> list[dict[str, str]]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return []
    return text_problems(parsed)
