"""Fixtures for the deployment checks: the rendered kustomize overlays, parsed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = REPO / "deploy" / "k8s" / "overlays"
BASE = REPO / "deploy" / "k8s" / "base"


def _kustomize_major(kubectl: str) -> int:
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout
    match = re.search(r"Kustomize Version: v(\d+)", out)
    return int(match.group(1)) if match else 0


def find_kubectl() -> str:
    """The kubectl that scripts/k8s_validate.sh uses: PATH first, then the venv's."""
    candidates = [shutil.which("kubectl"), str(Path(sys.executable).parent / "kubectl")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and _kustomize_major(candidate) >= 5:
            return candidate
    pytest.fail("no kubectl with kustomize v5+: run `make k8s-validate` once, it installs one into .venv")


def render(overlay: str | Path) -> list[dict[str, Any]]:
    """An overlay by name, or any kustomization directory."""
    directory = overlay if isinstance(overlay, Path) else OVERLAYS / overlay
    result = subprocess.run([find_kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay's resources, keyed by overlay name."""
    return {path.name: render(path.name) for path in sorted(OVERLAYS.iterdir()) if path.is_dir()}


@pytest.fixture(scope="session")
def rendered_base() -> list[dict[str, Any]]:
    """deploy/k8s/base alone, as `kubectl kustomize deploy/k8s/base` renders it."""
    return render(BASE)
