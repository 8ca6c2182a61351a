"""The names a worker gets upload URLs for cover every file the pipeline writes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_core.pipeline import run_experiment_to_result
from gpu_core.uploads import ArtifactUploadError, planned_artifact_names, upload_artifacts


@pytest.mark.parametrize(
    ("method", "projection_dim"),
    [("tracin", None), ("datainf", None), ("kronfluence", None), ("trackstar", None), ("tracin", 32)],
)
def test_planned_names_cover_every_file_the_run_writes(
    method: str, projection_dim: int | None, make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    spec = make_spec(n_train=8, n_eval=3, method=method, epochs=2)
    spec.influence.projection_dim = projection_dim
    result = run_experiment_to_result(spec, tmp_path)
    written = {entry.name for entry in result.artifacts}
    assert "scores.npy" in written and "adapter/adapter_model.safetensors" in written
    assert written <= set(planned_artifact_names(spec)), written - set(planned_artifact_names(spec))


def test_a_file_without_an_upload_url_is_refused_before_anything_is_sent(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    from gpu_core.schemas import ArtifactEntry

    (tmp_path / "extra.bin").write_bytes(b"x")
    manifest = [ArtifactEntry(name="extra.bin", bytes=1, sha256="0" * 64, media_type="text/plain")]
    with pytest.raises(ArtifactUploadError, match="extra.bin but the job has no upload URL"):
        upload_artifacts(tmp_path, manifest, {"scores.npy": "http://127.0.0.1:9/never"})


def test_the_names_repeated_for_the_scheduler_match_gpu_core_and_need_no_numpy() -> None:
    import subprocess
    import sys

    from gpu_core import artifacts, training_summary, uploads
    from gpu_core.influence import index

    assert uploads.SCORES_NAME == artifacts.SCORES_NAME
    assert uploads.SUMMARY_NAME == training_summary.SUMMARY_NAME
    assert (uploads.INDEX_DIR_NAME, uploads.INDEX_MANIFEST, uploads.INDEX_IDS_FILE) == (
        index.INDEX_DIR_NAME,
        index.MANIFEST,
        index.IDS_FILE,
    )
    for dim in (16, 4096, 65_536):
        assert max(1, uploads.INDEX_SHARD_BYTES // (2 * dim)) == index.shard_rows_for(dim)
    # The scheduler's image has gpu_core without extras.
    probe = "import sys, gpu_core.uploads; assert not {'numpy', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_a_claim_is_padded_to_the_size_its_url_signs_and_a_larger_one_is_refused() -> None:
    import json

    from gpu_core.uploads import CLAIM_BYTES, claim_body

    claim = {"job_id": "j" * 36, "provider": "runpod", "provider_job_id": "rp-1", "claimed_at": 1.5}
    body = claim_body(claim)
    assert len(body) == CLAIM_BYTES and json.loads(body) == claim
    with pytest.raises(ArtifactUploadError, match=f"over the {CLAIM_BYTES} its URL allows"):
        claim_body({**claim, "worker_id": "w" * CLAIM_BYTES})
