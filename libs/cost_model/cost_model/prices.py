"""Per-second GPU price tables, one JSON file per provider, each dated and with its source.

The tables ship in ``data/prices/<provider>.json``. An operator overrides them without a
release: ``COST_MODEL_<PROVIDER>_PRICES`` (e.g. ``COST_MODEL_RUNPOD_PRICES``) names one file,
``COST_MODEL_PRICES_DIR`` a directory holding ``<provider>.json`` files (a provider missing there
keeps the shipped table). A file is re-read when it changes. A bad file raises
``PriceTableError`` naming the file and the field.

Each file maps the memory tiers (16/24/48/80/141 GB) to one of its GPUs; ``peak_tflops`` (dense
16-bit tensor throughput) and ``memory_bandwidth_gbs`` feed the time estimate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROVIDERS: tuple[str, ...] = ("local", "modal", "runpod")
TIERS_GB: tuple[int, ...] = (16, 24, 48, 80, 141)
PRICES_DIR_ENV = "COST_MODEL_PRICES_DIR"
# The operator's override of the GPU every Modal job runs on (and is priced at); unset, each job
# runs on its memory tier's GPU (worker/modal_app.py, compute-modal's submit).
MODAL_GPU_ENV = "MODAL_GPU"


class PriceTableError(ValueError):
    """A price table file is missing, unreadable or invalid."""


class GpuOffer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = ""
    memory_gb: float = Field(ge=0)
    usd_per_second: float = Field(ge=0)
    peak_tflops: float = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0)
    # Fixed cost of one model pass (a batch's forward, backward or decode step) beyond its FLOPs:
    # kernel launches and Python; what dominates small models. Measured in docs/gpu_core.md.
    pass_latency_s: float = Field(default=0.005, ge=0)

    @property
    def usd_per_hour(self) -> float:
        return self.usd_per_second * 3600


class PriceTable(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    as_of: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    source: str = Field(min_length=1)
    tiers: dict[int, str]
    gpus: dict[str, GpuOffer] = Field(min_length=1)
    default_gpu: str | None = None

    @model_validator(mode="after")
    def _tiers_name_known_gpus(self) -> PriceTable:
        for tier, gpu in self.tiers.items():
            if gpu not in self.gpus:
                raise ValueError(f"tiers[{tier}] names {gpu!r}, which is not in gpus")
            if self.gpus[gpu].memory_gb < tier:
                raise ValueError(f"tiers[{tier}] names {gpu!r} with only {self.gpus[gpu].memory_gb:g} GB")
        if self.default_gpu is not None and self.default_gpu not in self.gpus:
            raise ValueError(f"default_gpu {self.default_gpu!r} is not in gpus")
        if self.default_gpu is None and set(self.tiers) != set(TIERS_GB):
            raise ValueError(f"tiers must map exactly {list(TIERS_GB)} (or set default_gpu)")
        return self

    def gpus_for_tier(self, tier_gb: int) -> list[tuple[str, GpuOffer]]:
        """Every GPU with at least ``tier_gb`` of memory, cheapest first (ties: less memory)."""
        fitting = [(name, offer) for name, offer in self.gpus.items() if offer.memory_gb >= tier_gb]
        return sorted(fitting, key=lambda item: (item[1].usd_per_second, item[1].memory_gb, item[0]))

    def gpu_for_tier(self, tier_gb: int) -> tuple[str, GpuOffer]:
        name = self.tiers.get(tier_gb, self.default_gpu)
        if name is None:
            raise PriceTableError(f"{self.provider} price table has no GPU for the {tier_gb} GB tier")
        return name, self.gpus[name]


@dataclass(frozen=True)
class _Cached:
    mtime_ns: int
    table: PriceTable


_cache: dict[Path, _Cached] = {}


def price_file(provider: str) -> Path:
    """The file the ``provider`` table is read from, after the operator's overrides."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    single = os.environ.get(f"COST_MODEL_{provider.upper()}_PRICES")
    if single:
        return Path(single)
    directory = os.environ.get(PRICES_DIR_ENV)
    if directory and (Path(directory) / f"{provider}.json").is_file():
        return Path(directory) / f"{provider}.json"
    return Path(str(resources.files("cost_model").joinpath(f"data/prices/{provider}.json")))


def price_table(provider: str) -> PriceTable:
    path = price_file(provider)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise PriceTableError(f"price table for {provider} not readable at {path}: {exc.strerror}") from None
    cached = _cache.get(path)
    if cached is not None and cached.mtime_ns == mtime:
        return cached.table
    try:
        table = PriceTable.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise PriceTableError(f"price table {path} is not valid JSON: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'file'}: {error['msg']}" for error in exc.errors()
        )
        raise PriceTableError(f"price table {path} is invalid: {problems}") from None
    if table.provider != provider:
        raise PriceTableError(f"price table {path} is for {table.provider!r}, expected {provider!r}")
    _cache[path] = _Cached(mtime, table)
    return table


def job_gpu(provider: str, tier_gb: int) -> tuple[str, GpuOffer]:
    """The GPU a job needing the ``tier_gb`` memory tier runs on at ``provider``, and its offer:
    the price table's GPU for the tier, or on Modal the operator's ``MODAL_GPU`` when set."""
    table = price_table(provider)
    override = os.environ.get(MODAL_GPU_ENV, "").strip() if provider == "modal" else ""
    if not override:
        return table.gpu_for_tier(tier_gb)
    if override not in table.gpus:
        raise PriceTableError(
            f"{MODAL_GPU_ENV}={override!r} is not a GPU of the modal price table "
            f"(one of {', '.join(table.gpus)})"
        )
    return override, table.gpus[override]
