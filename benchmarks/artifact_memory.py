"""Moving a 1 GiB artifact grows the scheduler's resident memory by less than 100 MB.

The real scheduler runs as its own process (devstack.Stack, embedded PostgreSQL, a local store in
a temporary directory). This process plays the compute provider: a minimal ComputeProvider whose
one job completes at once with a 1 GiB file in its manifest, streamed through FetchArtifact. The
scheduler's RSS is sampled from /proc every 20 ms while it moves the file into the store and
while the file is read back through ReadJobArtifact. Prints the figures; exits 1 above 100 MB.

    make bench-artifacts   (or: python -m benchmarks.artifact_memory)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from devstack.stack import Stack, free_port
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from service_runtime.grpc_server import insecure_channel

SIZE = 1 << 30
CHUNK = 1 << 20
LIMIT_MB = 100.0
SPEC = {
    "training_data": [{"prompt": "1 =", "completion": " 1"}],
    "eval_data": [{"prompt": "1 =", "expected": " 1"}],
}


def write_big_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for index in range(SIZE // CHUNK):
            block = index.to_bytes(8, "little") * (CHUNK // 8)
            digest.update(block)
            handle.write(block)
    return digest.hexdigest()


class OneBigArtifact(compute_pb2_grpc.ComputeProviderServicer):
    def __init__(self, path: Path, sha256: str) -> None:
        self.path, self.sha256 = path, sha256

    async def Estimate(self, request, context):
        return compute_pb2.EstimateResponse(estimate=common_pb2.Estimate(estimated_time_s=1.0))

    async def Submit(self, request, context):
        return compute_pb2.SubmitResponse(provider_job_id=f"big-{request.job_id}")

    async def GetStatus(self, request, context):
        return compute_pb2.GetStatusResponse(
            state=common_pb2.JOB_STATE_COMPLETED, result_ready=True, cursor="0"
        )

    async def GetResult(self, request, context):
        manifest = [
            {"name": "big.bin", "bytes": SIZE, "sha256": self.sha256, "media_type": "application/x-bin"}
        ]
        return compute_pb2.GetResultResponse(result_json=json.dumps({"artifacts": manifest}).encode())

    async def FetchArtifact(self, request, context):
        with open(self.path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield common_pb2.ArtifactChunk(data=chunk)


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = self.read()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.read())

    def stop(self) -> tuple[float, float, float]:
        self._stop.set()
        self._thread.join()
        return self.baseline / 1e6, self.peak / 1e6, (self.peak - self.baseline) / 1e6


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-artifact-memory-") as tmp:
        root = Path(tmp)
        big = root / "big.bin"
        sha256 = write_big_file(big)
        provider = grpc.aio.server()
        compute_pb2_grpc.add_ComputeProviderServicer_to_server(OneBigArtifact(big, sha256), provider)
        port = free_port()
        provider.add_insecure_port(f"127.0.0.1:{port}")
        await provider.start()
        env = {
            "COMPUTE_LOCAL_ADDR": f"127.0.0.1:{port}",
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
            "ARTIFACT_STORE_URL": str(root / "store"),
        }
        try:
            with Stack(data_dir=root / "stack", extra_env=env, services=("scheduler",)) as stack:
                pid = stack.running["scheduler"].process.pid
                # The scheduler checks its callers: this one calls as the gateway.
                channel = insecure_channel(
                    stack.address("scheduler"), caller_token=stack.secrets["gateway_scheduler_token"]
                )
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                sampler = RssSampler(pid)
                started = time.monotonic()
                job = await stub.SubmitJob(
                    scheduler_pb2.SubmitJobRequest(user_id="bench", spec_json=json.dumps(SPEC).encode())
                )
                finished = (common_pb2.JOB_STATE_COMPLETED, common_pb2.JOB_STATE_FAILED)
                get = scheduler_pb2.GetJobRequest(user_id="bench", job_id=job.id)
                while (done := await stub.GetJob(get)).state not in finished:
                    await asyncio.sleep(0.2)
                moved_s = time.monotonic() - started
                base_mb, peak_mb, growth_mb = sampler.stop()
                print(
                    f"store 1 GiB: {done.error or 'completed'} in {moved_s:.1f} s; scheduler RSS "
                    f"{base_mb:.0f} MB before, {peak_mb:.0f} MB peak, growth {growth_mb:.1f} MB"
                )
                if done.state != common_pb2.JOB_STATE_COMPLETED:
                    return 1
                sampler = RssSampler(pid)
                started = time.monotonic()
                digest, total = hashlib.sha256(), 0
                request = scheduler_pb2.JobArtifactRequest(user_id="bench", job_id=job.id, name="big.bin")
                async for chunk in stub.ReadJobArtifact(request):
                    digest.update(chunk.data)
                    total += len(chunk.data)
                read_s = time.monotonic() - started
                base_mb, peak_mb, read_growth_mb = sampler.stop()
                intact = total == SIZE and digest.hexdigest() == sha256
                print(
                    f"read 1 GiB back: {'intact' if intact else 'CORRUPT'} in {read_s:.1f} s; "
                    f"scheduler RSS {base_mb:.0f} MB before, {peak_mb:.0f} MB peak, "
                    f"growth {read_growth_mb:.1f} MB"
                )
                await channel.close()
        finally:
            await provider.stop(0)
    ok = intact and max(growth_mb, read_growth_mb) < LIMIT_MB
    print(f"target: growth under {LIMIT_MB:.0f} MB: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(asyncio.run(main()))
