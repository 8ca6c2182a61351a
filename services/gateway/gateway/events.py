"""Server-Sent Events from the scheduler's WatchJob stream.

Each progress event goes out as ``id: <seq>`` + ``data: <json>``, so a browser's EventSource
resumes after a reload by sending Last-Event-ID. Comments keep idle connections (and proxies)
alive; ``event: end`` closes the stream once the job is terminal.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from gateway.upstream import ApiError, SchedulerClient
from gateway.views import event_payload
from influence.v1 import common_pb2, scheduler_pb2
from service_runtime.jobs import state_name

log = logging.getLogger(__name__)

RECONNECT_DELAY_MS = 3000
HEARTBEAT = b": heartbeat\n\n"


def sse_message(data: dict[str, Any], event: str | None = None, event_id: int | None = None) -> bytes:
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    # json.dumps escapes newlines inside strings, so the payload is always one data line.
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


async def job_event_stream(
    scheduler: SchedulerClient, user_id: str, job_id: str, after_seq: int, heartbeat_s: float
) -> AsyncIterator[bytes]:
    # An event, the stream's end (None) or the error that broke it.
    queue: asyncio.Queue[common_pb2.ProgressEvent | grpc.aio.AioRpcError | None] = asyncio.Queue()
    call = scheduler.watch_job(
        scheduler_pb2.WatchJobRequest(user_id=user_id, job_id=job_id, after_seq=after_seq)
    )

    async def pump() -> None:
        # Reading in its own task lets the generator wake for heartbeats without cancelling
        # a read on the gRPC stream.
        try:
            async for event in call:
                await queue.put(event)
            await queue.put(None)
        except grpc.aio.AioRpcError as exc:
            await queue.put(exc)

    pump_task = asyncio.create_task(pump())
    try:
        yield f"retry: {RECONNECT_DELAY_MS}\n\n".encode()
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), heartbeat_s)
            except TimeoutError:
                yield HEARTBEAT
                continue
            if isinstance(item, common_pb2.ProgressEvent):
                yield sse_message(event_payload(item), event_id=item.seq)
            elif item is None:
                yield sse_message(await _final_status(scheduler, user_id, job_id), event="end")
                return
            else:
                log.warning(
                    "job event stream broke",
                    extra={"job_id": job_id, "grpc_code": item.code().name},
                )
                message = (
                    "Lost the connection to the scheduler; reconnecting resumes where it stopped"
                    if item.code() == grpc.StatusCode.UNAVAILABLE
                    else item.details() or item.code().name
                )
                yield sse_message({"message": message}, event="error")
                return
    finally:
        pump_task.cancel()
        call.cancel()


async def _final_status(scheduler: SchedulerClient, user_id: str, job_id: str) -> dict[str, Any]:
    try:
        job = await scheduler.get_job(scheduler_pb2.GetJobRequest(user_id=user_id, job_id=job_id))
    except ApiError:  # the stream has ended either way: the status is unknown
        return {"job_id": job_id, "status": None}
    return {"job_id": job_id, "status": state_name(job.state), "error": job.error or None}
