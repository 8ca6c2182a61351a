"""Reading an ExperimentSpec as compute-local receives it."""

from __future__ import annotations

from gpu_core.schemas import NO_SIZE_LIMITS, ExperimentSpec, SpecError, parse_spec


class InvalidSpec(ValueError):
    """The spec is not a valid ExperimentSpec; the message names the offending fields."""


def read_spec(spec_json: bytes) -> ExperimentSpec:
    # Size limits are the gateway's to enforce; a provider only checks the spec is well formed.
    try:
        return parse_spec(spec_json, NO_SIZE_LIMITS)
    except SpecError as exc:
        raise InvalidSpec(str(exc)) from None
