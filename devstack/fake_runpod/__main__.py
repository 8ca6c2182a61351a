"""``python -m devstack.fake_runpod``: the fake as its own process; prints ``FAKE_RUNPOD_URL=...``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from devstack.fake_runpod.fake import FakeRunPod
from devstack.fake_runpod.state import DEFAULT_RETENTION_S


async def _serve(args: argparse.Namespace) -> None:
    keys = {}
    for item in args.key:
        key, _, balance = item.partition("=")
        keys[key] = float(balance) if balance else 100.0
    fake = FakeRunPod(
        keys, retention_s=args.retention_s, host=args.host, port=args.port, template_ids={args.template_id}
    )
    async with fake:
        print(f"FAKE_RUNPOD_URL={fake.url}", flush=True)  # the parent reads it
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.fake_runpod", description="A fake RunPod on loopback."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", action="append", default=[], help="KEY or KEY=BALANCE_USD")
    parser.add_argument("--retention-s", type=float, default=DEFAULT_RETENTION_S)
    parser.add_argument("--template-id", default="influence-template")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
