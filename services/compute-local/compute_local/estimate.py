"""Time and cost of an experiment on this host, from the shared cost model (local compute is free)."""

from __future__ import annotations

import cost_model
from compute_local.spec import read_spec
from influence.v1 import common_pb2

_ESTIMATE_FIELDS = frozenset(common_pb2.Estimate.DESCRIPTOR.fields_by_name)


def estimate(
    spec_json: bytes, backend: str, kind: str = "", request_json: bytes = b"", devices: int = 1
) -> common_pb2.Estimate:
    """``kind``: a later job (gpu_core.jobs) on the experiment ``spec_json``, e.g. a check;
    ``devices``: this host's (its jobs at once)."""
    spec = read_spec(spec_json)
    figures = cost_model.estimate_job(
        spec, "local", backend, kind, request_json, parallel_jobs=devices
    ).as_dict()
    return common_pb2.Estimate(**{k: v for k, v in figures.items() if k in _ESTIMATE_FIELDS})
