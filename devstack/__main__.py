"""`python -m devstack run` (what `make run` does) and `python -m devstack demo` (`make demo`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from devstack.client import GatewayClient, summarise_result
from devstack.stack import REPO_ROOT, SimulatedRunPod, Stack


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    extra_env = {}
    services = ["keyvault", "compute-local", "compute-runpod", "scheduler", "gateway"]
    if os.environ.get("HOSTED_PROVIDER"):
        extra_env["HOSTED_PROVIDER"] = os.environ["HOSTED_PROVIDER"]
    if extra_env.get("HOSTED_PROVIDER") == "modal" or os.environ.get("MODAL_TOKEN_ID"):
        services.insert(3, "compute-modal")
    simulated = SimulatedRunPod.start() if os.environ.get("DEVSTACK_FAKE_RUNPOD") == "1" else None
    if simulated is not None:
        extra_env.update(simulated.stack_env())
    stack = Stack(
        data_dir=Path(args.data_dir).resolve(),
        fixed_ports=True,
        extra_env=extra_env,
        services=tuple(services),
        scheduler_replicas=int(os.environ.get("SCHEDULER_REPLICAS", "1")),
    )
    gateway_port = os.environ.get("GATEWAY_PORT")
    if gateway_port:
        stack.ports["gateway"] = int(gateway_port)
    stop = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        print("starting PostgreSQL and the services (logs in .data/logs/) ...", flush=True)
        stack.start()
        print(
            f"\nInfluence Dashboard is up in {time.monotonic() - started:.0f} s\n"
            f"  dashboard and API: {stack.gateway_url}/   (OpenAPI: {stack.gateway_url}/docs)\n"
            f"  sign in locally with any user name; the hosted backend runs on this machine\n"
            f"  try it: make demo   (submits examples/sample.json and prints the results)\n"
            f"  or the CLI: .venv/bin/influence login; "
            f".venv/bin/influence submit examples/sample.json --follow\n"
            f"  stop with Ctrl-C\n",
            flush=True,
        )
        if simulated is not None:
            print(
                f"  RunPod is SIMULATED (DEVSTACK_FAKE_RUNPOD=1, fake at {simulated.fake.url}):\n"
                f"  Settings -> Compute -> Bring your own GPU, test key: {simulated.test_key}\n",
                flush=True,
            )
        while not stop:
            for name, service in stack.running.items():
                if service.process.poll() is not None:
                    print(f"{name} exited; see {service.log_path}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        stack.stop()
        if simulated is not None:
            simulated.stop()


def demo(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.spec).read_text())
    client = GatewayClient(args.url)
    client.sign_in_locally("demo")
    submitted = client.submit(spec)
    job_id = submitted["job_id"]
    print(f"submitted job {job_id} (estimated {submitted.get('estimated_time_s', 0):.0f} s)")
    last_stage = None
    for event in client.events(job_id):
        stage = event.get("stage")
        if event.get("type") == "progress" and stage != last_stage:
            print(f"  {stage} ...", flush=True)
            last_stage = stage
        if event.get("type") == "status" and event.get("state") == "failed":
            print(f"job failed: {event.get('error')}", file=sys.stderr)
            return 1
    job = client.job(job_id)
    if job["status"] != "completed":
        print(f"job ended as {job['status']}: {job.get('error', '')}", file=sys.stderr)
        return 1
    print(summarise_result(client.results(job_id)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="devstack")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="start the whole stack on loopback")
    run_parser.add_argument("--data-dir", default=str(REPO_ROOT / ".data"))
    demo_parser = commands.add_parser("demo", help="submit the sample experiment")
    demo_parser.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('GATEWAY_PORT', '8080')}")
    demo_parser.add_argument("--spec", default=str(REPO_ROOT / "examples" / "sample.json"))
    args = parser.parse_args()
    return run(args) if args.command == "run" else demo(args)


if __name__ == "__main__":
    sys.exit(main())
