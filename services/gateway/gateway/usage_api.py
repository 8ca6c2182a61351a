"""GET /api/usage: the caller's usage against the admission limits of their backend (the
scheduler counts; a submission over a limit is a 429 with Retry-After)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.deps import CurrentUser, Scheduler
from gateway.responses import ERRORS
from influence.v1 import scheduler_pb2
from influence_client.models import Usage
from service_runtime.jobs import timestamp_text

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
                "resets_at": timestamp_text(entry, "resets_at"),
            }
            for entry in usage.limits
        ],
        "max_job_time_s": usage.max_job_time_s or None,
        "max_job_cost_usd": usage.max_job_cost_usd or None,
    }


@router.get("/usage", summary="The caller's usage against the limits of their backend", response_model=Usage)
async def get_usage(user: CurrentUser, scheduler: Scheduler) -> dict[str, Any]:
    return usage_view(await scheduler.usage(user))
