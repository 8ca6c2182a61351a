"""A researcher's own Hugging Face token in a worker: set as ``HF_TOKEN`` while the job loads its
model (huggingface_hub reads the variable on every download), removed once the job has moved past
loading, and in any case when the job ends. The token arrives in the job's payload under
``HF_TOKEN_FIELD`` (compute-runpod's job input, compute-modal's function argument); nothing here
logs it. One job runs at a time in a worker process, so the process environment is the job's.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

HF_TOKEN_FIELD = "hf_token"
_ENV = "HF_TOKEN"
# Events of these stages (and an empty one) still belong to loading the model.
_LOADING_STAGES = frozenset({"", "loading_model", "starting", "downloading"})


class HfTokenForLoad:
    """``with HfTokenForLoad(payload.pop(HF_TOKEN_FIELD, "")) as token:`` then ``token.seen(event)``
    for each event the job yields."""

    def __init__(self, token: Any) -> None:
        self._token = token if isinstance(token, str) else ""
        self._previous: str | None = None
        self._set = False

    def start(self) -> None:
        if self._token and not self._set:
            self._previous = os.environ.get(_ENV)
            os.environ[_ENV] = self._token
            self._set = True

    def __enter__(self) -> HfTokenForLoad:
        self.start()
        return self

    def seen(self, event: dict[str, Any]) -> None:
        """Remove the token once an event shows the job past loading its model."""
        if self._set and str(event.get("stage") or "") not in _LOADING_STAGES:
            self.end()

    def end(self) -> None:
        """Put HF_TOKEN back as it was before ``start``."""
        if not self._set:
            return
        if self._previous is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = self._previous
        self._set = False

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end()
