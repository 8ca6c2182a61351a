"""Entry point: ``python -m compute_modal``."""

from __future__ import annotations

import asyncio
import sys

from compute_modal.config import Settings
from compute_modal.server import serve
from service_runtime.logs import configure_logging


def main() -> int:
    settings = Settings.load_or_exit()
    configure_logging("compute-modal", settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
