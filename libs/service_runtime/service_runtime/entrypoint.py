"""The shape of a plain service entry point (``python -m <service>``): load the settings or
exit, configure logging under the service's name, serve until stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from service_runtime.logs import configure_logging
from service_runtime.settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)


def run_main(settings_type: type[S], serve: Callable[[S], Coroutine[Any, Any, None]]) -> int:
    """Load ``settings_type`` (a bad setting exits with EXIT_BAD_SETTINGS), log as its
    ``service_name`` at its ``log_level``, run ``serve`` to completion; returns 0."""
    settings = settings_type.load_or_exit()
    configure_logging(settings_type.service_name, settings.log_level)
    asyncio.run(serve(settings))
    return 0
