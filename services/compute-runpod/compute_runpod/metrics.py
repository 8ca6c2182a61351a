"""Prometheus metrics of the RunPod client."""

from __future__ import annotations

from prometheus_client import Counter

RUNPOD_API_CALLS = Counter("runpod_api_requests_total", "HTTP calls to RunPod", ["route", "status"])
PROVIDER_ERRORS = Counter(
    "runpod_provider_errors_total", "Errors compute-runpod returned to its callers", ["code"]
)
