"""Which ``model_id`` a job may name on each backend.

Always: ``local/tiny-llama`` or ``local/tiny-chat`` (built in code), a catalog model
(libs/cost_model), or a hub id ``org/name`` with an optional ``@revision``. On the hosted backend
a local directory is allowed only under a root the operator lists in ``ALLOWED_MODEL_DIRS``: the
worker runs on the operator's machines, and a path elsewhere (``/etc``, ``../x``) would read
whatever is there. On BYOK (the researcher's own RunPod account) there is no operator directory
to name.

The check is lexical (absolute, normalised, no ``.``/``..`` segments, under a root): the
scheduler need not share a filesystem with the worker.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

from cost_model.model_catalog import model_cards
from gpu_core.schemas import TINY_MODEL_ID
from gpu_core.tiny_chat import TINY_CHAT_MODEL_ID

# Hugging Face repo names: letters, digits, '-', '_', '.', starting and ending with a letter or
# digit, at most 96 characters per part; a revision is a branch, tag or commit.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"^{_PART}/{_PART}(?:@[A-Za-z0-9][A-Za-z0-9._/-]{{0,199}})?$")


# Built in code (gpu_core.tiny, gpu_core.tiny_chat): no download, allowed on every backend.
BUILTIN_MODEL_IDS = (TINY_MODEL_ID, TINY_CHAT_MODEL_ID)


class ModelNotAllowed(ValueError):
    """The model id breaks the deployment's rule; the message states the rule."""


def _catalog_ids() -> set[str]:
    return {name.lower() for card in model_cards() for name in (card.id, *card.aliases)}


def _rule(hosted: bool, roots: Sequence[str]) -> str:
    allowed = (
        f"{', '.join(BUILTIN_MODEL_IDS)}, a catalog model (GET /api/models) or a hub id (org/name, "
        "optionally @revision)"
    )
    if not hosted:
        return allowed
    if roots:
        return f"{allowed}, or a directory under ALLOWED_MODEL_DIRS ({', '.join(roots)})"
    return f"{allowed}; this deployment allows no local model directories (ALLOWED_MODEL_DIRS is empty)"


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def check_model_id(model_id: str, hosted: bool, roots: Sequence[str]) -> None:
    """Raise ModelNotAllowed unless ``model_id`` may run on this backend."""
    if model_id in BUILTIN_MODEL_IDS or model_id.lower() in _catalog_ids():
        return
    if model_id.startswith(("/", "~", ".")) or "\\" in model_id:
        segments = model_id.split("/")
        if (
            hosted
            and model_id.startswith("/")
            and not any(part in (".", "..") for part in segments)
            and posixpath.normpath(model_id) == model_id.rstrip("/")
            and _under(posixpath.normpath(model_id), roots)
        ):
            return
        where = "on the hosted backend" if hosted else "on your own RunPod account"
        raise ModelNotAllowed(
            f"model_id {model_id!r} is a local directory that is not allowed {where}: "
            f"use {_rule(hosted, roots)}"
        )
    if model_id.startswith("local/"):
        raise ModelNotAllowed(
            f"model_id {model_id!r}: the built-in local models are {', '.join(BUILTIN_MODEL_IDS)}; "
            f"use {_rule(hosted, roots)}"
        )
    if HUB_ID.match(model_id) and ".." not in model_id:
        return
    raise ModelNotAllowed(
        f"model_id {model_id!r} is not a model this deployment runs: use {_rule(hosted, roots)}"
    )


def sized_from_hub(model_id: str) -> bool:
    """Whether ``model_id`` names a hub repository the catalog does not know (the hosted tier
    then sizes it from its config.json: scheduler.hub_models)."""
    if model_id in BUILTIN_MODEL_IDS or not HUB_ID.match(model_id):
        return False
    return model_id.split("@", 1)[0].lower() not in _catalog_ids()
