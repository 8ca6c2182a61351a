"""`python -m compute_runpod`: serve until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from compute_runpod.config import Settings
from compute_runpod.server import serve
from service_runtime.logs import configure_logging


def main() -> int:
    settings = Settings.load_or_exit()
    configure_logging("compute-runpod", settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
