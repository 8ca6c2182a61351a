"""Reading an ExperimentSpec as compute-local receives it."""

from __future__ import annotations

from gpu_core.schemas import ExperimentSpec, SpecLimits
from pydantic import ValidationError

# Size limits are the gateway's to enforce (the operator configures them there); a provider
# only checks that the spec is well formed, so a raised limit upstream is not refused here.
_NO_SIZE_LIMITS = SpecLimits(
    max_train_examples=2**31, max_eval_examples=2**31, max_text_chars=2**31
)


class InvalidSpec(ValueError):
    """The spec is not a valid ExperimentSpec; the message names the offending fields."""


def parse_spec(spec_json: bytes) -> ExperimentSpec:
    try:
        return ExperimentSpec.model_validate_json(spec_json, context={"limits": _NO_SIZE_LIMITS})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = ".".join(str(part) for part in error["loc"]) or "spec"
            problems.append(f"{location}: {str(error['msg']).removeprefix('Value error, ')}")
        raise InvalidSpec("invalid experiment spec: " + "; ".join(problems)) from None
