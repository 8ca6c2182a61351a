"""Each service's Dockerfile: two pinned stages, a fixed non-root user, an exec-form entry point,
and exactly the workspace packages that the service's pyproject.toml depends on."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
ENTRY_MODULES = {
    "gateway": "gateway",
    "scheduler": "scheduler",
    "keyvault": "keyvault",
    "compute-local": "compute_local",
    "compute-runpod": "compute_runpod",
    "compute-modal": "compute_modal",
}
PINNED_BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm$")


def workspace_packages() -> dict[str, Path]:
    """Distribution name -> directory of every package in this repository."""
    dirs = [
        REPO / "protos",
        REPO / "gpu_core",
        *REPO.glob("libs/*"),
        *REPO.glob("clients/*"),
        *REPO.glob("services/*"),
    ]
    packages = {}
    for directory in dirs:
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file():
            name = tomllib.loads(pyproject.read_text())["project"]["name"]
            packages[name] = directory.relative_to(REPO)
    return packages


def workspace_closure(service: str) -> dict[str, set[str]]:
    """Directory -> extras of the service and every workspace package it needs, transitively."""
    packages = workspace_packages()
    needed: dict[str, set[str]] = {}
    pending = [(str(Path("services") / service), set())]
    while pending:
        directory, extras = pending.pop()
        if directory in needed and extras <= needed[directory]:
            continue
        needed.setdefault(directory, set()).update(extras)
        project = tomllib.loads((REPO / directory / "pyproject.toml").read_text())["project"]
        requirements = list(project.get("dependencies", []))
        for extra in extras:
            requirements += project.get("optional-dependencies", {}).get(extra, [])
        for line in requirements:
            requirement = Requirement(line)
            if requirement.name in packages:
                pending.append((str(packages[requirement.name]), set(requirement.extras)))
    return needed


def installed_dirs(dockerfile: str) -> dict[str, set[str]]:
    """Directory -> extras of the local paths that the Dockerfile's pip installs name."""
    installed: dict[str, set[str]] = {}
    for command in re.findall(r"pip install ((?:[^\n\\]|\\\n)*)", dockerfile):
        for word in shlex.split(command.replace("\\\n", " ")):
            if word.startswith("./"):
                path, _, extras = word[2:].partition("[")
                installed[path] = set(filter(None, extras.rstrip("]").split(",")))
    return installed


@pytest.mark.parametrize("service", sorted(ENTRY_MODULES))
def test_dockerfile_is_two_pinned_stages_with_a_non_root_user(service: str) -> None:
    text = (REPO / "services" / service / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert len(stages) == 2 and all(PINNED_BASE.match(image) for image in stages), stages
    runtime = text.split("\nFROM ")[-1]
    assert re.search(r"^USER \d+:\d+$", runtime, flags=re.M), "the runtime stage needs a numeric USER"
    assert re.search(r"^COPY --from=builder ", runtime, flags=re.M)
    assert "PYTHONDONTWRITEBYTECODE=1" in runtime and "PYTHONUNBUFFERED=1" in runtime
    entrypoints = re.findall(r"^ENTRYPOINT (.+)$", text, flags=re.M)
    assert entrypoints == [f'["python", "-m", "{ENTRY_MODULES[service]}"]']


@pytest.mark.parametrize("service", sorted(ENTRY_MODULES))
def test_image_installs_exactly_the_workspace_packages_the_service_declares(service: str) -> None:
    text = (REPO / "services" / service / "Dockerfile").read_text()
    assert installed_dirs(text) == workspace_closure(service)


def test_gateway_image_carries_no_torch() -> None:
    text = (REPO / "services/gateway/Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in instructions if "torch" in line]
    # The data extra (data files, tokenizers, chat templates) and nothing that brings torch.
    assert installed_dirs(text)["gpu_core"] == {"data"}
    extras = tomllib.loads((REPO / "gpu_core/pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [requirement for requirement in extras["data"] if "torch" in requirement]


def test_compute_local_image_runs_gpu_core_on_cpu_torch_by_default() -> None:
    text = (REPO / "services/compute-local/Dockerfile").read_text()
    assert installed_dirs(text)["gpu_core"] == {"gpu"}
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split("\n"))
    assert {".git", ".venv", ".data", ".env", "**/tests", "**/__pycache__"} <= ignored
