"""The workers: services/compute-runpod/worker/handler.py run as a process under the runpod
SDK's own job loop, its webhook URLs pointing at the fake, as a RunPod worker image runs."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

from devstack.fake_runpod.state import EndpointState, FakeWorker

WORKER_HANDLER = Path(__file__).resolve().parents[2] / "services" / "compute-runpod" / "worker" / "handler.py"
WORKER_GPU = "NVIDIA A100 80GB PCIe"
# Runs the handler script as the worker image does (``python handler.py``), first asking Linux to
# kill it when the fake's process dies however it dies, and its forks (the SDK's heartbeat) when
# it dies: the SDK's loops would otherwise retry a vanished server forever. (Not a preexec_fn:
# forking with threads running is not safe.)
_WORKER_LAUNCHER = (
    "import ctypes, os, runpy, signal, sys\n"
    "if sys.platform == 'linux':\n"
    "    def die_with_parent(): ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "    die_with_parent()\n"
    "    os.register_at_fork(after_in_child=die_with_parent)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def launch_worker(
    endpoint: EndpointState,
    base_url: str,
    handler_path: Path,
    log_dir: Path,
    output_limit_bytes: int,
    worker_env: Mapping[str, str],
) -> FakeWorker:
    """A cold start: the worker image's command, with the webhook URLs of the fake at ``base_url``."""
    worker_id = f"w{uuid.uuid4().hex[:12]}"
    secret = secrets.token_hex(16)
    base, query = base_url, f"gpu={WORKER_GPU.replace(' ', '+')}"
    env = {
        **os.environ,
        # The output limit as the worker image knows it (RunPod's, or this fake's lowered one).
        "INFLUENCE_OUTPUT_LIMIT_BYTES": str(output_limit_bytes),
        **worker_env,
        **{str(k): str(v) for k, v in (endpoint.config.get("env") or {}).items()},
        "PYTHONUNBUFFERED": "1",
        "RUNPOD_POD_ID": worker_id,
        "RUNPOD_ENDPOINT_ID": endpoint.config["id"],
        "RUNPOD_AI_API_KEY": secret,
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?{query}",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?{query}",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?{query}",
        "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?{query}",
    }
    log_path = log_dir / f"{worker_id}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_LAUNCHER, str(handler_path)],
            cwd=handler_path.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return FakeWorker(worker_id, endpoint.config["id"], secret, process, log_path, endpoint.release)


def kill_worker(worker: FakeWorker) -> None:
    """RunPod terminating a worker: the whole process group (the SDK forks a heartbeat)."""
    if worker.process.poll() is None:
        try:
            os.killpg(worker.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
