"""``python -m gateway``: serve the REST API on GATEWAY_HOST:GATEWAY_PORT."""

from __future__ import annotations

import sys

from gateway.config import Settings
from gateway.server import serve
from service_runtime.entrypoint import run_main


def main() -> int:
    return run_main(Settings, serve)


if __name__ == "__main__":
    sys.exit(main())
