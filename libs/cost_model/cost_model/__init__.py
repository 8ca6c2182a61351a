"""Cost model of Influence Dashboard: model catalog, GPU recommendation, time and cost estimates.

Pure Python (pydantic and gpu_core's schemas). The formulas are in ``memory`` (GPU memory and
tier), ``timing`` (time) and ``estimate`` (cost = time x $/s); docs/cost-model.md explains them.
"""

from cost_model.actual import ActualCost, actual_cost, match_device
from cost_model.estimate import (
    BackendPrice,
    CostEstimate,
    ModelInfo,
    catalog,
    estimate,
    estimate_job,
    fitting_gpus,
)
from cost_model.memory import GpuRecommendation, MemoryBreakdown, recommend_gpu
from cost_model.model_catalog import (
    Architecture,
    ModelCard,
    card_from_config,
    lookup_model,
    model_cards,
    sized_model,
)
from cost_model.prices import TIERS_GB, GpuOffer, PriceTable, PriceTableError, job_gpu, price_table
from cost_model.workload import Workload

__all__ = [
    "TIERS_GB",
    "ActualCost",
    "Architecture",
    "BackendPrice",
    "CostEstimate",
    "GpuOffer",
    "GpuRecommendation",
    "MemoryBreakdown",
    "ModelCard",
    "ModelInfo",
    "PriceTable",
    "PriceTableError",
    "Workload",
    "actual_cost",
    "catalog",
    "estimate",
    "estimate_job",
    "fitting_gpus",
    "job_gpu",
    "card_from_config",
    "lookup_model",
    "match_device",
    "model_cards",
    "price_table",
    "recommend_gpu",
    "sized_model",
]
