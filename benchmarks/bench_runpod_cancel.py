"""Cancel latency through RunPod's path on the tiny model: ``/cancel`` on the job API, the stop
signal the runpod SDK's worker loop long-polls for, the worker handler cancelled, gpu_core
stopped at its next batch (``make bench-cancel``, after gpu_core's own per-stage figures).

    python -m benchmarks.bench_runpod_cancel

The fake RunPod runs the real worker under the SDK's loop (one warm worker for every case). The
latency is from the ``/cancel`` answer to the SDK's "Job stopped." log line, which it writes once
the handler has returned, i.e. once the experiment thread has ended.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from benchmarks.bench_cancel import TARGET_S, bench_spec
from devstack.fake_runpod import FakeRunPod

KEY = "bench-key"
CASES = (
    ("eval_base", "tracin"),
    ("training", "tracin"),
    ("influence", "tracin"),
    ("influence", "datainf"),
    ("influence", "kronfluence"),
)


async def cancel_latency(
    http: httpx.AsyncClient, fake: FakeRunPod, endpoint: str, stage: str, method: str
) -> float:
    spec = bench_spec(64, 16, 8, method).model_dump(mode="json")
    job = (await http.post(f"{fake.url}/v2/{endpoint}/run", json={"input": spec})).json()["id"]
    async with asyncio.timeout(600):
        while True:
            answer = (await http.get(f"{fake.url}/v2/{endpoint}/stream/{job}?wait=1000")).json()
            if any(c["output"].get("stage") == stage for c in answer["stream"]):
                break
        stopped_before = fake.worker_log(endpoint).count("Job stopped.")
        await http.post(f"{fake.url}/v2/{endpoint}/cancel/{job}")
        cancelled_at = time.monotonic()
        while fake.worker_log(endpoint).count("Job stopped.") == stopped_before:
            await asyncio.sleep(0.02)
    return time.monotonic() - cancelled_at


async def main() -> int:
    async with (
        FakeRunPod({KEY: 100.0}, worker_poll_s=5.0) as fake,
        httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http,
    ):
        endpoint = (
            await http.post(
                f"{fake.url}/v2/serverless",
                json={
                    "name": "bench",
                    "type": "QUEUE",
                    "templateId": "influence-template",
                    "gpu": {"pools": ["AMPERE_16"]},
                    "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
                },
            )
        ).json()["id"]
        print(f"cancel latency through the runpod SDK's worker loop (target < {TARGET_S:.0f} s)")
        print(f"{'stage':<16} {'method':<12} {'latency_s':>9}")
        worst = 0.0
        for stage, method in CASES:
            latency = await cancel_latency(http, fake, endpoint, stage, method)
            worst = max(worst, latency)
            print(f"{stage:<16} {method:<12} {latency:>9.3f}", flush=True)
        print(f"worst: {worst:.3f} s ({'within' if worst < TARGET_S else 'OVER'} the target)")
        return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
