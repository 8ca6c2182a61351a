"""The RunPod worker image: the same pinned GPU stack as Modal and development, and its entry
point choosing where Hugging Face models come from (run for real with a stand-in python)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
WORKER = ROOT / "services" / "compute-runpod" / "worker"


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r'^\s*"?([A-Za-z0-9_.-]+)==([0-9][^"\s,]*)', text, flags=re.MULTILINE))


def test_the_worker_pins_the_torch_stack_of_modal_and_development() -> None:
    worker = pins((WORKER / "requirements.txt").read_text())
    runtime = pins((ROOT / "requirements" / "runtime.txt").read_text())
    modal = pins((ROOT / "services" / "compute-modal" / "worker" / "modal_app.py").read_text())
    for package in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        assert worker[package] == runtime[package] == modal[package], package
    assert worker["bitsandbytes"] == modal["bitsandbytes"]


def run_start(tmp_path: Path, volume: Path) -> dict[str, str]:
    """start.sh with a stand-in ``python`` that prints the environment the handler would get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text("#!/bin/sh\nenv\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HF_HOME": "/opt/hf-cache",
        "GPU_CORE_CACHE_DIR": "/home/worker/.cache/influence-dashboard",
        "RUNPOD_VOLUME_DIR": str(volume),
    }
    output = subprocess.run(
        ["sh", str(WORKER / "start.sh")], env=env, check=True, capture_output=True, text=True, cwd=tmp_path
    ).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def test_without_a_volume_the_image_cache_is_used(tmp_path: Path) -> None:
    env = run_start(tmp_path, tmp_path / "no-volume")
    assert env["HF_HOME"] == "/opt/hf-cache" and "HF_HUB_CACHE" not in env


def test_a_network_volume_holds_the_hugging_face_cache(tmp_path: Path) -> None:
    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    env = run_start(tmp_path, volume)
    assert env["HF_HOME"] == f"{volume}/huggingface-cache"
    assert (volume / "huggingface-cache" / "hub").is_dir()  # RunPod's cached-model layout
    assert env["GPU_CORE_CACHE_DIR"] == f"{volume}/huggingface-cache/influence-dashboard"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_read_only_model_cache_is_read_in_place(tmp_path: Path) -> None:
    volume = tmp_path / "runpod-volume"
    hub = volume / "huggingface-cache" / "hub"
    (hub / "models--org--name").mkdir(parents=True)
    hub.chmod(0o555)
    try:
        env = run_start(tmp_path, volume)
    finally:
        hub.chmod(0o755)
    assert env["HF_HUB_CACHE"] == str(hub) and env["HF_HOME"] == "/opt/hf-cache"
