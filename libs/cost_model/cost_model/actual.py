"""The real cost of a finished job: the GPU-seconds its provider measured, priced at the price
table's rate for the GPU it ran on (docs/cost-model.md, "Actual cost").

The GPU comes from the worker (gpu_core's ``environment.gpu_name``, e.g. "NVIDIA A100-SXM4-80GB")
or from what was requested (a Modal GPU type, a RunPod pool). A device name is matched to the
table's GPUs by model tokens: the table's name and each "/"-separated name in its description
("L40 / L40S / RTX 6000 Ada") must appear whole in the device's name, vendor words aside. A device
the table does not know is priced as the requested GPU, and the source says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cost_model.prices import GpuOffer, PriceTable, price_table

# Words every vendor puts in front of a model name; they tell no GPU apart.
_VENDOR_WORDS = frozenset({"NVIDIA", "GEFORCE", "TESLA", "AMD"})


@dataclass(frozen=True)
class ActualCost:
    """The fields of ``influence.v1.JobCost``."""

    gpu_seconds: float
    delay_seconds: float
    gpu: str
    device: str
    usd_per_second: float
    cost_usd: float
    source: str


def _tokens(name: str) -> frozenset[str]:
    words = re.split(r"[\s\-_/,]+", re.sub(r"\([^)]*\)", " ", name).upper())
    return frozenset(word for word in words if word and word not in _VENDOR_WORDS)


def _names(gpu: str, offer: GpuOffer) -> list[frozenset[str]]:
    names = [
        _tokens(gpu),
        *(_tokens(part) for part in re.sub(r"\([^)]*\)", " ", offer.description).split("/")),
    ]
    return [name for name in names if name]


def match_device(table: PriceTable, device: str) -> str | None:
    """The table's GPU that ``device`` is, or None. Several matches: the most specific name wins
    (an "A100 80GB" over an "A100"), then the cheaper GPU."""
    if device in table.gpus:
        return device
    reported = _tokens(device)
    if not reported:
        return None
    best: tuple[int, float, str] | None = None
    for gpu, offer in table.gpus.items():
        specificity = max((len(name) for name in _names(gpu, offer) if name <= reported), default=0)
        if specificity and (best is None or (-specificity, offer.usd_per_second) < (-best[0], best[1])):
            best = (specificity, offer.usd_per_second, gpu)
    return best[2] if best is not None else None


def actual_cost(
    provider: str,
    gpu_seconds: float,
    delay_seconds: float,
    device: str,
    requested_gpu: str,
    measured_by: str,
) -> ActualCost:
    """Price ``gpu_seconds`` at ``provider``'s table rate for the GPU the job ran on: ``device``
    when the table knows it, else ``requested_gpu``, else the table's default GPU. Raises
    PriceTableError when the table cannot be read."""
    table = price_table(provider)
    gpu = match_device(table, device) if device else None
    how = f"{provider} price table of {table.as_of}"
    if gpu is None:
        gpu = requested_gpu if requested_gpu in table.gpus else table.default_gpu
        if device and gpu is not None:
            how += f"; {device!r} is not in it, priced as the requested {gpu}"
    if gpu is None:
        return ActualCost(
            gpu_seconds,
            delay_seconds,
            requested_gpu,
            device,
            0.0,
            0.0,
            f"{measured_by}; not priced: {how} has no GPU for it",
        )
    rate = table.gpus[gpu].usd_per_second
    seconds = max(gpu_seconds, 0.0)
    return ActualCost(
        seconds, max(delay_seconds, 0.0), gpu, device, rate, seconds * rate, f"{measured_by}; {how}"
    )
