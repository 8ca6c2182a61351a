"""Errors written for the researcher, tagged with the gRPC status they map to (compute.proto)."""

from __future__ import annotations

from enum import Enum


class Code(str, Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    # The call may or may not have taken effect (a /run whose answer was lost): reconcile it.
    UNKNOWN = "UNKNOWN"
    INTERNAL = "INTERNAL"


class KeyFailure(str, Enum):
    """Why RunPod refused a key: common.proto's KeyFailure without its prefix."""

    INVALID = "INVALID"
    NO_FUNDS = "NO_FUNDS"
    NO_PERMISSION = "NO_PERMISSION"
    UNREACHABLE = "UNREACHABLE"


class ProviderError(Exception):
    """A failure with a plain message; it never contains an API key or request headers."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
