"""Entry point: ``python -m compute_local``."""

from __future__ import annotations

import asyncio
import sys

from compute_local.config import Settings
from compute_local.server import serve
from service_runtime.logs import configure_logging


def main() -> int:
    settings = Settings.load_or_exit()
    configure_logging("compute-local", settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
