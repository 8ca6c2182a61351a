"""The worker under the runpod SDK's own local API (a smoke test: that server, runpod-python's
serverless/modules/rp_fastapi.py, is not faithful to RunPod; the fake RunPod covers the real
behaviour)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from devstack.fake_runpod import WORKER_HANDLER

STARTUP_LIMIT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(process: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            pytest.skip(f"the runpod SDK's API server did not start: {output[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)  # polling a child process's port: there is no event to await
    pytest.skip(f"the runpod SDK's API server did not open port {port} in {STARTUP_LIMIT_S} s")


def test_runsync_with_test_input_streams_progress_then_result() -> None:
    worker_dir = WORKER_HANDLER.parent
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(WORKER_HANDLER),
            "--rp_serve_api",
            "--rp_api_host",
            "127.0.0.1",
            "--rp_api_port",
            str(port),
            "--rp_log_level",
            "ERROR",
        ],
        cwd=worker_dir,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_port(process, port)
        payload = json.loads((worker_dir / "test_input.json").read_text())
        answer = httpx.post(f"http://127.0.0.1:{port}/runsync", json=payload, timeout=300).json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert answer["status"] == "COMPLETED", answer
    output = answer["output"]
    assert [c["type"] for c in output[:-1]] == ["progress"] * (len(output) - 1)
    assert output[0]["stage"] == "loading_model"
    assert output[-1]["type"] == "result"
    assert set(output[-1]["result"]) >= {"eval_results", "influence", "training"}
