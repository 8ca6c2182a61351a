"""``python -m keyvault`` serves; ``python -m keyvault rotate`` re-encrypts every stored key
under the current master key and prints the counts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from keyvault.config import Settings
from keyvault.migrations import SchemaTooNew
from keyvault.rotation import rotate
from keyvault.server import serve
from keyvault.store import DatabaseUnavailable
from service_runtime.logs import configure_logging

log = logging.getLogger("keyvault")


# Not service_runtime.entrypoint.run_main: keyvault has a rotate subcommand and maps a
# down database or a too-new schema to exit 1, which the plain serve-only shape does not.
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyvault", description=__doc__)
    parser.add_argument("command", nargs="?", choices=["serve", "rotate"], default="serve")
    command = parser.parse_args(argv).command
    settings = Settings.load_or_exit()
    configure_logging("keyvault", settings.log_level)
    try:
        if command == "rotate":
            counts = asyncio.run(rotate(settings))
            sys.stdout.write(
                f"rotated={counts.rotated} already_current={counts.already_current} "
                f"unreadable={len(counts.unreadable)}\n"
            )
            return 1 if counts.unreadable else 0
        asyncio.run(serve(settings))
    except DatabaseUnavailable as exc:
        log.error("the database (DATABASE_URL) is unreachable", extra={"reason": str(exc)})
        return 1
    except SchemaTooNew as exc:
        log.error("refusing to start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
