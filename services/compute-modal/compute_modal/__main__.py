"""Entry point: ``python -m compute_modal``."""

from __future__ import annotations

import sys

from compute_modal.config import Settings
from compute_modal.server import serve
from service_runtime.entrypoint import run_main


def main() -> int:
    return run_main(Settings, serve)


if __name__ == "__main__":
    sys.exit(main())
