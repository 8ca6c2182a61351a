"""Reading an ExperimentSpec (and a later job's inputs) as compute-local receives it."""

from __future__ import annotations

import json

from gpu_core.jobs import job_kind, make_payload, parse_payload
from gpu_core.schemas import NO_SIZE_LIMITS, ExperimentSpec, SpecError, parse_spec

# Beside spec.json when the spec names stored datasets: where the child reads them (gpu_core.datasets).
DATASETS_FILE = "datasets.json"


class InvalidSpec(ValueError):
    """The spec is not a valid ExperimentSpec; the message names the offending fields."""


def read_spec(spec_json: bytes) -> ExperimentSpec:
    # Size limits are the gateway's to enforce; a provider only checks the spec is well formed.
    try:
        return parse_spec(spec_json, NO_SIZE_LIMITS)
    except SpecError as exc:
        raise InvalidSpec(str(exc)) from None


def later_job_files(
    kind: str, spec_json: bytes, request_json: bytes, parent_result_json: bytes
) -> dict[str, bytes]:
    """The files a later job (e.g. a counterfactual check) keeps beside its spec, checked the
    way the worker will read them; none for an experiment. Raises ValueError naming the field."""
    if not job_kind(kind).needs_parent:
        return {}
    try:
        request, parent = json.loads(request_json or b"{}"), json.loads(parent_result_json or b"null")
    except ValueError:
        raise ValueError("request_json and parent_result_json must be JSON") from None
    parse_payload(make_payload(kind, json.loads(spec_json), request, parent))
    return {"request.json": request_json, "parent_result.json": parent_result_json}
