"""POST /api/data/parse: an uploaded training or eval file read by gpu_core's one parser
(gpu_core.formats), so the page and the CLI accept the same files and name the same problems."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from gateway.deps import CurrentUser, SpecInvalid, State
from gateway.responses import ERRORS, error
from gateway.upstream import ApiError
from gpu_core.formats import FORMAT_LABELS, MAX_PROBLEMS, parse_file
from influence_client.models import ParsedDataFile

router = APIRouter(prefix="/api", tags=["data"], responses=ERRORS)


@router.post(
    "/data/parse",
    summary="Read a training or eval file into spec examples",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The file's bytes: JSONL, JSON array, CSV or Parquet",
        }
    },
    response_model=ParsedDataFile,
    responses={
        413: error(
            "The file is over a read limit (rows, decoded size, columns, JSON nesting); the answer names it"
        ),
        422: error("The file has problems; each names its line or row and field"),
    },
)
async def parse_data_file(
    request: Request,
    _user: CurrentUser,
    state: State,
    kind: Annotated[Literal["train", "eval"], Query(description="training or eval examples")],
    filename: Annotated[
        str, Query(min_length=1, max_length=255, description="decides CSV / Parquet / JSONL")
    ],
) -> dict[str, Any]:
    """The detected format (prompt_completion, messages or alpaca) and the examples as the
    spec's ``training_data`` / ``eval_data`` want them."""
    body = await request.body()
    if not body.strip():
        raise ApiError(400, f"{filename} is empty")
    async with state.file_reads:
        parsed = await asyncio.to_thread(
            parse_file, kind, filename, body, state.spec_limits, state.settings.read_budget
        )
    if parsed.over_budget:
        raise ApiError(413, f"{filename} {parsed.problems[0].message}")
    # No format means no example was read; gpu_core then says why in a problem.
    if parsed.problems or parsed.format is None:
        shown = [{"field": p.where, "message": p.message} for p in parsed.problems[:MAX_PROBLEMS]]
        if len(parsed.problems) > MAX_PROBLEMS:
            shown.append(
                {"field": "file", "message": f"and {len(parsed.problems) - MAX_PROBLEMS} more problems"}
            )
        raise SpecInvalid(shown)
    return {
        "format": parsed.format,
        "format_label": FORMAT_LABELS[parsed.format],
        "count": len(parsed.examples),
        "examples": parsed.examples,
    }
