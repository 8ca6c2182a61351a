"""A fake RunPod for tests and the local stack, written from RunPod's documentation
(https://docs.runpod.io, REST v2 OpenAPI) and runpod-python 1.12.0.

One HTTP server plays every RunPod host (point every base URL at it): REST v2
(``/v2/serverless``...), the job API (``/v2/{endpoint}/run|status|stream|cancel|health``),
GraphQL (``/graphql``, ``myself`` only) and the worker-side routes that the runpod SDK's
production worker loop calls (``/job-take``, ``/job-stream``, ``/job-done``, ``/job-stop``,
``/ping``).

The worker is the real one: the first job of an endpoint starts
services/compute-runpod/worker/handler.py as a subprocess (a cold start) with the
``RUNPOD_WEBHOOK_*`` variables pointing here, so ``runpod.serverless.start`` runs its own job
loop, iterates the handler, posts each yield, the final output (aggregate or not), errors in the
SDK's own shapes, and honours stop signals exactly as on RunPod. A worker stays up for the
endpoint's next jobs (as a warm worker does) until the endpoint is deleted or the fake stops.
More workers start, each its own process taking jobs from the endpoint's one queue, up to the
endpoint's ``workers.max`` and the account's worker quota (5, more with a larger balance):
``workers.min`` always (active workers), and as the endpoint's ``scaling`` says: ``QUEUE_DELAY``
adds one while a job has waited ``queueDelay`` seconds with no free worker, ``REQUEST_COUNT``
keeps ceil((queued + running) / ``requestCount``).
The ``/run``, ``/stream``, ``/status`` and ``/cancel`` answers are built from what the SDK
posted.

What the fake keeps from RunPod's servers: Bearer auth (401 unknown key; 403 for a restricted key
on GraphQL and endpoint management), API-create defaults, the Endpoint object without
``templateId``, PATCH as a partial update whose container changes (image, env, args) roll out as
workers cycle, templates (``GET /v2/templates/{id}``), queueing (``IN_QUEUE`` until a worker
takes the job), ``/stream`` draining (each poll returns only new chunks, long-polling briefly
when empty) with chunks over 1 MB split,
results kept ``retention_s`` after completion then 404, ``policy.ttl`` and
``policy.executionTimeout`` (``TIMED_OUT``, and the worker is told to stop the job), cancel
(``CANCELLED``; a running job gets a stop signal), the job API's rate limits per key, endpoint
and route (429), the payload limits (``/run`` input and a job's final output at 10 MB: a larger
job-done upload is refused with 400 and the job shows ``COMPLETED`` without output, as
runpod-python #309 reports), no GPU (``throttled``: no worker starts or takes a job, jobs stay
``IN_QUEUE``, the workers summary says throttled), ``/run``'s ``webhook`` (the /status body is
posted there when the job finishes; anything but a 200 is tried again up to 2 more times,
``webhook_retry_s`` (10) apart; each post in ``webhook_posts``).

Injectable faults (``fail_next``): any status (401/403/429 with Retry-After/5xx) for the next N
calls of a route; ``graphql_enabled = False`` (GraphQL retired: 410); ``execution_timeout_s``
(forced); per-key balance; ``fail_after_accept``: ``/run`` creates the job (it queues and runs)
and then answers a 5xx, or holds its answer past the client's timeout; ``retention_s`` shortened
to seconds (results forgotten, as RunPod forgets them after 30 minutes). Every request is
recorded (method, path, query, headers, status) in ``requests``; every job ``/run`` created, in
``accepted_runs``.

In-process: ``async with FakeRunPod(keys={"rpa_...": 25.0}) as fake: fake.url``.
As a process: ``python -m devstack.fake_runpod --key rpa_x=25``; it prints ``FAKE_RUNPOD_URL=...``
and offers the same controls over HTTP under ``/_fake/`` (keys, faults with ``after_accept``,
``status`` and ``hang_s``, mode with ``retention_s`` and ``webhook_retry_s``, requests, jobs:
``accepted_runs``, ``webhook_posts``, ``runs``: which worker ran each job and when).
"""

from devstack.fake_runpod.fake import FakeRunPod
from devstack.fake_runpod.state import (
    DEFAULT_RETENTION_S,
    MAX_CHUNK_BYTES,
    MAX_RUN_PAYLOAD_BYTES,
    ROUTES,
    TERMINAL,
    FakeAccount,
    FakeJob,
    FakeWorker,
    RecordedRequest,
)
from devstack.fake_runpod.workers import WORKER_GPU, WORKER_HANDLER

__all__ = [
    "DEFAULT_RETENTION_S",
    "MAX_CHUNK_BYTES",
    "MAX_RUN_PAYLOAD_BYTES",
    "ROUTES",
    "TERMINAL",
    "WORKER_GPU",
    "WORKER_HANDLER",
    "FakeAccount",
    "FakeJob",
    "FakeRunPod",
    "FakeWorker",
    "RecordedRequest",
]
