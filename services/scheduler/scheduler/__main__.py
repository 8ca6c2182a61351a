"""Entry point: ``python -m scheduler`` serves; ``python -m scheduler migrate`` migrates and exits."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from scheduler.config import Settings
from scheduler.db import migrate
from scheduler.server import serve
from service_runtime.logs import configure_logging


# Not service_runtime.entrypoint.run_main: the migrate subcommand needs the settings
# before choosing what to run, which the plain serve-only shape does not offer.
def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m scheduler")
    parser.add_argument("command", nargs="?", choices=["serve", "migrate"], default="serve")
    args = parser.parse_args()
    settings = Settings.load_or_exit()
    configure_logging("scheduler", settings.log_level)
    if args.command == "migrate":
        applied = asyncio.run(migrate(settings.database_url.get_secret_value()))
        logging.getLogger("scheduler").info("migrations done", extra={"applied": applied})
        return 0
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
