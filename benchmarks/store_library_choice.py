"""obstore vs fsspec (s3fs) for the artifact store: a 256 MiB streamed put and get, wall time and
peak resident memory, on the local filesystem and on an S3-protocol server on loopback (moto).

Run once, in a scratch venv with both libraries (the project itself depends on obstore only):

    python3 -m venv /tmp/store-choice && /tmp/store-choice/bin/pip install obstore s3fs 'moto[server]' psutil
    /tmp/store-choice/bin/python benchmarks/store_library_choice.py

Each case runs in its own process so its peak RSS is its own. Figures are in docs/artifacts.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

SIZE = 256 * 1024 * 1024
CHUNK = 8 * 1024 * 1024


def _chunks():
    block = os.urandom(CHUNK)
    for _ in range(SIZE // CHUNK):
        yield block


class _RssSampler:
    """Peak resident memory sampled every 5 ms (ru_maxrss would carry the parent's peak over exec)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def growth_mb(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.baseline) / 2**20


def case(library: str, backend: str, root: str, endpoint: str) -> dict:
    if library == "obstore":
        import obstore
        from obstore.store import LocalStore, S3Store
    else:
        import fsspec
    sampler = _RssSampler()
    if library == "obstore":
        store: LocalStore | S3Store
        if backend == "local":
            store = LocalStore(root, mkdir=True)
        else:
            store = S3Store(
                "bench",
                endpoint=endpoint,
                access_key_id="k",
                secret_access_key="s",
                region="us-east-1",
                client_options={"allow_http": True},
            )
        started = time.perf_counter()
        obstore.put(store, "jobs/x/blob", _chunks(), chunk_size=CHUNK)
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        total = sum(len(c) for c in obstore.get(store, "jobs/x/blob").stream(min_chunk_size=CHUNK))
        get_s = time.perf_counter() - started
        presign_put = backend == "s3"
    else:
        if backend == "local":
            fs, path = fsspec.filesystem("file"), f"{root}/jobs/x/blob"
            fs.makedirs(f"{root}/jobs/x", exist_ok=True)
        else:
            client_kwargs = {"endpoint_url": endpoint, "region_name": "us-east-1"}
            fs = fsspec.filesystem("s3", key="k", secret="s", client_kwargs=client_kwargs)
            path = "bench/jobs/x/blob"
        started = time.perf_counter()
        with fs.open(path, "wb", block_size=CHUNK) as handle:
            for chunk in _chunks():
                handle.write(chunk)
        put_s = time.perf_counter() - started
        started = time.perf_counter()
        total = 0
        with fs.open(path, "rb", block_size=CHUNK) as handle:
            while chunk := handle.read(CHUNK):
                total += len(chunk)
        get_s = time.perf_counter() - started
        # s3fs.sign() makes presigned GET URLs only; a PUT URL needs botocore directly.
        presign_put = False
    assert total == SIZE, total
    return {
        "library": library,
        "backend": backend,
        "put_s": round(put_s, 2),
        "get_s": round(get_s, 2),
        "peak_rss_growth_mb": round(sampler.growth_mb(), 1),
        "presigned_put_in_library": presign_put,
    }


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(case(*sys.argv[1:5])))
        return
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    import boto3

    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    ).create_bucket(Bucket="bench")
    try:
        for backend in ("local", "s3"):
            for library in ("obstore", "fsspec"):
                with tempfile.TemporaryDirectory() as root:
                    out = subprocess.run(
                        [sys.executable, __file__, library, backend, root, endpoint],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                    print(out.strip(), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
