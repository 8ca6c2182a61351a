"""The GPU check's own logic on the CPU: its case runner goes on past a failing case and the run
exits non-zero with every case in its JSON; without CUDA ``make gpu-check`` refuses plainly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_a_failing_case_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    """``bogus`` is refused by the spec's validation (a real failure of the planted case); the
    planted TracIn case after it still runs and passes; the exit status says a case failed."""
    out = tmp_path / "gpu-check.json"
    status = gpu_check.main(
        ["--device", "cpu", "--tiny", "--cases", "planted", "--methods", "bogus,tracin", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert status == gpu_check.EXIT_FAILED
    assert [(row["case"], row["status"]) for row in report["cases"]] == [
        ("planted-bogus", "failed"),
        ("planted-tracin", "passed"),
    ]
    assert "influence_method" in report["cases"][0]["error"]
    assert report["cases"][1]["figures"]["top1_rate"] >= gpu_check.PLANTED_TOP1_MIN
    assert report["failed"] == ["planted-bogus"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_make_gpu_check_refuses_plainly_without_cuda() -> None:
    done = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "gpu-check: no CUDA GPU here" in done.stderr and "nothing was run" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
