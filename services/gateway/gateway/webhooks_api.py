"""POST /api/webhooks/runpod/{job_id}/{secret}: RunPod's webhook for a finished job, forwarded to
the scheduler (RPC WakeJob), which makes the job's next poll due now.

No session: the per-job secret in the URL (minted by the scheduler, only its hash stored) is the
credential, checked by the scheduler in constant time; an unknown job or a wrong secret is a 404
without detail. The body (RunPod's /status body) is not read: what RunPod's API answers the poll
decides what happened to the job, so a forged or replayed webhook only causes an early poll. The
route is not in the researchers' API schema, and no path is logged (RequestMetrics labels the
route template only)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.deps import Scheduler

router = APIRouter(prefix="/api/webhooks", include_in_schema=False)


@router.post("/runpod/{job_id}/{secret}")
async def runpod_webhook(job_id: str, secret: str, scheduler: Scheduler) -> Response:
    # RunPod retries anything but a 200 (2 more times, 10 s apart); a 503 while the scheduler is
    # down is worth that retry, and the poll catches up either way.
    await scheduler.wake_job(job_id, secret)
    return Response(status_code=200)
