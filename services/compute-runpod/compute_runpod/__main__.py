"""`python -m compute_runpod`: serve until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from pydantic import ValidationError
from service_runtime.grpc_server import run_until_signal
from service_runtime.logs import configure_logging

from compute_runpod.config import Settings
from compute_runpod.server import build_server, start_metrics


async def serve(settings: Settings) -> None:
    service, client, keys = build_server(settings)
    start_metrics(settings)

    async def close() -> None:
        await client.aclose()
        await keys.close()

    await run_until_signal(service, settings.SHUTDOWN_GRACE_S, on_stop=close)


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        sys.exit(f"compute-runpod: invalid configuration: {problems}")
    configure_logging("compute-runpod", settings.LOG_LEVEL)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
