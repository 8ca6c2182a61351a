"""`python -m compute_runpod`: serve until SIGTERM."""

from __future__ import annotations

import sys

from compute_runpod.config import Settings
from compute_runpod.server import serve
from service_runtime.entrypoint import run_main


def main() -> int:
    return run_main(Settings, serve)


if __name__ == "__main__":
    sys.exit(main())
