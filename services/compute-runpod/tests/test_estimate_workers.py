"""compute-runpod's estimate counts a sharded experiment's shards at a time from its researchers'
endpoints' workers (RUNPOD_WORKERS_MAX) and says so in Estimate.parallel_jobs, which the
scheduler resolves influence.shards "auto" with (issue 27)."""

from __future__ import annotations

import json

import pytest
from runpod_testkit import Stack, spec_bytes

from influence.v1 import compute_pb2

AUTO = {"influence_method": "trackstar", "influence": {"shards": "auto"}}
# Enough examples for 2 shards' worth (one per 5,000).
TRAINING = [{"prompt": f"Q{i}: what is {i} plus one?", "completion": f" {i + 1}"} for i in range(10_000)]


@pytest.fixture
def service_overrides(request: pytest.FixtureRequest) -> dict[str, object]:
    return getattr(request, "param", {})


async def estimate(stack: Stack, backend: str, **changes: object) -> compute_pb2.EstimateResponse:
    spec = json.loads(spec_bytes(training_data=TRAINING, **AUTO))
    spec.update(changes)
    return await stack.stub.Estimate(
        compute_pb2.EstimateRequest(spec_json=json.dumps(spec).encode(), backend=backend)
    )


@pytest.mark.parametrize(
    ("service_overrides", "workers", "shards"),
    [({}, 1, 1), ({"runpod_workers_max": 2}, 2, 2)],
    indirect=["service_overrides"],
)
async def test_auto_shards_as_many_as_the_endpoint_has_workers(
    stack: Stack, workers: int, shards: int
) -> None:
    answer = (await estimate(stack, "runpod")).estimate
    assert (answer.parallel_jobs, answer.shards) == (workers, shards)
    # Four shards asked for run on the endpoint's workers, that many at a time.
    four = (await estimate(stack, "runpod", influence={"shards": 4})).estimate
    assert four.shards == 4 and four.parallel_jobs == workers
    assert any(f"4 index shards, {workers} at a time" in note for note in four.notes)
