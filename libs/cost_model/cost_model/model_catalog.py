"""The model catalog: known models with their size, architecture, default quantization, context
length and licence, read from ``data/models.json``.

Unknown model ids get an estimate instead of an error: the size is parsed from the id
("...-7B-...", "...-270m") and the architecture derived from it (``params ≈ 12·L·d²`` with
``d = 128·L``, the shape of common 1-30B decoders); with no size in the id the model is assumed
to have ``UNKNOWN_MODEL_PARAMS_B`` parameters. Either way the card says so in ``note``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gpu_core.schemas import Hyperparams, Quantization

UNKNOWN_MODEL_PARAMS_B = 7.0
_SIZE_IN_ID = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", re.IGNORECASE)
# Beyond this size a model is loaded in 4-bit unless the caller asks otherwise.
_QUANTIZE_ABOVE_B = 6.0


class Architecture(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tied_embeddings: bool = True
    head_dim: int | None = Field(default=None, gt=0)
    # Attention that softcaps its scores (Gemma 2): gpu_core runs it eager, which keeps the
    # batch x heads x seq^2 scores; every other architecture runs sdpa.
    eager_attention: bool = False

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def embedding_params(self) -> int:
        """Parameters of the token embedding and LM head, which bitsandbytes keeps in 16-bit."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def module_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA target module; unknown names count as square."""
        d, q = self.hidden_size, self.num_heads * self.attention_head_dim
        kv = self.num_kv_heads * self.attention_head_dim
        shapes = {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "qkv_proj": (d, q + 2 * kv),
            "gate_proj": (d, self.intermediate_size),
            "up_proj": (d, self.intermediate_size),
            "down_proj": (self.intermediate_size, d),
            "gate_up_proj": (d, 2 * self.intermediate_size),
        }
        return shapes.get(name, (d, d))


class ModelCard(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str
    params_b: float = Field(gt=0)
    default_quantization: Quantization
    context_length: int = Field(gt=0)
    licence: str
    architecture: Architecture
    aliases: tuple[str, ...] = ()
    chars_per_token: float = Field(default=4.0, gt=0)
    note: str = ""
    known: bool = True
    # Hyperparams this model learns with, over gpu_core's defaults (which suit pretrained models
    # of 0.3B and up); the dashboard fills them in when the model is chosen.
    presets: dict[str, Any] = Field(default_factory=dict)

    @property
    def gated(self) -> bool:
        """Hugging Face serves the weights only to accounts that accepted the licence, with a
        token: the catalog's licence says "needs HF_TOKEN"."""
        return self.known and "needs HF_TOKEN" in self.licence

    @model_validator(mode="after")
    def _presets_are_hyperparams(self) -> ModelCard:
        self.preset_hyperparams()
        return self

    def preset_hyperparams(self) -> Hyperparams:
        """The presets as a full, validated gpu_core ``Hyperparams`` in the default quantization."""
        return Hyperparams.model_validate({"quantization": self.default_quantization, **self.presets})


class _CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    as_of: str
    source: str
    models: list[ModelCard]


@cache
def _catalog_file() -> _CatalogFile:
    text = resources.files("cost_model").joinpath("data/models.json").read_text(encoding="utf-8")
    return _CatalogFile.model_validate(json.loads(text))


def model_cards() -> list[ModelCard]:
    return list(_catalog_file().models)


@cache
def _index() -> dict[str, ModelCard]:
    index: dict[str, ModelCard] = {}
    for card in _catalog_file().models:
        for name in (card.id, *card.aliases):
            index[name.lower()] = card
    return index


def architecture_for(params_b: float) -> Architecture:
    """A plausible decoder shape for ``params_b`` billion parameters (12·L·d², d = 128·L)."""
    layers = max(2, round((params_b * 1e9 / (12 * 128**2)) ** (1 / 3)))
    hidden = max(128, round(((params_b * 1e9) / (12 * layers)) ** 0.5 / 128) * 128)
    heads = max(1, hidden // 128)
    return Architecture(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 4),
        intermediate_size=hidden * 4,
        vocab_size=128_000,
        tied_embeddings=False,
    )


def parse_size_b(model_id: str) -> float | None:
    """Parameter count in billions written in a model id ("Foo-7B", "bar-1.5b", "baz-270m")."""
    matches = _SIZE_IN_ID.findall(model_id.rsplit("/", 1)[-1])
    if not matches:
        return None
    number, unit = matches[-1]
    value = float(number) / (1000 if unit.lower() == "m" else 1)
    return value if value > 0 else None


def sized_model(model_id: str) -> ModelCard | None:
    """The card of ``model_id`` when its size is known (the catalog has it, or its id names a
    size); None when only the ``UNKNOWN_MODEL_PARAMS_B`` assumption is left."""
    card = lookup_model(model_id)
    return card if card.known or parse_size_b(model_id) is not None else None


def lookup_model(model_id: str) -> ModelCard:
    """The catalog card for ``model_id`` (or one of its aliases), else an estimated card."""
    # A pinned revision ("org/name@v1") is the same model.
    card = _index().get(model_id.strip().split("@", 1)[0].lower())
    if card is not None:
        return card
    size = parse_size_b(model_id)
    if size is None:
        size = UNKNOWN_MODEL_PARAMS_B
        note = (
            f"{model_id!r} is not in the catalog and its id names no size: "
            f"assumed {UNKNOWN_MODEL_PARAMS_B:g}B parameters"
        )
    else:
        note = f"{model_id!r} is not in the catalog: size {size:g}B read from its id"
    return ModelCard(
        id=model_id,
        name=model_id,
        params_b=size,
        default_quantization="4bit" if size > _QUANTIZE_ABOVE_B else "none",
        context_length=8192,
        licence="unknown: check the model card",
        note=note,
        architecture=architecture_for(size),
        known=False,
    )


def card_from_config(model_id: str, config: Mapping[str, Any]) -> ModelCard:
    """The card of a model not in the catalog, sized from its ``config.json`` (the Hugging Face
    transformers fields; a multimodal config's ``text_config``; experts counted in the MLP).
    Raises ValueError naming what the config lacks."""
    nested = config.get("text_config")
    text: Mapping[str, Any] = nested if isinstance(nested, Mapping) else config
    try:
        hidden = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        architecture = Architecture(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            intermediate_size=int(text.get("intermediate_size") or 4 * hidden),
            vocab_size=int(text["vocab_size"]),
            tied_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", True))),
            head_dim=int(text["head_dim"]) if text.get("head_dim") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        detail = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else "a field is not a positive number"
        raise ValueError(f"the config.json of {model_id!r} does not describe a decoder ({detail})") from None
    experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
    attention = sum(
        math.prod(architecture.module_shape(name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    )
    mlp = experts * sum(
        math.prod(architecture.module_shape(name)) for name in ("gate_proj", "up_proj", "down_proj")
    )
    params_b = (architecture.embedding_params + layers * (attention + mlp)) / 1e9
    return ModelCard(
        id=model_id,
        name=model_id,
        params_b=params_b,
        default_quantization="4bit" if params_b > _QUANTIZE_ABOVE_B else "none",
        context_length=int(text.get("max_position_embeddings") or 8192),
        licence="unknown: check the model card",
        note=f"{model_id!r} is not in the catalog: {params_b:.2f}B parameters counted from its config.json",
        architecture=architecture,
        known=False,
    )
