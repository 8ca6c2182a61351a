"""GET /api/usage: the caller's usage against the admission limits of their backend (the
scheduler counts; a submission over a limit is a 429 with Retry-After)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from influence.v1 import scheduler_pb2
from influence_client.models import Usage

from gateway.deps import Clients, CurrentUser, Trace
from gateway.responses import ERRORS
from gateway.upstream import scheduler_errors

router = APIRouter(prefix="/api", tags=["usage"], responses=ERRORS)


def usage_view(usage: scheduler_pb2.Usage) -> dict[str, Any]:
    return {
        "backend": usage.backend,
        "limits": [
            {
                "name": entry.name,
                "description": entry.description,
                "used": entry.used,
                # null: no limit on this deployment
                "limit": entry.limit or None,
                "resets_at": (
                    entry.resets_at.ToDatetime().isoformat() + "Z" if entry.HasField("resets_at") else None
                ),
            }
            for entry in usage.limits
        ],
        "max_job_time_s": usage.max_job_time_s or None,
        "max_job_cost_usd": usage.max_job_cost_usd or None,
    }


@router.get(
    "/usage", summary="The caller's usage against the limits of their backend", response_model=Usage
)
async def get_usage(user: CurrentUser, clients: Clients, trace: Trace) -> dict[str, Any]:
    with scheduler_errors("The scheduler is unavailable; try again in a moment"):
        usage = await clients.scheduler.GetUsage(
            scheduler_pb2.GetUsageRequest(user_id=user), metadata=trace, timeout=clients.timeout_s
        )
    return usage_view(usage)
