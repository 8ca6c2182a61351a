"""Entry point: ``python -m compute_modal``."""

from __future__ import annotations

import asyncio
import sys

from service_runtime.logs import configure_logging

from compute_modal.config import SettingsError, load_settings
from compute_modal.server import serve


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.stderr.write(f"compute-modal: refusing to start: {exc}\n")
        return 2
    configure_logging("compute-modal", settings.LOG_LEVEL)
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
