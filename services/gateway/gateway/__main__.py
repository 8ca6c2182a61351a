"""``python -m gateway``: serve the REST API on GATEWAY_HOST:GATEWAY_PORT."""

from __future__ import annotations

import asyncio
import sys

from gateway.config import Settings
from gateway.server import serve
from service_runtime.logs import configure_logging


def main() -> int:
    settings = Settings.load_or_exit()
    configure_logging("gateway", settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
