"""OpenAPI declarations of the gateway's answers: the one error shape, on every route."""

from __future__ import annotations

from typing import Any

from influence_client.models import ErrorResponse


def error(description: str) -> dict[str, Any]:
    """A documented error answer with the gateway's error body."""
    return {"model": ErrorResponse, "description": description}


# On every router: FastAPI's own 422 schema (loc/msg/type) is not what the gateway answers.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: error("No valid bearer token"),
    422: error("The request is invalid: one {field, message} per problem, or a sentence"),
    "default": error("Any other error: a sentence naming the component that failed"),
}
