"""Entry point: ``python -m compute_local``."""

from __future__ import annotations

import asyncio
import sys

from service_runtime.logs import configure_logging

from compute_local.config import SettingsError, load_settings
from compute_local.server import serve


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.stderr.write(f"compute-local: refusing to start: {exc}\n")
        return 2
    configure_logging("compute-local", settings.log_level)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
