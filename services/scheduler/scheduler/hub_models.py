"""The size of a hosted job's model when the catalog does not know it: read from the model's
``config.json`` on the Hugging Face Hub, never from its repository name (``me/x-0.5B`` may hold
any model), so the hosted tier's per-job ceiling prices what would really run.

Only the hosted tier needs this (its GPUs are the operator's); a BYOK job is priced by its id
as before. A config that cannot be read (no such repository, a gated one, the Hub down) refuses
the hosted job with a plain message rather than guessing. Sizes are cached per model id and
revision for the life of the process: a repository's config at a revision does not change size
often, and admission must not call the Hub for every submit; a refusal for a minute."""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any

import httpx

from cost_model import ModelCard, card_from_config

log = logging.getLogger(__name__)

# config.json files are a few KB; anything far larger is not one.
_MAX_CONFIG_BYTES = 1 << 20
_CACHE_ENTRIES = 512
# A refusal is remembered this long, so repeated submits of a model the Hub will not size do not
# each wait on the Hub.
_REFUSAL_TTL_S = 60.0


class HubModelUnknown(ValueError):
    """The model's config.json could not be read or does not describe a decoder."""


class HubModelSizes:
    """Cards of hub models sized from their config.json (``card``), cached."""

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._timeout_s = timeout_s
        self._cards: OrderedDict[str, ModelCard] = OrderedDict()
        self._refusals: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def card(self, model_id: str) -> ModelCard:
        cached = self._cards.get(model_id)
        if cached is not None:
            self._cards.move_to_end(model_id)
            return cached
        refused = self._refusals.get(model_id)
        if refused is not None and time.monotonic() < refused[0]:
            raise HubModelUnknown(refused[1])
        try:
            config = await self._config(model_id)
            try:
                card = card_from_config(model_id, config)
            except ValueError as exc:
                raise HubModelUnknown(f"model_id {model_id!r}: {exc}") from None
        except HubModelUnknown as exc:
            _remember(self._refusals, model_id, (time.monotonic() + _REFUSAL_TTL_S, str(exc)))
            raise
        _remember(self._cards, model_id, card)
        return card

    async def _config(self, model_id: str) -> dict[str, Any]:
        repo, _, revision = model_id.partition("@")
        url = f"{self._endpoint}/{repo}/resolve/{revision or 'main'}/config.json"
        refused = (
            f"model_id {model_id!r} is not in the catalog, and the hosted tier sizes such a model "
            f"from its config.json on the Hugging Face Hub, which could not be read"
        )
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=True) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise HubModelUnknown(
                            f"{refused} (HTTP {response.status_code}{_why(response.status_code)}): "
                            "choose a catalog model, or run it on your own RunPod account"
                        )
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > _MAX_CONFIG_BYTES:
                            raise HubModelUnknown(f"{refused} (it is over {_MAX_CONFIG_BYTES} bytes)")
        except httpx.HTTPError as exc:
            log.warning("hub config unreachable", extra={"model_id": model_id, "error": type(exc).__name__})
            raise HubModelUnknown(
                f"{refused} (the Hub did not answer: {type(exc).__name__}): try again later, choose a "
                "catalog model, or run it on your own RunPod account"
            ) from None
        try:
            config = json.loads(body)
        except ValueError:
            raise HubModelUnknown(f"{refused} (it is not JSON)") from None
        if not isinstance(config, dict):
            raise HubModelUnknown(f"{refused} (it is not a JSON object)")
        return config


def _remember(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > _CACHE_ENTRIES:
        cache.popitem(last=False)


def _why(status: int) -> str:
    if status in (401, 403):
        return ": the repository is gated or private"
    if status == 404:
        return ": no such repository, revision or file"
    return ""
